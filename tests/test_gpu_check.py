"""scripts/gpu_check.sh, the GPU machine's one command, checked here without a GPU: its --dry-run
runs every step at toy sizes on the CPU; its budget skips the steps that would start too late."""

import os
import re
import subprocess
import sys

import pytest
import torch
from cli_utils import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ("layers", "tests", "model", "compiled")


def _check(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable)  # the Python of these tests, with fairseq
    cmd = ["bash", str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def test_dry_run_runs_every_step(tmp_path):
    p = _check("--dry-run", "--out", tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in STEPS:
        assert re.search(rf"^\[gpu_check\] {step}: exit 0 after \d+s$", summary, re.M), summary
    assert "fairseq 0.12.3" in (tmp_path / "env.txt").read_text()
    layers = (tmp_path / "layers.txt").read_text()
    # op counts of the run's and the reference implementation; no graph break in any variant
    rows = re.findall(r"^\s+(\S+)\s+\d+ /\s+\d+ .*graphs (\d+), breaks (\d+)$", layers, re.M)
    assert sorted(v for v, _, _ in rows) == ["dense", "meo", "meo-token", "moe-token"]
    assert all(b == "0" for _, _, b in rows)
    for name, extra in (("model", ""), ("compiled", ", --moe-compile")):
        text = (tmp_path / f"{name}.txt").read_text()
        assert f"4 updates, fp32{extra} (" in text
        wps = dict(re.findall(r"^xsum\s+meo_transformer_tiny\s+(\w+)\s+(\d+)", text, re.M))
        assert wps.keys() == {"dense", "meo"} and all(int(v) > 0 for v in wps.values())
    tests = (tmp_path / "tests.txt").read_text()
    assert re.search(r"\d+ skipped", tests) and "failed" not in tests and "error" not in tests


def test_budget_skips_late_steps_and_bad_options(tmp_path):
    p = _check("--dry-run", "--out", tmp_path, "--budget", 30)
    assert p.returncode == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert [s for s in STEPS if f"{s}: skipped" in summary] == list(STEPS)
    p = _check("--dry-run", "--out", tmp_path / "one", "--steps", "tests")  # one step alone
    assert p.returncode == 0
    summary = (tmp_path / "one" / "summary.txt").read_text()
    assert "tests: exit 0" in summary and not any(s in summary for s in ("layers", "model", "compiled"))
    bad_options = ((["--nope"], "unknown option '--nope'"), (["--budget", "5m"], "whole seconds"))
    for bad, message in bad_options + ((["--steps", "tests,nope"], "unknown step 'nope'"),):
        p = _check(*bad)
        assert p.returncode == 2 and message in p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_a_gpu_it_stops_at_once(tmp_path):
    p = _check("--out", tmp_path, timeout=120)
    assert p.returncode == 1
    assert "torch sees no CUDA GPU" in (tmp_path / "summary.txt").read_text()
