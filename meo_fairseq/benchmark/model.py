"""End-to-end speed with fairseq: ``fairseq-train`` words/s and ``fairseq-generate`` sentences/s
of dense, vanilla MoE and MEO models of the same configuration, as ratios to dense.

Data: the small real-data slices in ``tests/data`` go through the project's own pipelines
(``scripts/prepare_xsum.sh`` with a small sentencepiece vocabulary, ``scripts/prepare_wikitext.sh``)
into a work directory (a temporary one unless ``--workdir``; a re-run with the same workdir
reuses the data). Tasks:

* ``xsum`` (``--arch``, default ``meo_transformer_tiny``): summarisation, encoder-decoder. Train
  ``--updates`` updates, then ``fairseq-generate`` on ``--gen-subset`` (default ``train``, the
  largest split of the slice: 200 documents; this is a speed test) once per ``--gen`` setting
  ``BATCHxBEAM`` (default ``1x1,32x6``: one sentence at a time greedily, where MEO would re-merge
  at every step, and batched beam search), no-repeat-ngram 3 as in the XSum recipe. Every model
  generates exactly ``--gen-len`` tokens per sentence (minimum = maximum length, default 60, the
  recipe's maximum): barely trained models would otherwise stop at different lengths, and the
  ratios would compare different amounts of work.
* ``lm`` (``--lm-arch``, default ``meo_transformer_lm_tiny``): WikiText language modelling,
  train only.

``--precision`` (default fp32): ``bf16`` trains through ``python -m meo_fairseq.train`` (fairseq-train
``--bf16`` looks for torch_xla) and generates in fp32 (fairseq-generate has no bfloat16);
``fp16`` trains and generates with fairseq's ``--fp16`` (GPU only).

Modes: ``dense`` (``--moe-mode dense``), ``moe`` (vanilla token-level top-k MoE,
``--moe-mode moe --moe-level token``), ``meo`` (``--moe-mode meo``: sequence routing in encoders,
``encoder`` routing in the decoder of an encoder-decoder, ``segment`` routing in an LM), all with
``--moe-experts``/``--moe-top-k`` experts in every FFN linear.

Words/s is fairseq's own ``wps`` of the ``train_inner`` log lines (``--log-interval`` updates
each); the first interval (warm-up) is dropped and the median of the others is taken, then the
median over ``--repeats`` training runs (the modes interleaved).
Sentences/s is fairseq-generate's own "Translated N sentences ... (X sentences/s ...)" line
(generation time only, model loading excluded), the median over ``--gen-repeats`` runs (the modes
interleaved, like the training runs). Runs are sequential; on a shared machine the
numbers move with the load, so compare ratios of one run.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

PKG = Path(__file__).resolve().parents[1]  # meo_fairseq/
REPO = PKG.parent
DATA = REPO / "tests" / "data"
SCRIPTS = REPO / "scripts"
MODES = ("dense", "moe", "meo")
MODE_FLAGS = {
    "dense": ["--moe-mode", "dense"],
    "moe": ["--moe-mode", "moe", "--moe-level", "token"],
    "meo": ["--moe-mode", "meo", "--moe-level", "sequence"],
}
PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"]}
# the xsum data as fairseq-train and fairseq-generate read it
XSUM_DATA_ARGS = ["--task", "translation", "--source-lang", "src", "--target-lang", "tgt"]
XSUM_DATA_ARGS += ["--truncate-source", "--max-source-positions", 512]
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TRANSLATED = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ("
    + _NUM
    + r")s \(("
    + _NUM
    + r") sentences/s, ("
    + _NUM
    + r") tokens/s\)"
)


class BenchmarkError(RuntimeError):
    pass


def _env(threads: Optional[int]) -> Dict[str, str]:
    e = dict(os.environ)
    if threads:
        e["OMP_NUM_THREADS"] = e["MKL_NUM_THREADS"] = str(threads)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def _run(cmd: List[str], log_path: Path, threads: Optional[int], timeout: int) -> str:
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=_env(threads),
        timeout=timeout,
        cwd=str(REPO),
    )
    text = p.stdout + "\n" + p.stderr
    log_path.write_text(
        f"$ {' '.join(map(str, cmd))}\n# exit {p.returncode}, {time.perf_counter() - t0:.1f}s\n{text}",
        encoding="utf-8",
    )
    if p.returncode != 0:
        raise BenchmarkError(
            f"command failed (exit {p.returncode}), log in {log_path}:\n"
            f"{' '.join(map(str, cmd))}\n{text[-3000:]}"
        )
    return text


def train_wps(log: str) -> Dict[str, float]:
    """wps of the train_inner lines: median without the first interval (and all values)."""
    vals = []
    for line in log.splitlines():
        if "| train_inner |" in line:
            m = re.search(r"\bwps=(" + _NUM + r")", line)
            if m:
                vals.append(float(m.group(1)))
    if not vals:
        raise BenchmarkError(
            "no train_inner wps in the fairseq-train log (too few updates for --log-interval?)"
        )
    steady = vals[1:] or vals
    return {"wps": statistics.median(steady), "wps_intervals": vals}


def generate_speed(log: str) -> Dict[str, float]:
    m = _TRANSLATED.search(log)
    if not m:
        raise BenchmarkError("no 'Translated N sentences ...' line in the fairseq-generate log")
    return {
        "sentences": int(m.group(1).replace(",", "")),
        "gen_tokens": int(m.group(2).replace(",", "")),
        "gen_seconds": float(m.group(3)),
        "sentences_per_s": float(m.group(4)),
        "tokens_per_s": float(m.group(5)),
    }


def median_speed(runs: List[Dict[str, float]]) -> Dict[str, float]:
    """One generate figure from repeated runs: the medians of their speeds and times, and the
    sentences/s of every run (``runs``)."""
    out = {
        k: statistics.median(r[k] for r in runs) for k in ("gen_seconds", "sentences_per_s", "tokens_per_s")
    }
    out.update(
        sentences=runs[0]["sentences"],
        gen_tokens=runs[0]["gen_tokens"],
        runs=[r["sentences_per_s"] for r in runs],
    )
    return out


def prepare(work: Path, threads, timeout, vocab: int) -> Dict[str, Path]:
    out = {}
    for name, script, args in (
        ("xsum", "prepare_xsum.sh", ["--raw", DATA / "xsum", "--vocab-size", str(vocab)]),
        ("lm", "prepare_wikitext.sh", ["--raw", DATA / "wikitext-2"]),
    ):
        dest = work / f"{name}-bin"
        cmd = ["bash", SCRIPTS / script, *args, "--out", dest, "--workers", "1"]
        env = dict(_env(threads), PYTHON=sys.executable)
        p = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO)
        )
        if p.returncode != 0:
            raise BenchmarkError(f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        out[name] = dest
    return out


def train_cmd(task: str, data: Path, arch: str, mode: str, a, save_dir: Path) -> List:
    # --train-args last: where they repeat one of the options here, they win
    return _train_cmd(task, data, arch, mode, a, save_dir) + shlex.split(getattr(a, "train_args", "") or "")


def _train_cmd(task: str, data: Path, arch: str, mode: str, a, save_dir: Path) -> List:
    moe = MODE_FLAGS[mode] + ["--moe-experts", a.experts, "--moe-top-k", a.top_k]
    common = [
        "--user-dir",
        PKG,
        "--arch",
        arch,
        "--max-update",
        a.updates,
        "--log-format",
        "simple",
        "--log-interval",
        a.log_interval,
        "--seed",
        1,
        "--num-workers",
        0,
        "--disable-validation",
        "--optimizer",
        "adam",
        "--adam-betas",
        "(0.9, 0.98)",
        "--lr",
        "5e-4",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        10,
        "--dropout",
        "0.1",
        "--max-tokens",
        a.max_tokens,
    ]
    if a.cpu:
        common.append("--cpu")
    common += PRECISION_FLAGS[a.precision]
    # fairseq-train --bf16 looks for torch_xla (fairseq issue #4696); meo_fairseq.train does not
    entry = "meo_fairseq.train" if a.precision == "bf16" else "fairseq_cli.train"
    save_args = ["--save-dir", save_dir, "--no-epoch-checkpoints"]
    save_args += ["--save-interval-updates", a.updates, "--keep-interval-updates", 1]
    if task == "xsum":
        return [
            sys.executable,
            "-m",
            entry,
            data,
            *XSUM_DATA_ARGS,
            "--max-target-positions",
            512,
            "--share-all-embeddings",
            "--criterion",
            "moe_label_smoothed_cross_entropy",
            "--label-smoothing",
            "0.1",
            "--required-batch-size-multiple",
            1,
            # the checkpoint is what fairseq-generate loads; without generation, saving one (a
            # large model's weights and optimizer state) would only cost time
            *(["--no-save"] if getattr(a, "no_generate", False) else save_args),
            *common,
            *moe,
        ]
    return [
        sys.executable,
        "-m",
        entry,
        data,
        "--task",
        "language_modeling",
        "--tokens-per-sample",
        128,
        "--sample-break-mode",
        "none",
        "--criterion",
        "moe_cross_entropy",
        "--share-decoder-input-output-embed",
        "--no-save",
        "--moe-segment-length",
        32,
        *common,
        *moe,
    ]


def gen_setting(s: str):
    """'32x6' -> (batch 32, beam 6)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", s)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"--gen: expected BATCHxBEAM such as 32x6, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def generate_cmd(data: Path, ckpt: Path, a, batch: int, beam: int) -> List:
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.generate",
        data,
        "--user-dir",
        PKG,
        *XSUM_DATA_ARGS,
        "--path",
        ckpt,
        "--gen-subset",
        a.gen_subset,
        "--beam",
        beam,
        "--max-len-a",
        0,
        "--max-len-b",
        a.gen_len,
        "--min-len",
        a.gen_len,
        "--no-repeat-ngram-size",
        3,
        "--batch-size",
        batch,
        "--remove-bpe",
        "sentencepiece",
        "--num-workers",
        0,
    ]
    if a.cpu:
        cmd.append("--cpu")
    if a.precision == "fp16":  # (fairseq-generate has no bfloat16: bf16 models generate in fp32)
        cmd.append("--fp16")
    return cmd


def run(a) -> dict:
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="meo_bench_model_")
        work = Path(tmp)
    try:
        data = prepare(work, a.threads, a.timeout, a.vocab_size)
        rows = []
        tasks = ["xsum", "lm"] if a.task == "all" else [a.task]
        for task in tasks:
            arch = a.arch if task == "xsum" else a.lm_arch
            # training runs of the modes interleaved, --repeats times: a slow spell of a shared
            # machine hits every mode alike; words/s is the median over the runs
            runs = {mode: [] for mode in a.modes}
            for rep in range(a.repeats):
                for mode in a.modes:
                    save = work / f"ckpt-{task}-{mode}"
                    shutil.rmtree(save, ignore_errors=True)
                    log = _run(
                        train_cmd(task, data[task], arch, mode, a, save),
                        work / f"train-{task}-{mode}-{rep}.log",
                        a.threads,
                        a.timeout,
                    )
                    runs[mode].append(train_wps(log))
            # generation the same way: the modes interleaved, --gen-repeats times (run one mode
            # after the other, a machine that slows down over the minutes favours the first)
            gens = {mode: {f"{b}x{k}": [] for b, k in a.gen} for mode in a.modes}
            if task == "xsum" and not a.no_generate:
                for rep in range(a.gen_repeats):
                    for mode in a.modes:
                        ckpt = work / f"ckpt-{task}-{mode}" / "checkpoint_last.pt"
                        for batch, beam in a.gen:
                            glog = _run(
                                generate_cmd(data[task], ckpt, a, batch, beam),
                                work / f"generate-{task}-{mode}-{batch}x{beam}-{rep}.log",
                                a.threads,
                                a.timeout,
                            )
                            gens[mode][f"{batch}x{beam}"].append(generate_speed(glog))
            for mode in a.modes:
                save = work / f"ckpt-{task}-{mode}"
                row = {
                    "task": task,
                    "arch": arch,
                    "mode": mode,
                    "wps": statistics.median(r["wps"] for r in runs[mode]),
                    "wps_runs": [r["wps"] for r in runs[mode]],
                }
                if task == "xsum" and not a.no_generate:
                    row["gen"] = {k: median_speed(v) for k, v in gens[mode].items()}
                if not a.workdir:
                    shutil.rmtree(save, ignore_errors=True)
                rows.append(row)
                if a.progress:
                    gen = "".join(
                        f", {k}: {g['sentences_per_s']:.2f} sentences/s"
                        for k, g in row.get("gen", {}).items()
                    )
                    print(f"[model] {task} {mode}: {row['wps']:.0f} wps{gen}", file=sys.stderr, flush=True)
        for task in tasks:
            dense = next((r for r in rows if r["task"] == task and r["mode"] == "dense"), None)
            for r in rows:
                if r["task"] != task or dense is None:
                    continue
                r["ratio"] = {"wps": r["wps"] / dense["wps"]}
                for k, g in r.get("gen", {}).items():
                    d = dense.get("gen", {}).get(k)
                    if d:
                        g["ratio"] = {q: g[q] / d[q] for q in ("sentences_per_s", "tokens_per_s")}
        res = {
            "experts": a.experts,
            "top_k": a.top_k,
            "updates": a.updates,
            "precision": a.precision,
            "repeats": a.repeats,
            "gen_repeats": a.gen_repeats,
            "train_args": a.train_args,
            "workdir": str(work) if a.workdir else None,
            "rows": rows,
        }
        res["targets"] = check_targets(rows)
        return res
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def check_targets(rows: List[dict]) -> List[dict]:
    """The efficiency goals: MEO train words/s >= 0.85x dense; generate 1x1 >= 0.9x dense; generate
    32x6 >= 0.5x dense and faster than vanilla MoE (sentences/s, same run)."""
    out = []

    def get(task, mode):
        return next((r for r in rows if r["task"] == task and r["mode"] == mode), None)

    for task in sorted({r["task"] for r in rows}):
        meo, moe = get(task, "meo"), get(task, "moe")
        if meo is None or "ratio" not in meo:
            continue
        v = meo["ratio"]["wps"]
        out.append(
            {"task": task, "figure": "train wps MEO/dense", "ratio": v, "goal": ">= 0.85", "met": v >= 0.85}
        )
        for key, bound in (("1x1", 0.9), ("32x6", 0.5)):
            g = meo.get("gen", {}).get(key)
            if not g or "ratio" not in g:
                continue
            v = g["ratio"]["sentences_per_s"]
            t = {
                "task": task,
                "figure": f"generate {key} sentences/s MEO/dense",
                "ratio": v,
                "goal": f">= {bound}",
                "met": v >= bound,
            }
            if key == "32x6" and moe is not None and key in moe.get("gen", {}):
                mv = moe["gen"][key]["sentences_per_s"]
                t["goal"] += " and > vanilla MoE"
                t["moe_ratio"] = moe["gen"][key].get("ratio", {}).get("sentences_per_s")
                t["met"] = t["met"] and g["sentences_per_s"] > mv
            out.append(t)
    return out


def table(res: dict) -> str:
    keys = []
    for r in res["rows"]:
        keys += [k for k in r.get("gen", {}) if k not in keys]
    head = f"{'task':5s} {'arch':24s} {'mode':6s} {'train wps':>10s} {'x dense':>7s}"
    for k in keys:
        head += f" {'gen ' + k + ' sent/s':>17s} {'x dense':>7s} {'tok/s':>8s} {'x dense':>7s}"
    lines = [
        f"fairseq end to end: {res['experts']} experts, top-{res['top_k']}, {res['updates']} updates, "
        f"{res.get('precision', 'fp32')}{', ' + res['train_args'] if res.get('train_args') else ''} "
        f"(train words/s: median of {res.get('repeats', 1)} interleaved runs"
        + (f"; generate BATCHxBEAM: median of {res.get('gen_repeats', 1)})" if keys else ")"),
        head,
        "-" * len(head),
    ]
    nan = float("nan")
    for r in res["rows"]:
        s = (
            f"{r['task']:5s} {r['arch']:24s} {r['mode']:6s} {r['wps']:10.0f} "
            f"{r.get('ratio', {}).get('wps', nan):7.2f}"
        )
        for k in keys:
            g = r.get("gen", {}).get(k)
            if g:
                q = g.get("ratio", {})
                s += (
                    f" {g['sentences_per_s']:17.2f} {q.get('sentences_per_s', nan):7.2f}"
                    f" {g['tokens_per_s']:8.1f} {q.get('tokens_per_s', nan):7.2f}"
                )
            else:
                s += f" {'-':>17s} {'-':>7s} {'-':>8s} {'-':>7s}"
        lines.append(s)
    if res.get("targets"):
        lines.append("targets (same run):")
        for t in res["targets"]:
            lines.append(
                f"  {t['task']:5s} {t['figure']:38s} {t['ratio']:.2f}x (goal {t['goal']}) "
                f"{'met' if t['met'] else 'NOT met'}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.benchmark model", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--task", choices=("xsum", "lm", "all"), default="all")
    p.add_argument(
        "--arch", default="meo_transformer_tiny", help="architecture of the xsum (encoder-decoder) task"
    )
    p.add_argument("--lm-arch", default="meo_transformer_lm_tiny", help="architecture of the lm task")
    p.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=list(MODES))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--updates", type=int, default=40)
    p.add_argument(
        "--repeats", type=int, default=3, help="training runs per mode, interleaved; words/s is their median"
    )
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument(
        "--gen-subset", default="train", help="split to generate from (train: 200 documents; valid/test: 20)"
    )
    p.add_argument("--gen", default="1x1,32x6", help="generate settings BATCHxBEAM, comma separated")
    p.add_argument(
        "--gen-len", type=int, default=60, help="tokens generated per sentence (minimum = maximum length)"
    )
    p.add_argument(
        "--gen-repeats",
        type=int,
        default=3,
        help="generate runs per mode and setting, interleaved; sentences/s is their median",
    )
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--vocab-size", type=int, default=1000, help="sentencepiece vocabulary of the xsum slice")
    p.add_argument("--workdir", help="keep data, checkpoints and logs here (default: a temporary directory)")
    p.add_argument("--threads", type=int, help="OMP/MKL threads of the fairseq processes (default: unset)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per fairseq command")
    p.add_argument(
        "--precision",
        choices=sorted(PRECISION_FLAGS),
        default="fp32",
        help="training precision: fairseq's --fp16 (GPU only), "
        "or --bf16 through python -m meo_fairseq.train; "
        "generation runs in fp16 for fp16, else in fp32 (fairseq-generate has no bfloat16)",
    )
    p.add_argument(
        "--train-args",
        default="",
        help="more fairseq-train options for every mode, one string, e.g. '--moe-compile' "
        "(given after the benchmark's own, so they win)",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if a.gen_repeats < 1:
        p.error("--gen-repeats must be at least 1")
    try:
        a.gen = [gen_setting(v) for v in a.gen.split(",") if v.strip()]
    except ValueError as e:
        p.error(str(e))
    for m in a.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}")
    if "dense" not in a.modes:
        a.modes = ["dense"] + a.modes
    a.cpu = not torch.cuda.is_available()
    if a.cpu and a.precision == "fp16":
        p.error("--precision fp16 needs a GPU (none is visible)")
    a.progress = not a.json
    try:
        res = run(a)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1) if a.json else table(res))
    return 0
