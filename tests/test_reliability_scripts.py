"""Reliability of the train/eval scripts (issue 18): one run per --save-dir, eval scripts refuse a
checkpoint trained with another dictionary, and say why fairseq failed.

Tiny models on tests/data (meo_transformer_lm_tiny / meo_transformer_tiny, a few updates).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_utils import (
    ADAM,
    LM_COMMON,
    MOE_SMALL,
    USER_DIR,
    preprocess_seq2seq,
    run,
    write_seq2seq_text,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TINY_LM = ["--arch", "meo_transformer_lm_tiny", "--tokens-per-sample", "64", "--max-tokens", "1024",
           "--update-freq", "1", "--moe-experts", "4", "--moe-top-k", "2", "--warmup-updates", "1",
           "--num-workers", "0"]  # fmt: skip


def env():
    e = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("MEO_NUM_GPUS", "MEO_BF16", "MEO_LAUNCHER", "MEO_TORCHRUN_ARGS"):
        e.pop(key, None)
    return e


def script(name, *args, timeout=300):
    return subprocess.run(["bash", str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=str(REPO), timeout=timeout)  # fmt: skip


def swap_first_entries(src: Path, dst: Path, name: str) -> None:
    """dst = a copy of the data dir src whose dictionary ``name`` has its first two entries
    swapped: same size, other words."""
    shutil.copytree(src, dst)
    lines = (dst / name).read_text(encoding="utf-8").splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    (dst / name).write_text("".join(lines), encoding="utf-8")


# ---- item 4: one training run per --save-dir ---------------------------------------------------


def test_second_run_in_the_same_save_dir_is_refused(lm_bin, tmp_path):
    save = tmp_path / "ckpt"
    lock = save / ".train.lock"
    args = ["--data", lm_bin, "--save-dir", save, *TINY_LM, "--cpu"]
    first = subprocess.Popen(["bash", str(SCRIPTS / "train_wikitext.sh"), *map(str, args),
                              "--max-update", "100000"],
                             env=env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()) and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        second = script("train_wikitext.sh", *args, "--max-update", 1)
        assert second.returncode != 0, second.stderr
        assert (
            "another training run holds --save-dir" in second.stderr
            and f"pid {first.pid} on " in second.stderr
        ), second.stderr
        assert "command:" in second.stderr and "Preparing to load" not in second.stderr + second.stdout
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as a crashed or killed job: no clean-up runs
        first.wait()
    # the lock died with its process: a new run takes the save dir
    third = script("train_wikitext.sh", *args, "--max-update", 1, "--disable-validation")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"pid {first.pid} " not in lock.read_text()


def test_dry_run_takes_no_lock(lm_bin, tmp_path):
    res = script("train_wikitext.sh", "--data", lm_bin, "--save-dir", tmp_path / "ckpt", "--dry-run")
    assert res.returncode == 0 and not (tmp_path / "ckpt").exists(), res.stderr


# ---- items 3 and 10: eval scripts -----------------------------------------------------------


@pytest.fixture(scope="module")
def lm_ckpt(lm_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("lmck") / "ckpt"
    run("train", [lm_bin, "--user-dir", USER_DIR, "--arch", "meo_transformer_lm_tiny",
                  "--criterion", "moe_cross_entropy", *MOE_SMALL, *LM_COMMON, *ADAM, "--max-update", 2,
                  "--save-dir", save, "--disable-validation"])  # fmt: skip
    return save / "checkpoint_last.pt"


def test_eval_wikitext_refuses_another_dictionary(lm_bin, lm_ckpt, tmp_path):
    swapped = tmp_path / "swapped"
    swap_first_entries(lm_bin, swapped, "dict.txt")
    res = script("eval_wikitext.sh", "--data", swapped, "--checkpoint", lm_ckpt, "--out", tmp_path / "ev",
                 "--tokens-per-sample", 64, "--cpu")  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    msg = res.stderr.strip().splitlines()[-1]
    print(msg)
    assert msg.startswith("eval_wikitext.sh: error: dictionary mismatch"), msg
    assert str(swapped / "dict.txt") in msg and str(lm_bin / "dict.txt") in msg and str(lm_ckpt) in msg
    assert not (tmp_path / "ev" / "ppl.json").exists()


def test_eval_wikitext_says_why_fairseq_failed(lm_bin, lm_ckpt, tmp_path):
    res = script("eval_wikitext.sh", "--data", lm_bin, "--checkpoint", lm_ckpt, "--out", tmp_path / "ev",
                 "--tokens-per-sample", 64, "--cpu", "--no-such-option")  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    msg = res.stderr.strip().splitlines()[-1]
    print(msg)
    assert (
        msg.startswith("eval_wikitext.sh: error: fairseq-eval-lm failed: ") and "--no-such-option" in msg
    ), msg
    assert not (tmp_path / "ev" / "ppl.json").exists()


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    """A tiny seq2seq data dir laid out like prepare_xsum.sh's, and a checkpoint trained on it."""
    root = tmp_path_factory.mktemp("s2s")
    write_seq2seq_text(root / "text")
    data = preprocess_seq2seq(root / "text", root / "bin")
    n = len((root / "text" / "test.tgt").read_text(encoding="utf-8").splitlines())
    (data / "test.id").write_text("".join(f"{i}\n" for i in range(n)))
    shutil.copy(root / "text" / "test.tgt", data / "test.tgt.raw")
    save = root / "ckpt"
    run("train", [data, "--user-dir", USER_DIR, "--arch", "meo_transformer_tiny", "--task", "translation",
                  "--source-lang", "src", "--target-lang", "tgt", *MOE_SMALL,
                  "--criterion", "moe_cross_entropy", *ADAM, "--max-tokens", 1024, "--max-update", 1, "--cpu",
                  "--num-workers", 0,
                  "--save-dir", save, "--disable-validation", "--no-epoch-checkpoints"])  # fmt: skip
    return data, save / "checkpoint_last.pt"


def test_eval_xsum_refuses_another_dictionary_and_says_why_generate_failed(seq2seq, tmp_path):
    data, ckpt = seq2seq
    swapped = tmp_path / "swapped"
    swap_first_entries(data, swapped, "dict.tgt.txt")
    common = ["--checkpoint", ckpt, "--cpu", "--beam", 1, "--max-len-b", 5, "--min-len", 1]
    bad_dict = script("eval_xsum.sh", "--data", swapped, "--out", tmp_path / "a", *common)
    assert bad_dict.returncode == 2, bad_dict.stderr[-3000:]
    msg = bad_dict.stderr.strip().splitlines()[-1]
    print(msg)
    assert (
        "error: dictionary mismatch" in msg
        and str(swapped / "dict.tgt.txt") in msg
        and str(data / "dict.tgt.txt") in msg
    )
    assert str(swapped / "dict.src.txt") not in msg  # that one is the training dictionary
    failed = script("eval_xsum.sh", "--data", data, "--out", tmp_path / "b", *common, "--no-such-option")
    assert failed.returncode == 2, failed.stderr[-3000:]
    msg = failed.stderr.strip().splitlines()[-1]
    print(msg)
    assert re.match(r"eval_xsum\.sh: error: fairseq-generate failed: .*--no-such-option", msg), msg
    ok = script("eval_xsum.sh", "--data", data, "--out", tmp_path / "c", *common)
    assert ok.returncode == 0 and (tmp_path / "c" / "rouge.json").is_file(), ok.stderr[-3000:]
