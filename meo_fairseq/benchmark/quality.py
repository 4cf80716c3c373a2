"""Quality study: validation perplexity of dense, vanilla MoE and MEO language models, trained from
scratch and upcycled from a dense checkpoint, with ``fairseq-train`` and ``fairseq-eval-lm``.

    python -m meo_fairseq.benchmark quality --data DATA_BIN [--out runs/quality] [--seeds 3]

``DATA_BIN`` is the output of ``scripts/prepare_wikitext.sh`` (e.g. on the bundled
``examples/data/enwiki`` sample). For every seed the study

1. trains the dense model for ``--pretrain-updates`` updates (the checkpoint to upcycle);
2. ``scratch``: trains every variant from a random initialisation for ``--updates`` updates (the
   dense one is the pretraining run when it has as many updates);
3. ``upcycled``: initialises every variant from that dense checkpoint (``--moe-upcycle-from``;
   ``dense`` is the dense model continued the same way) and trains it ``--updates`` more updates
   with a fresh optimizer and ``--upcycle-lr``;

then evaluates the last checkpoint of each run with ``fairseq-eval-lm`` on ``--eval-subset``.
Every run has the same budget: the same updates, batch, learning-rate schedule and seed.

Variants (``--variants``; ``--variant NAME=FLAGS`` adds or replaces one):

* ``dense``: ``--moe-mode dense``
* ``moe``: vanilla token-level top-k MoE, ``--moe-mode moe --moe-level token``
* ``meo``: sequence-level MEO with causal segment routing (as language models use),
  ``--moe-mode meo --moe-level sequence --moe-decoder-routing segment``
* ``meo_token``: token-level MEO, ``--moe-mode meo --moe-level token``

Extra fairseq-train options: ``--args`` for every run (the dense pretraining included: model
width, learning rate...), ``--expert-args`` for every run of a variant with experts (gate noise,
router initialisation, balance loss...).

Figures (mean ± sample std over seeds):

* at equal updates: fairseq-train's validation perplexity after ``--updates`` updates, and the
  ``fairseq-eval-lm`` perplexity of the last checkpoint;
* at equal training time: each run's training time is its updates times its median seconds per
  update (from fairseq's ``ups``; start-up, validation and checkpointing excluded). The time
  budget of a seed and setting is the shortest total training time of its variants; each
  variant's validation perplexity at that time is interpolated (log-linearly) along its
  validation curve. On a shared machine the times move with the load: compare within a run.

Outputs in ``--out``: one directory per run (``<setting>/<variant>/seed<S>``, with the fairseq log
``train.log``, the checkpoints and ``result.json``), ``results.json`` (every run and the summary,
rewritten after each run), ``results.md`` (the table in Markdown) and ``curves.png`` (the validation
curves by updates and by training time). The study is resumable: a finished run (same command) is
not run again, an interrupted one continues from its last checkpoint (saved at every validation),
and several invocations may share one ``--out`` (a lock per run). A run whose options changed is
refused: use another ``--out`` or variant name. So is a run of the same command made when the
plugin's defaults differed: each run records its options with every default resolved
(``resolved_options``), and the error names those that changed. A run made before that record
existed is refused too, unless ``--reuse-unchecked``.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PKG = Path(__file__).resolve().parents[1]  # meo_fairseq/
REPO = PKG.parent

VARIANTS = {
    "dense": "--moe-mode dense",
    "moe": "--moe-mode moe --moe-level token",
    "meo": "--moe-mode meo --moe-level sequence --moe-decoder-routing segment",
    "meo_token": "--moe-mode meo --moe-level token",
}
SETTINGS = ("scratch", "upcycled")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_VALID = re.compile(r"valid on '[^']+' subset \| loss (" + _NUM + r") .*?\| num_updates (\d+)")
_INNER = re.compile(r"train_inner \|.*?\bups=(" + _NUM + r").*?\bnum_updates=(\d+)")
_PARAMS = re.compile(r"num\. (?:shared )?model params: ([\d,]+)")
_EVAL = re.compile(r"Loss \(base 2\): (" + _NUM + r"), Perplexity: (" + _NUM + r")")


class StudyError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


def parse_variant(spec: str) -> Tuple[str, str]:
    """``NAME=FLAGS`` -> (name, flags); the name is a directory name."""
    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--variant: expected NAME=FLAGS with NAME of letters, digits, _ . -; got {spec!r}")
    return name, flags.strip()


def is_dense(flags: str) -> bool:
    """Whether a variant's flags select the dense FFN (the last --moe-mode wins, as in argparse)."""
    toks = shlex.split(flags)
    modes = [toks[i + 1] for i, t in enumerate(toks[:-1]) if t == "--moe-mode"]
    return bool(modes) and modes[-1] == "dense"


# ---- commands ----------------------------------------------------------------------------------


def train_cmd(
    a, variant_flags: str, save_dir: Path, updates: int, seed: int, upcycle_from: Optional[Path] = None
) -> List[str]:
    """The fairseq-train command of one run (the save dir last, so that it can be left out of the key)."""
    lr = a.upcycle_lr if upcycle_from is not None else a.lr
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.train",
        str(a.data),
        "--user-dir",
        str(PKG),
        "--task",
        "language_modeling",
        "--arch",
        a.arch,
        "--moe-experts",
        str(a.experts),
        "--moe-top-k",
        str(a.top_k),
        "--moe-segment-length",
        str(a.segment_length),
        "--criterion",
        "moe_cross_entropy",
        "--optimizer",
        "adam",
        "--adam-betas",
        "(0.9, 0.98)",
        "--lr",
        str(lr),
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        str(a.warmup),
        "--dropout",
        "0.1",
        "--share-decoder-input-output-embed",
        "--tokens-per-sample",
        str(a.tokens_per_sample),
        "--sample-break-mode",
        "none",
        "--max-tokens",
        str(a.max_tokens),
        "--max-update",
        str(updates),
        "--validate-interval-updates",
        str(a.valid_every),
        "--validate-interval",
        "1000000",
        "--save-interval",
        "1000000",
        "--save-interval-updates",
        str(a.valid_every),
        "--keep-interval-updates",
        "1",
        "--no-epoch-checkpoints",
        "--cpu",
        "--seed",
        str(seed),
        "--log-format",
        "simple",
        "--log-interval",
        str(a.log_interval),
        "--num-workers",
        "0",
    ]
    cmd += shlex.split(variant_flags)
    if upcycle_from is not None:
        cmd += ["--moe-upcycle-from", str(upcycle_from)]
    cmd += shlex.split(a.args)
    if not is_dense(variant_flags):
        cmd += shlex.split(a.expert_args)
    return cmd + ["--save-dir", str(save_dir)]


def eval_cmd(a, checkpoint: Path) -> List[str]:
    return [
        sys.executable,
        "-m",
        "fairseq_cli.eval_lm",
        str(a.data),
        "--user-dir",
        str(PKG),
        "--path",
        str(checkpoint),
        "--gen-subset",
        a.eval_subset,
        "--tokens-per-sample",
        str(a.tokens_per_sample),
        "--max-tokens",
        str(a.max_tokens),
        "--cpu",
        "--num-workers",
        "0",
    ]


def run_key(cmd: List[str]) -> str:
    """What identifies a run: its command without the interpreter and the save dir."""
    return " ".join(cmd[1:-2])


def same_run(key_a: str, key_b: str) -> bool:
    """Whether two run keys name the same run: equal but for the plugin's location (--user-dir),
    which changes when the checkout moves and means nothing for the run."""
    strip = lambda k: re.sub(r"--user-dir \S+ ", "", k)  # noqa: E731
    return strip(key_a) == strip(key_b)


def _env(threads: int) -> Dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = e["MKL_NUM_THREADS"] = str(threads)
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONWARNINGS"] = "ignore"  # library warnings (torch, fairseq), not the study's output
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


# ---- log parsing -------------------------------------------------------------------------------


def parse_train_log(text: str) -> Dict:
    """Validation curve, seconds per update and parameter count from a fairseq-train log.

    A resumed run appends to its log: the last value logged for an update number wins.

    Returns:
        dict with ``curve`` [(updates, validation loss in bits)] sorted by updates,
        ``sec_per_update`` (median of 1/ups over the train_inner intervals, NaN if none),
        ``params`` (int or None).
    """
    curve = {int(m.group(2)): float(m.group(1)) for m in _VALID.finditer(text)}
    ups = {int(m.group(2)): float(m.group(1)) for m in _INNER.finditer(text)}
    spu = [1.0 / u for u in ups.values() if u > 0]
    m = _PARAMS.search(text)
    return {
        "curve": sorted(curve.items()),
        "sec_per_update": statistics.median(spu) if spu else float("nan"),
        "params": int(m.group(1).replace(",", "")) if m else None,
    }


def parse_eval_log(text: str) -> Dict[str, float]:
    m = _EVAL.search(text)
    if not m:
        raise StudyError("no 'Loss (base 2): ..., Perplexity: ...' line in the fairseq-eval-lm output")
    return {"eval_loss": float(m.group(1)), "eval_ppl": float(m.group(2))}


# ---- running -----------------------------------------------------------------------------------


def _stream(cmd: List[str], log_path: Path, threads: int, on_line=None, echo=None) -> str:
    """Run cmd, appending its output to log_path; returns this call's output."""
    lines = []
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(threads), cwd=str(REPO)
        )
        try:
            for line in p.stdout:
                f.write(line)
                f.flush()
                lines.append(line)
                if echo is not None and echo(line):
                    sys.stdout.write(line)
                if on_line:
                    on_line(line)
        except BaseException:
            p.kill()
            raise
        rc = p.wait()
    text = "".join(lines)
    if rc != 0:
        raise StudyError(f"command failed (exit {rc}), log in {log_path}:\n{shlex.join(cmd)}\n{text[-3000:]}")
    return text


_PROGRESS = re.compile(r"\| (train_inner|valid) \|")


def _echo(a):
    """Which fairseq output lines to show: all (--verbose), the progress lines (--progress) or none."""
    if a.verbose:
        return lambda line: True
    if a.progress:
        return lambda line: _PROGRESS.search(line) is not None
    return None


def resolved_options(cmd: List[str]) -> Dict:
    """What a run's fairseq-train command means under the plugin's current defaults: the expert
    layer's configuration (``modules.MoEConfig``, less ``impl`` and ``compile``, which change how it
    runs, not what it computes), the initialisation (router, expert scale) and the model's sizes,
    every default resolved. The run key is the command, which cannot see a changed default: these
    are stored with each finished run, and it is reused only while they still hold."""
    from fairseq import options

    from ..models.init import resolved_init
    from ..models.moe_args import layer_configs
    from ..modules.config import unused_options

    quiet = logging.getLogger("fairseq.utils")  # ("--user-dir ... has already been imported")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # (argparse's usage; its error line is kept below)
            args = options.parse_args_and_arch(options.get_training_parser(), input_args=cmd[3:])
        layer = layer_configs(args, "decoder", args.decoder_layers, is_lm=True)[-1]
        init = resolved_init(args) if layer.mode != "dense" else {}
    except (SystemExit, ValueError) as e:
        why = [line.removeprefix("-: ") for line in err.getvalue().strip().splitlines()[-1:]] or [str(e)]
        raise StudyError(f"fairseq-train refuses the options of the command {' '.join(cmd)}\n{why[0]}")
    finally:
        quiet.setLevel(level)
    if layer.mode == "dense":  # (a dense FFN ignores every other expert option)
        layer = {"mode": "dense"}
    else:
        drop = {"impl", "compile"} | unused_options(layer.mode, layer.level, layer.compressed_experts)
        layer = {k: v for k, v in dataclasses.asdict(layer).items() if k not in drop}
    sizes = {k: v for k, v in vars(args).items() if re.match(r"(encoder|decoder)_", k)}
    # through JSON, as result.json stores them (tuples become lists)
    return json.loads(json.dumps({"layer": layer, "init": init, "sizes": sizes}, default=str))


def resolved_differences(stored: Optional[Dict], now: Dict) -> Tuple[List[str], List[str]]:
    """(options whose resolved value changed, options known to only one of the two) between the
    resolved options of a finished run and those its command has now, as "group.option" lines."""
    if stored is None:
        return [], ["(the run predates the record of resolved options)"]
    changed, one_sided = [], []
    for group in sorted(set(stored) | set(now)):
        old, new = stored.get(group, {}), now.get(group, {})
        for k in sorted(set(old) | set(new)):
            if k in old and k in new:
                if old[k] != new[k]:
                    changed.append(f"{group}.{k}: {old[k]!r} then, {new[k]!r} now")
            else:
                one_sided.append(f"{group}.{k}")
    return changed, one_sided


def run_one(a, name: str, cmd: List[str], run_dir: Path, updates: int, label: str) -> Dict:
    """Train (or resume, or reuse) one run and evaluate its last checkpoint; returns its result."""
    run_dir.mkdir(parents=True, exist_ok=True)
    res_path = run_dir / "result.json"
    with open(run_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another invocation may be running this very run
        key, resolved = run_key(cmd), resolved_options(cmd)
        if res_path.exists():
            res = json.loads(res_path.read_text())
            if not same_run(res["key"], key):
                raise StudyError(
                    f"{run_dir} holds a run with other options:\n  {res['key']}\nnot\n  {key}\n"
                    "use another --out or variant name"
                )
            if "resolved" not in res and not a.reuse_unchecked:
                raise StudyError(
                    f"{run_dir} holds a run made before runs recorded their options with every "
                    "default resolved, so whether the plugin's defaults changed since cannot be "
                    "checked: use another --out to run it again, or --reuse-unchecked to reuse it as it is"
                )
            changed, one_sided = resolved_differences(res.get("resolved"), resolved)
            if changed:
                raise StudyError(
                    f"{run_dir} holds a run of the same command made under other defaults of the "
                    "plugin:\n  " + "\n  ".join(changed) + "\nuse another --out to run it again"
                )
            if one_sided:
                log(f"{label}: reused; not compared with the current defaults: {', '.join(one_sided)}")
            log(f"{label}: done before (valid ppl {2 ** res['curve'][-1][1]:.1f})")
            return res
        cfg_path, resolved_path = run_dir / "key.txt", run_dir / "resolved.json"
        if cfg_path.exists() and not same_run(cfg_path.read_text(), key):
            raise StudyError(
                f"{run_dir} holds an unfinished run with other options; remove it or use another --out"
            )
        if (
            resolved_path.exists()
            and resolved_differences(json.loads(resolved_path.read_text()), resolved)[0]
        ):
            raise StudyError(
                f"{run_dir} holds an unfinished run made under other defaults of the plugin; remove it "
                "or use another --out"
            )
        cfg_path.write_text(key)
        resolved_path.write_text(json.dumps(resolved, indent=1))
        t0 = time.time()
        log(f"{label}: training {updates} updates")

        def progress(line):
            m = _VALID.search(line)
            if m:
                log(
                    f"{label}: update {int(m.group(2))}/{updates}, valid ppl {2 ** float(m.group(1)):.1f} "
                    f"({time.time() - t0:.0f} s)"
                )

        _stream(cmd, run_dir / "train.log", a.threads, progress, _echo(a))
        res = parse_train_log((run_dir / "train.log").read_text(encoding="utf-8"))
        if not res["curve"] or res["curve"][-1][0] != updates:
            raise StudyError(f"{label}: no validation at update {updates} in {run_dir / 'train.log'}")
        ckpt = run_dir / "checkpoint_last.pt"
        if a.eval_subset:
            res.update(parse_eval_log(_stream(eval_cmd(a, ckpt), run_dir / "eval.log", a.threads)))
        res.update(key=key, resolved=resolved, variant=name, updates=updates, checkpoint=str(ckpt))
        res["wall_s"] = time.time() - t0
        res_path.write_text(json.dumps(res, indent=1))
        extra = f", {a.eval_subset} ppl {res['eval_ppl']:.1f}" if a.eval_subset else ""
        log(
            f"{label}: valid ppl {2 ** res['curve'][-1][1]:.1f}{extra}, "
            f"{res['sec_per_update'] * 1000:.0f} ms/update"
        )
        return res


# ---- summary -----------------------------------------------------------------------------------


def _at_time(curve, spu: float, t: float) -> float:
    """Validation loss (bits) at training time t along curve [(updates, loss)] (linear in log ppl)."""
    pts = [(u * spu, loss) for u, loss in curve]
    if not pts or t < pts[0][0] - 1e-9 or t > pts[-1][0] + 1e-9:
        return float("nan")
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t <= t1:
            return l0 + (l1 - l0) * (t - t0) / (t1 - t0) if t1 > t0 else l1
    return pts[-1][1]


def mean_std(xs: List[float]) -> Tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(runs: Dict[str, Dict[str, Dict[int, Dict]]]) -> Dict:
    """runs[setting][variant][seed] -> summary[setting][variant] of mean/std figures.

    Perplexities at equal updates (last validation, eval-lm) and at equal training time (the
    shortest total training time among the variants of that seed and setting)."""
    out = {}
    for setting, by_variant in runs.items():
        seeds = sorted({s for r in by_variant.values() for s in r})
        budget = {}
        for s in seeds:
            totals = [r[s]["curve"][-1][0] * r[s]["sec_per_update"] for r in by_variant.values() if s in r]
            totals = [t for t in totals if not math.isnan(t)]
            budget[s] = min(totals) if totals else float("nan")
        out[setting] = {}
        dense = by_variant.get("dense")
        for name, r in by_variant.items():
            ppl = [2 ** r[s]["curve"][-1][1] for s in sorted(r)]
            timed = [2 ** _at_time(r[s]["curve"], r[s]["sec_per_update"], budget[s]) for s in sorted(r)]
            ev = [r[s]["eval_ppl"] for s in sorted(r) if "eval_ppl" in r[s]]
            spu = [r[s]["sec_per_update"] for s in sorted(r)]
            out[setting][name] = {
                "seeds": sorted(r),
                "valid_ppl": mean_std(ppl),
                "valid_ppl_equal_time": mean_std(timed),
                "eval_ppl": mean_std(ev),
                "sec_per_update": mean_std(spu),
                "params": next((r[s]["params"] for s in r if r[s].get("params")), None),
                "valid_ppl_per_seed": ppl,
                # paired by seed (the seeds' spread is shared by all variants): ppl - dense's ppl
                "valid_ppl_minus_dense": mean_std(
                    [
                        2 ** r[s]["curve"][-1][1] - 2 ** dense[s]["curve"][-1][1]
                        for s in sorted(r)
                        if s in dense
                    ]
                )
                if dense
                else (float("nan"),) * 2,
            }
    return out


def _fmt(ms: Tuple[float, float], digits: int = 1) -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def table(summary: Dict, updates: int, eval_subset: str) -> str:
    head = (
        f"{'setting':<9} {'variant':<14} {'params':>9} {'seeds':>5} {f'valid ppl @{updates} upd':>18} "
        f"{'- dense (paired)':>15} {'valid ppl @equal time':>21} {f'{eval_subset} ppl (eval-lm)':>19} "
        f"{'ms/update':>10}"
    )
    lines = [head, "-" * len(head)]
    for setting, by_variant in summary.items():
        for name, s in by_variant.items():
            ms = (s["sec_per_update"][0] * 1000, s["sec_per_update"][1] * 1000)
            params = f"{s['params']:,}" if s["params"] else "-"
            lines.append(
                f"{setting:<9} {name:<14} {params:>9} {len(s['seeds']):>5} {_fmt(s['valid_ppl']):>18} "
                f"{_fmt(s['valid_ppl_minus_dense']):>15} {_fmt(s['valid_ppl_equal_time']):>21} "
                f"{_fmt(s['eval_ppl']):>19} "
                f"{_fmt(ms, 0):>10}"
            )
    return "\n".join(lines)


def markdown(summary: Dict, updates: int, eval_subset: str) -> str:
    """The table of :func:`table` in Markdown."""
    lines = [
        f"| setting | variant | params | seeds | valid ppl @{updates} updates | "
        "minus dense (paired by seed) | "
        f"valid ppl @equal time | {eval_subset} ppl (eval-lm) | ms/update |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, by_variant in summary.items():
        for name, s in by_variant.items():
            ms = (s["sec_per_update"][0] * 1000, s["sec_per_update"][1] * 1000)
            params = f"{s['params']:,}" if s["params"] else "-"
            lines.append(
                f"| {setting} | {name} | {params} | {len(s['seeds'])} | {_fmt(s['valid_ppl'])} | "
                f"{_fmt(s['valid_ppl_minus_dense'])} | "
                f"{_fmt(s['valid_ppl_equal_time'])} | {_fmt(s['eval_ppl'])} | {_fmt(ms, 0)} |"
            )
    return "\n".join(lines)


def plot(runs: Dict, path: Path) -> None:
    """Validation perplexity (mean over seeds, band = min..max) by updates and by training time."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in runs if runs[s]]
    if not settings:
        return
    fig, axes = plt.subplots(2, len(settings), figsize=(5.5 * len(settings), 7), squeeze=False)
    for j, setting in enumerate(settings):
        for name, r in runs[setting].items():
            seeds = sorted(r)
            xs = [u for u, _ in r[seeds[0]]["curve"]]
            ys = [[2 ** dict(r[s]["curve"]).get(u, float("nan")) for s in seeds] for u in xs]
            mean = [statistics.fmean(y) for y in ys]
            for i, x in enumerate(
                (xs, [u * statistics.fmean(r[s]["sec_per_update"] for s in seeds) for u in xs])
            ):
                ax = axes[i][j]
                (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{name} ({len(seeds)} seeds)")
                if len(seeds) > 1:
                    ax.fill_between(
                        x, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15
                    )
        for i, xlabel in enumerate(("updates", "training time (s)")):
            ax = axes[i][j]
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation perplexity")
            ax.set_title(setting)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def job_dir(a, variants: Dict[str, str], out: Path, setting: str, name: str, seed: int) -> Path:
    """The directory of a run; a scratch run that is the dense pretraining (same flags and updates) is
    that run."""
    if (
        setting == "scratch"
        and a.updates == a.pretrain_updates
        and shlex.split(variants[name]) == shlex.split(VARIANTS["dense"])
    ):
        setting = "pretrain"
    return out / setting / name / f"seed{seed}"


def job_cmd(a, variants: Dict[str, str], out: Path, setting: str, name: str, seed: int) -> List[str]:
    run_dir = job_dir(a, variants, out, setting, name, seed)
    if setting == "pretrain":
        return train_cmd(a, VARIANTS["dense"], run_dir, a.pretrain_updates, seed)
    up = out / "pretrain" / "dense" / f"seed{seed}" / "checkpoint_last.pt" if setting == "upcycled" else None
    return train_cmd(a, variants[name], run_dir, a.updates, seed, up)


def collect(a, variants: Dict[str, str], names: List[str], settings: List[str], out: Path) -> Dict:
    """Every finished run in ``out`` of these settings and variants with this invocation's options,
    whatever its seed (so that invocations sharing ``out`` with other seeds report them all)."""
    runs: Dict[str, Dict[str, Dict[int, Dict]]] = {s: {} for s in settings}
    for setting in settings:
        for name in names:
            seeds = sorted(
                {int(p.parent.name[4:]) for p in (out / setting / name).glob("seed*/result.json")}
                | {int(p.parent.name[4:]) for p in (out / "pretrain" / "dense").glob("seed*/result.json")}
            )
            for seed in seeds:
                path = job_dir(a, variants, out, setting, name, seed) / "result.json"
                if not path.exists():
                    continue
                res = json.loads(path.read_text())
                cmd = job_cmd(a, variants, out, setting, name, seed)
                if not same_run(res["key"], run_key(cmd)):
                    continue
                if "resolved" not in res and not a.reuse_unchecked:
                    log(f"left out {path.parent}: its defaults cannot be checked (--reuse-unchecked)")
                    continue
                if resolved_differences(res.get("resolved"), resolved_options(cmd))[0]:
                    log(f"left out {path.parent}: made under other defaults of the plugin")
                    continue
                runs[setting].setdefault(name, {})[seed] = res
    return runs


# ---- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meo_fairseq.benchmark quality",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="data-bin of scripts/prepare_wikitext.sh")
    p.add_argument("--out", default=str(REPO / "runs" / "quality"), help="runs, results.json, curves.png")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..S")
    p.add_argument("--seed-list", default=None, help="comma-separated seeds (instead of --seeds)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to run")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="add or replace a variant, "
        "e.g. moe_nonoise='--moe-mode moe --moe-level token --no-moe-gate-noise'",
    )
    p.add_argument("--settings", default=",".join(SETTINGS), help="scratch, upcycled or both")
    p.add_argument(
        "--args", default="", help="extra fairseq-train options for every run (the dense pretraining too)"
    )
    p.add_argument("--expert-args", default="", help="extra fairseq-train options for every run with experts")
    p.add_argument("--arch", default="meo_transformer_lm_tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--segment-length", type=int, default=32)
    p.add_argument("--updates", type=int, default=600, help="updates of every compared run")
    p.add_argument(
        "--pretrain-updates", type=int, default=600, help="updates of the dense checkpoint to upcycle"
    )
    p.add_argument("--valid-every", type=int, default=100, help="validate and save every N updates")
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--upcycle-lr", type=float, default=1e-3, help="learning rate of the upcycled continuation"
    )
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--eval-subset", default="test", help="fairseq-eval-lm subset ('' to skip)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per fairseq process")
    p.add_argument(
        "--report", action="store_true", help="run nothing: the table of the finished runs in --out"
    )
    p.add_argument(
        "--reuse-unchecked",
        action="store_true",
        help="reuse (and report) finished runs made before runs recorded their options with every "
        "default resolved: whether the plugin's defaults changed since cannot be checked for them "
        "(without this flag such a run stops the study)",
    )
    p.add_argument("--verbose", action="store_true", help="show fairseq's output")
    p.add_argument(
        "--progress", action="store_true", help="show fairseq's progress lines (train_inner, valid)"
    )
    return p


def write_results(a, variants: dict, names: list, runs: list, out: Path) -> None:
    """results.json (options, variants, summary, every run) and curves.png of the runs so far."""
    doc = {
        "options": {k: str(v) for k, v in vars(a).items()},
        "variants": {v: variants[v] for v in names},
        "summary": summarize(runs),
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    plot(runs, out / "curves.png")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    a.data = Path(a.data).resolve()
    if not (a.data / "dict.txt").is_file():
        raise SystemExit(f"--data: no dict.txt in {a.data}; prepare it with scripts/prepare_wikitext.sh")
    for flag, n in (("--updates", a.updates), ("--pretrain-updates", a.pretrain_updates)):
        if n <= 0 or n % a.valid_every:
            raise SystemExit(f"{flag} {n}: must be a positive multiple of --valid-every {a.valid_every}")
    if a.valid_every % a.log_interval:
        raise SystemExit(
            f"--valid-every {a.valid_every}: must be a multiple of --log-interval {a.log_interval}"
        )
    variants = dict(VARIANTS)
    try:
        variants.update(parse_variant(v) for v in a.variant)
    except ValueError as e:
        raise SystemExit(str(e))
    names = [v for v in a.variants.split(",") if v]
    for v in names:
        if v not in variants:
            raise SystemExit(
                f"--variants: unknown variant {v!r}; known: {', '.join(variants)} (add one with --variant)"
            )
    settings = [s for s in a.settings.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    seeds = [int(s) for s in a.seed_list.split(",")] if a.seed_list else list(range(1, a.seeds + 1))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    jobs = []  # (setting, variant, seed) in order: a whole seed at a time, so that partial results are tables
    for seed in seeds:
        for setting in settings:
            if setting == "upcycled":
                jobs.append(("pretrain", "dense", seed))
            jobs += [(setting, v, seed) for v in names]
    t_start = time.time()
    for i, (setting, name, seed) in enumerate([] if a.report else jobs):
        label = f"[{i + 1}/{len(jobs)}] {setting}/{name} seed {seed}"
        run_dir = job_dir(a, variants, out, setting, name, seed)
        cmd = job_cmd(a, variants, out, setting, name, seed)
        run_one(a, name, cmd, run_dir, a.pretrain_updates if setting == "pretrain" else a.updates, label)
        if setting != "pretrain":
            write_results(a, variants, names, collect(a, variants, names, settings, out), out)
    runs = collect(a, variants, names, settings, out)
    if a.report:
        write_results(a, variants, names, runs, out)
    (out / "results.md").write_text(markdown(summarize(runs), a.updates, a.eval_subset or "-") + "\n")
    log(f"done in {time.time() - t_start:.0f} s")
    print("\n" + table(summarize(runs), a.updates, a.eval_subset or "-"))
    print(f"\nnumbers: {out / 'results.json'}; curves: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
