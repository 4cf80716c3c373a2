"""Helpers for the command-line end-to-end tests (tests/test_cli_*.py).

Every fairseq tool runs in a subprocess as ``sys.executable -m fairseq_cli.<tool>`` (so the tests
work from any virtualenv with fairseq installed), with ``--user-dir meo_fairseq`` where the plugin
is needed. The parsers read what a user sees: fairseq's progress lines, eval-lm's summary and
per-token log-probabilities, generate/interactive ``H-``/``S-``/``T-`` lines.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "meo_fairseq")
DATA = REPO / "tests" / "data"
TIMEOUT = 300

# Tiny-model settings shared by the tests.
TINY_RUN = ["--max-tokens", "1024", "--cpu", "--num-workers", "0", "--seed", "1"]
TINY_RUN += ["--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints"]
LM_COMMON = ["--task", "language_modeling", "--tokens-per-sample", "64", *TINY_RUN]
MOE_SMALL = ["--moe-experts", "4", "--moe-top-k", "2"]
ADAM = ["--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "fixed"]
SGD_LR0 = ["--optimizer", "sgd", "--lr", "0"]  # 1 update with lr 0: the weights stay put


def gpu_args(args: Sequence) -> list:
    """Shared settings above without their --cpu (tests/test_gpu.py)."""
    return [a for a in args if a != "--cpu"]


def env() -> Dict[str, str]:
    e = dict(os.environ)
    # tiny models: one thread per process is faster than two on a 2-core machine, and two
    # processes (distributed test, concurrent failure checks) do not oversubscribe the cores
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("MKL_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def command(tool: str, args: Sequence) -> List[str]:
    """``python -m fairseq_cli.<tool> args...`` (tool: train, preprocess, generate, ...); a dotted
    tool is a module of its own (``meo_fairseq.train``)."""
    return [sys.executable, "-m", tool if "." in tool else f"fairseq_cli.{tool}", *map(str, args)]


@dataclass
class Result:
    cmd: List[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def log(self) -> str:
        return self.stdout + "\n" + self.stderr

    def describe(self, tail: int = 6000) -> str:
        return f"$ {' '.join(self.cmd)}\n(exit {self.returncode})\n{self.log[-tail:]}"


def run(tool: str, args: Sequence, *, cwd=None, input: Optional[str] = None, check: bool = True) -> Result:
    cmd = command(tool, args)
    p = subprocess.run(cmd, cwd=cwd, input=input, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    res = Result(cmd, p.returncode, p.stdout, p.stderr)
    if check and p.returncode != 0:
        raise AssertionError(f"fairseq {tool} failed:\n{res.describe()}")
    return res


def run_many(jobs: Sequence[tuple], *, cwd=None) -> List[Result]:
    """Run several (tool, args) at once (for the short runs that fail at model build)."""
    procs = []
    for tool, args in jobs:
        cmd = command(tool, args)
        procs.append(
            (
                cmd,
                subprocess.Popen(
                    cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
                ),
            )
        )
    out = []
    for cmd, p in procs:
        so, se = p.communicate(timeout=TIMEOUT)
        out.append(Result(cmd, p.returncode, so, se))
    return out


WORKERS = int(os.environ.get("MEO_CLI_TEST_WORKERS", 0)) or max(1, min(4, os.cpu_count() or 1))


def parallel(fns: Sequence[Callable], workers: int = WORKERS) -> list:
    """Call the functions (each runs fairseq tools one after the other) on ``workers`` threads;
    their results in order. Independent runs share the cores this way (one thread each)."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(f) for f in fns]
        return [f.result() for f in futures]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- preprocessing ----------------------------------------------------------------------


def preprocess_lm(dest: Path) -> Path:
    """Binarize tests/data/wikitext-2 (only-source, words seen twice or more)."""
    src = DATA / "wikitext-2"
    run(
        "preprocess",
        [
            "--only-source",
            "--trainpref",
            src / "wiki.train.tokens",
            "--validpref",
            src / "wiki.valid.tokens",
            "--testpref",
            src / "wiki.test.tokens",
            "--destdir",
            dest,
            "--thresholdsrc",
            "2",
            "--workers",
            "1",
        ],
    )
    return dest


def write_seq2seq_text(out: Path, src_words: int = 60, tgt_words: int = 20) -> None:
    """Word-level {train,valid,test}.{src,tgt}: the first words of each xsum-format document
    and summary, lower-cased."""
    out.mkdir(parents=True, exist_ok=True)
    for split, fname in (("train", "train.jsonl"), ("valid", "validation.jsonl"), ("test", "test.jsonl")):
        src_lines, tgt_lines = [], []
        with open(DATA / "xsum" / fname, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                ex = json.loads(line)
                src = ex["document"].lower().split()[:src_words]
                tgt = ex["summary"].lower().split()[:tgt_words]
                if src and tgt:
                    src_lines.append(" ".join(src))
                    tgt_lines.append(" ".join(tgt))
        (out / f"{split}.src").write_text("\n".join(src_lines) + "\n", encoding="utf-8")
        (out / f"{split}.tgt").write_text("\n".join(tgt_lines) + "\n", encoding="utf-8")


def preprocess_seq2seq(text: Path, dest: Path) -> Path:
    run(
        "preprocess",
        [
            "--source-lang",
            "src",
            "--target-lang",
            "tgt",
            "--trainpref",
            text / "train",
            "--validpref",
            text / "valid",
            "--testpref",
            text / "test",
            "--destdir",
            dest,
            "--joined-dictionary",
            "--thresholdsrc",
            "2",
            "--workers",
            "1",
        ],
    )
    return dest


def dict_size(data_bin: Path, name: str = "dict.txt") -> int:
    """Size of the fairseq dictionary: the file's entries plus the 4 special symbols."""
    with open(Path(data_bin) / name, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) + 4


# ---- parsing ----------------------------------------------------------------------------

_NUM = r"(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)"


def _number(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if re.fullmatch(r"[-+]?\d+", v) else f


def train_inner(log: str) -> List[dict]:
    """The ``train_inner`` progress lines (--log-format simple), as dicts of numbers."""
    rows = []
    for line in log.splitlines():
        if "| train_inner |" not in line:
            continue
        stats = line.split("| train_inner |", 1)[1]
        row = {k: _number(v) for k, v in re.findall(r"([A-Za-z_]\w*)=(" + _NUM + r")", stats)}
        rows.append(row)
    return rows


def _pipe_stats(line: str) -> dict:
    row = {}
    for part in line.split("|"):
        m = re.fullmatch(r"\s*([A-Za-z_][\w]*) (" + _NUM + r")\s*", part)
        if m:
            row[m.group(1)] = _number(m.group(2))
    return row


def valid_stats(log: str, subset: str = "valid") -> List[dict]:
    """Validation lines of fairseq-train: ``| valid | epoch 001 | valid on 'valid' subset | loss ...``."""
    return [_pipe_stats(line) for line in log.splitlines() if f"valid on '{subset}' subset" in line]


def train_epoch_stats(log: str) -> List[dict]:
    """End-of-epoch lines ``| train | epoch 001 | loss ... | num_updates N``."""
    return [_pipe_stats(line) for line in log.splitlines() if re.search(r"\| train \| epoch \d+", line)]


@dataclass
class EvalLM:
    loss: float
    """the ``Loss (base 2)`` line (4 decimals)"""
    ppl: float
    tokens: int
    """``Evaluated N tokens``"""
    precise_loss: Optional[float] = None
    """-mean of the per-token log-probs printed by --output-word-probs (6 decimals each), in base 2"""
    word_count: int = 0


def eval_lm(log: str) -> EvalLM:
    m = re.findall(r"Loss \(base 2\): (" + _NUM + r"), Perplexity: (" + _NUM + r")", log)
    assert m, f"no eval-lm loss line in:\n{log[-3000:]}"
    loss, ppl = float(m[-1][0]), float(m[-1][1])
    t = re.findall(r"Evaluated ([\d,]+) tokens", log)
    tokens = int(t[-1].replace(",", "")) if t else 0
    total, count = 0.0, 0
    for line in log.splitlines():
        wm = re.search(r"fairseq_cli\.eval_lm\s*[:|]\s*(\d+) (.*\[" + _NUM + r"\].*)$", line)
        if not wm:
            continue
        for entry in wm.group(2).split("\t"):
            pm = re.search(r" \[(" + _NUM + r")\]$", entry)
            if pm:
                total += float(pm.group(1))
                count += 1
    precise = -total / count / math.log(2) if count else None
    return EvalLM(loss, ppl, tokens, precise, count)


def hypotheses(log: str, prefix: str = "H") -> Dict[int, tuple]:
    """``H-<id>\\t<score>\\t<text>`` lines of generate/interactive -> {id: (score, text)}."""
    out = {}
    for line in log.splitlines():
        m = re.match(prefix + r"-(\d+)\t(" + _NUM + r")\t?(.*)$", line)
        if m:
            out[int(m.group(1))] = (float(m.group(2)), m.group(3))
    return out


def sources(log: str, prefix: str = "S") -> Dict[int, str]:
    """``S-<id>\\t<text>`` (or ``T-``) lines -> {id: text}."""
    out = {}
    for line in log.splitlines():
        m = re.match(prefix + r"-(\d+)\t(.*)$", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---- a run to kill ----------------------------------------------------------------------


def train_until_then_kill(
    args: Sequence, log_path: Path, until, *, cwd=None, poll: float = 0.02, timeout: float = TIMEOUT
) -> str:
    """Start fairseq-train, wait until ``until(log_text)`` is true, SIGKILL the process (still
    running) and return its log. Fails if the run ended on its own first."""
    cmd = command("train", args)
    with open(log_path, "w") as logf:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT, env=env())
        start = time.time()
        try:
            while True:
                text = Path(log_path).read_text(errors="replace")
                if until(text):
                    break
                if p.poll() is not None:
                    raise AssertionError(
                        f"training ended (exit {p.returncode}) before the kill point:\n{text[-4000:]}"
                    )
                if time.time() - start > timeout:
                    raise AssertionError(f"kill point not reached in {timeout}s:\n{text[-4000:]}")
                time.sleep(poll)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got exit {p.returncode}"
    return Path(log_path).read_text(errors="replace")
