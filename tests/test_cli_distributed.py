"""Data-parallel training of a tiny MEO language model with two CPU processes (gloo).

One process per rank runs fairseq's train entry point through tests/dist_train_driver.py, which
dumps the model's parameters before the first and after the last update on every rank: the two
ranks must end with exactly the same parameters, different from the initial ones.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_utils import ADAM, LM_COMMON, MOE_SMALL, REPO, TIMEOUT, USER_DIR, env, finite, free_port, train_inner

MAX_UPDATE = 4
WORLD = 2


@pytest.fixture(scope="module")
def two_ranks(lm_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = free_port()
    procs = []
    for rank in range(WORLD):
        args = [
            lm_bin,
            "--user-dir",
            USER_DIR,
            "--arch",
            "meo_transformer_lm_tiny",
            "--criterion",
            "moe_cross_entropy",
            "--moe-mode",
            "meo",
            "--moe-level",
            "sequence",
            *MOE_SMALL,
            "--moe-segment-length",
            "16",
            *LM_COMMON,
            *ADAM,
            "--max-update",
            MAX_UPDATE,
            "--no-save",
            "--distributed-backend",
            "gloo",
            "--ddp-backend",
            "legacy_ddp",
            "--distributed-init-method",
            f"tcp://127.0.0.1:{port}",
            "--distributed-no-spawn",
            "--distributed-rank",
            rank,
            "--distributed-world-size",
            WORLD,
        ]
        cmd = [sys.executable, str(REPO / "tests" / "dist_train_driver.py"), str(out), *map(str, args)]
        log = open(out / f"rank{rank}.log", "w")
        procs.append(
            (cmd, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=str(out)))
        )
    try:
        # wait for both; when one rank fails, the other would block in a collective: stop it
        start, failed_at = time.time(), None
        while any(p.poll() is None for _, _, p in procs) and time.time() - start < TIMEOUT:
            if failed_at is None and any(p.poll() not in (None, 0) for _, _, p in procs):
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > 10:
                break
            time.sleep(0.1)
    finally:
        for _cmd, log, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [(out / f"rank{r}.log").read_text(errors="replace") for r in range(WORLD)]
    return out, [(cmd, p.returncode, log) for (cmd, _, p), log in zip(procs, logs)]


def _load(out: Path, rank: int, tag: str):
    return torch.load(out / f"rank{rank}.{tag}.pt", map_location="cpu", weights_only=True)


def test_two_process_training_ends_with_identical_parameters(two_ranks):
    out, ranks = two_ranks
    for cmd, returncode, log in ranks:
        assert returncode == 0, f"$ {' '.join(cmd)}\n(exit {returncode})\n{log[-6000:]}"
    logs = [log for _, _, log in ranks]
    assert "training on 2 devices" in logs[0], logs[0][-3000:]
    rows = train_inner(logs[0])
    assert [r["num_updates"] for r in rows] == list(range(1, MAX_UPDATE + 1))
    assert all(finite(r["loss"]) for r in rows), rows
    assert "moe_balance" in rows[-1] and "moe_entropy" in rows[-1]

    init0, init1 = _load(out, 0, "initial"), _load(out, 1, "initial")
    fin0, fin1 = _load(out, 0, "final"), _load(out, 1, "final")
    assert set(fin0) == set(fin1) == set(init0) == set(init1)
    assert any(".router." in k for k in fin0), sorted(fin0)[:20]
    assert any("experts.weight" in k for k in fin0)
    for k in fin0:
        assert torch.equal(init0[k], init1[k]), f"ranks start from different values of {k}"
        assert torch.equal(fin0[k], fin1[k]), (
            f"ranks end with different values of {k}: "
            f"max diff {(fin0[k].float() - fin1[k].float()).abs().max()}"
        )
    changed = [k for k in fin0 if fin0[k].is_floating_point() and not torch.equal(fin0[k], init0[k])]
    # every trained tensor moved (embeddings, attention, experts, routers)
    assert any("experts.weight" in k for k in changed)
    assert any(".router.w_gate" in k for k in changed), "router gates never trained"
    assert any("embed_tokens" in k for k in changed)
