"""End-to-end speed with fairseq: ``fairseq-train`` words/s and ``fairseq-generate`` sentences/s
of dense, vanilla MoE and MEO models of the same configuration, as ratios to dense.

Data: the small real-data slices in ``tests/data`` go through the project's own pipelines
(``scripts/prepare_xsum.sh`` with a small sentencepiece vocabulary, ``scripts/prepare_wikitext.sh``)
into a work directory (a temporary one unless ``--workdir``; a re-run with the same workdir
reuses the data). Tasks:

* ``xsum`` (``--arch``, default ``meo_transformer_tiny``): summarisation, encoder-decoder. Train
  ``--updates`` updates, then ``fairseq-generate`` on ``--gen-subset`` (default ``train``, the
  largest split of the slice: 200 documents; this is a speed test) with the released XSum
  settings (beam 6, max length 60, min length 10, no-repeat-ngram 3). Barely trained models
  generate outputs of different lengths, so tokens/s is reported beside sentences/s.
* ``lm`` (``--lm-arch``, default ``meo_transformer_lm_tiny``): WikiText language modelling,
  train only.

Modes: ``dense`` (``--moe-mode dense``), ``moe`` (vanilla token-level top-k MoE,
``--moe-mode moe --moe-level token``), ``meo`` (``--moe-mode meo``: sequence routing in encoders,
``encoder`` routing in the decoder of an encoder-decoder, ``segment`` routing in an LM), all with
``--moe-experts``/``--moe-top-k`` experts in every FFN linear.

Words/s is fairseq's own ``wps`` of the ``train_inner`` log lines (``--log-interval`` updates
each); the first interval (warm-up) is dropped and the median of the others is reported.
Sentences/s is fairseq-generate's own "Translated N sentences ... (X sentences/s ...)" line
(generation time only, model loading excluded). Runs are sequential; on a shared machine the
numbers move with the load, so compare ratios of one run.
"""

import argparse
import json
import os
import re
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
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TRANSLATED = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in (" + _NUM + r")s \((" + _NUM + r") sentences/s, (" + _NUM + r") tokens/s\)"
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
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(threads), timeout=timeout, cwd=str(REPO))
    text = p.stdout + "\n" + p.stderr
    log_path.write_text(f"$ {' '.join(map(str, cmd))}\n# exit {p.returncode}, {time.perf_counter() - t0:.1f}s\n{text}", encoding="utf-8")
    if p.returncode != 0:
        raise BenchmarkError(f"command failed (exit {p.returncode}), log in {log_path}:\n{' '.join(map(str, cmd))}\n{text[-3000:]}")
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
        raise BenchmarkError("no train_inner wps in the fairseq-train log (too few updates for --log-interval?)")
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


def prepare(work: Path, threads, timeout, vocab: int) -> Dict[str, Path]:
    out = {}
    for name, script, args in (
        ("xsum", "prepare_xsum.sh", ["--raw", DATA / "xsum", "--vocab-size", str(vocab)]),
        ("lm", "prepare_wikitext.sh", ["--raw", DATA / "wikitext-2"]),
    ):
        dest = work / f"{name}-bin"
        cmd = ["bash", SCRIPTS / script, *args, "--out", dest, "--workers", "1"]
        env = dict(_env(threads), PYTHON=sys.executable)
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
        if p.returncode != 0:
            raise BenchmarkError(f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        out[name] = dest
    return out


def train_cmd(task: str, data: Path, arch: str, mode: str, a, save_dir: Path) -> List:
    moe = MODE_FLAGS[mode] + ["--moe-experts", a.experts, "--moe-top-k", a.top_k]
    common = [
        "--user-dir", PKG, "--arch", arch, "--max-update", a.updates, "--log-format", "simple",
        "--log-interval", a.log_interval, "--seed", 1, "--num-workers", 0, "--disable-validation",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", 10, "--dropout", "0.1", "--max-tokens", a.max_tokens,
    ]
    if a.cpu:
        common.append("--cpu")
    if task == "xsum":
        return [
            sys.executable, "-m", "fairseq_cli.train", data, "--task", "translation", "--source-lang", "src",
            "--target-lang", "tgt", "--truncate-source", "--max-source-positions", 512, "--max-target-positions", 512,
            "--share-all-embeddings", "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--required-batch-size-multiple", 1, "--save-dir", save_dir, "--no-epoch-checkpoints",
            "--save-interval-updates", a.updates, "--keep-interval-updates", 1, *common, *moe,
        ]
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--task", "language_modeling", "--tokens-per-sample", 128,
        "--sample-break-mode", "none", "--criterion", "moe_cross_entropy", "--share-decoder-input-output-embed",
        "--no-save", "--moe-segment-length", 32, *common, *moe,
    ]


def generate_cmd(data: Path, ckpt: Path, a) -> List:
    cmd = [
        sys.executable, "-m", "fairseq_cli.generate", data, "--user-dir", PKG, "--task", "translation",
        "--source-lang", "src", "--target-lang", "tgt", "--truncate-source", "--max-source-positions", 512,
        "--path", ckpt, "--gen-subset", a.gen_subset, "--beam", 6, "--max-len-a", 0, "--max-len-b", 60,
        "--min-len", 10, "--no-repeat-ngram-size", 3, "--batch-size", a.gen_batch_size,
        "--remove-bpe", "sentencepiece", "--num-workers", 0,
    ]
    if a.cpu:
        cmd.append("--cpu")
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
            for mode in a.modes:
                save = work / f"ckpt-{task}-{mode}"
                shutil.rmtree(save, ignore_errors=True)
                log = _run(train_cmd(task, data[task], arch, mode, a, save), work / f"train-{task}-{mode}.log", a.threads, a.timeout)
                row = {"task": task, "arch": arch, "mode": mode, **train_wps(log)}
                if task == "xsum" and not a.no_generate:
                    ckpt = save / "checkpoint_last.pt"
                    glog = _run(generate_cmd(data[task], ckpt, a), work / f"generate-{task}-{mode}.log", a.threads, a.timeout)
                    row.update(generate_speed(glog))
                if not a.workdir:
                    shutil.rmtree(save, ignore_errors=True)
                rows.append(row)
                if a.progress:
                    print(f"[model] {task} {mode}: {row['wps']:.0f} wps"
                          + (f", {row['sentences_per_s']:.2f} sentences/s" if "sentences_per_s" in row else ""), file=sys.stderr, flush=True)
        for task in tasks:
            dense = next((r for r in rows if r["task"] == task and r["mode"] == "dense"), None)
            for r in rows:
                if r["task"] != task or dense is None:
                    continue
                r["ratio"] = {"wps": r["wps"] / dense["wps"]}
                if "sentences_per_s" in r and "sentences_per_s" in dense:
                    r["ratio"]["sentences_per_s"] = r["sentences_per_s"] / dense["sentences_per_s"]
                    r["ratio"]["tokens_per_s"] = r["tokens_per_s"] / dense["tokens_per_s"]
        return {"experts": a.experts, "top_k": a.top_k, "updates": a.updates, "workdir": str(work) if a.workdir else None, "rows": rows}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def table(res: dict) -> str:
    lines = [f"fairseq end to end: {res['experts']} experts, top-{res['top_k']}, {res['updates']} updates",
             f"{'task':5s} {'arch':24s} {'mode':6s} {'train wps':>10s} {'x dense':>7s} {'gen sent/s':>10s} {'x dense':>7s}"
             f" {'gen tok/s':>9s} {'x dense':>7s}"]
    lines.append("-" * len(lines[-1]))
    nan = float("nan")
    for r in res["rows"]:
        q = r.get("ratio", {})
        if "sentences_per_s" in r:
            gen = (f"{r['sentences_per_s']:10.2f} {q.get('sentences_per_s', nan):7.2f}"
                   f" {r['tokens_per_s']:9.1f} {q.get('tokens_per_s', nan):7.2f}")
        else:
            gen = f"{'-':>10s} {'-':>7s} {'-':>9s} {'-':>7s}"
        lines.append(f"{r['task']:5s} {r['arch']:24s} {r['mode']:6s} {r['wps']:10.0f} {q.get('wps', nan):7.2f} {gen}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m meo_fairseq.benchmark model", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("xsum", "lm", "all"), default="all")
    p.add_argument("--arch", default="meo_transformer_tiny", help="architecture of the xsum (encoder-decoder) task")
    p.add_argument("--lm-arch", default="meo_transformer_lm_tiny", help="architecture of the lm task")
    p.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=list(MODES))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--gen-subset", default="train", help="split to generate from (train: 200 documents; valid/test: 20)")
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--vocab-size", type=int, default=1000, help="sentencepiece vocabulary of the xsum slice")
    p.add_argument("--workdir", help="keep data, checkpoints and logs here (default: a temporary directory)")
    p.add_argument("--threads", type=int, help="OMP/MKL threads of the fairseq processes (default: unset)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per fairseq command")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for m in a.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}")
    if "dense" not in a.modes:
        a.modes = ["dense"] + a.modes
    a.cpu = not torch.cuda.is_available()
    a.progress = not a.json
    try:
        res = run(a)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1) if a.json else table(res))
    return 0
