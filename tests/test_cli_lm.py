"""Language modeling from the command line: fairseq-train + fairseq-eval-lm with the plugin.

Covers every --moe-mode / --moe-level with causal (segment, prefix) routing and both expert units,
the MEO = MoE exactness a user can check with --model-overrides, upcycling from dense checkpoints
(fairseq's transformer_lm and the plugin's dense mode), resuming after a SIGKILL, and option
errors at model build. All models are tiny (meo_transformer_lm_tiny, 4 experts, top-2) trained
for a few updates on tests/data/wikitext-2.
"""

import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from cli_utils import (
    ADAM,
    LM_COMMON,
    MOE_SMALL,
    REPO,
    SGD_LR0,
    USER_DIR,
    EvalLM,
    dict_size,
    eval_lm,
    finite,
    parallel,
    run,
    run_many,
    train_epoch_stats,
    train_inner,
    train_until_then_kill,
    valid_stats,
)

MAX_UPDATE = 12  # one epoch of the training slice at 1024 tokens per batch
ARCH = ["--arch", "meo_transformer_lm_tiny", "--criterion", "moe_cross_entropy"]

# name -> --moe-* options. Segment/prefix lengths are below --tokens-per-sample 64, so every
# sequence has several routing runs (the first one on the learned default gate).
LM_RUNS = {
    "dense": ["--moe-mode", "dense"],
    "moe_token": ["--moe-mode", "moe", "--moe-level", "token", *MOE_SMALL, "--no-moe-gate-noise"],
    "moe_sequence_ffn": [
        "--moe-mode",
        "moe",
        "--moe-level",
        "sequence",
        "--moe-expert-unit",
        "ffn",
        *MOE_SMALL,
        "--moe-decoder-routing",
        "segment",
        "--moe-segment-length",
        "16",
        "--moe-balance-loss",
        "switch",
        "--moe-z-loss-weight",
        "0.001",
    ],
    "meo_sequence": [
        "--moe-mode",
        "meo",
        "--moe-level",
        "sequence",
        *MOE_SMALL,
        "--moe-segment-length",
        "16",
    ],
    "meo_token_prefix_ffn": [
        "--moe-mode",
        "meo",
        "--moe-level",
        "token",
        "--moe-expert-unit",
        "ffn",
        *MOE_SMALL,
        "--moe-decoder-routing",
        "prefix",
        "--moe-prefix-length",
        "24",
        "--moe-gate-noise",
    ],
}


@dataclass
class Trained:
    save_dir: Path
    log: str
    ev: EvalLM

    @property
    def checkpoint(self) -> Path:
        return self.save_dir / "checkpoint_last.pt"


def eval_lm_cmd(data_bin, checkpoint, *extra):
    return [
        data_bin,
        "--user-dir",
        USER_DIR,
        "--path",
        checkpoint,
        "--gen-subset",
        "test",
        "--tokens-per-sample",
        "64",
        "--max-tokens",
        "2048",
        "--cpu",
        "--num-workers",
        "0",
        "--output-word-probs",
        *extra,
    ]


def evaluate(data_bin, checkpoint, *extra) -> EvalLM:
    ev = eval_lm(run("eval_lm", eval_lm_cmd(data_bin, checkpoint, *extra)).log)
    assert ev.tokens > 1000 and ev.word_count == ev.tokens, ev
    return ev


# fairseq's own `transformer_lm` at the sizes of meo_transformer_lm_tiny (the upcycling source)
TRANSFORMER_LM = [
    "--arch",
    "transformer_lm",
    "--criterion",
    "cross_entropy",
    "--decoder-embed-dim",
    "64",
    "--decoder-input-dim",
    "64",
    "--decoder-output-dim",
    "64",
    "--decoder-ffn-embed-dim",
    "256",
    "--decoder-layers",
    "2",
    "--decoder-attention-heads",
    "4",
]


def train_and_evaluate(lm_bin, save: Path, model_args) -> Trained:
    args = [lm_bin, *model_args, *LM_COMMON, *ADAM, "--max-update", MAX_UPDATE, "--save-dir", save]
    log = run("train", args).log
    return Trained(save, log, evaluate(lm_bin, save / "checkpoint_last.pt"))


@pytest.fixture(scope="session")
def lm_models(lm_bin, tmp_path_factory):
    """name -> Trained for every LM_RUNS entry and "transformer_lm", trained side by side."""
    root = tmp_path_factory.mktemp("lm_runs")
    jobs = {name: ["--user-dir", USER_DIR, *ARCH, *opts] for name, opts in LM_RUNS.items()}
    jobs["transformer_lm"] = TRANSFORMER_LM
    results = parallel([partial(train_and_evaluate, lm_bin, root / name, a) for name, a in jobs.items()])
    return dict(zip(jobs, results))


# ---- 1. train + eval-lm for every mode ------------------------------------------------------


@pytest.mark.parametrize("name", list(LM_RUNS))
def test_lm_train_and_eval(lm_bin, lm_models, name):
    t = lm_models[name]
    uniform = math.log2(dict_size(lm_bin))
    rows = train_inner(t.log)
    assert [r["num_updates"] for r in rows] == list(range(1, MAX_UPDATE + 1)), t.log[-3000:]
    losses = [r["loss"] for r in rows]
    assert all(finite(x) for x in losses), losses
    # loss decreases: the last updates are well below update 1 (itself about uniform)
    assert max(losses[-3:]) < losses[0] - 1.0, losses
    assert losses[0] < uniform + 1.5, (losses[0], uniform)
    valid = valid_stats(t.log)[-1]
    assert finite(valid["loss"]) and valid["loss"] < uniform - 2.0, valid
    assert valid["num_updates"] == MAX_UPDATE
    # eval-lm on the test split: finite and far below the uniform log2(V)
    assert finite(t.ev.loss) and t.ev.loss < uniform - 2.0, (t.ev, uniform)
    assert abs(t.ev.precise_loss - t.ev.loss) < 6e-5, t.ev  # the word-prob parse matches the summary
    assert t.ev.ppl == pytest.approx(2**t.ev.loss, rel=1e-3)

    if name == "dense":
        assert not any(k.startswith("moe_") for k in rows[-1]), rows[-1]
        return
    n_exp = 4
    for r in rows + [valid]:
        for key in ("moe_balance", "moe_max_frac", "moe_entropy", "moe_aux"):
            assert key in r and finite(r[key]), (key, r)
        assert r["moe_balance"] >= 0 and r["moe_aux"] >= 0
        # fraction of gate mass on the busiest expert and entropy of the expert distribution
        assert 1.0 / n_exp - 1e-3 <= r["moe_max_frac"] <= 1.0, r
        assert 0.0 <= r["moe_entropy"] <= math.log(n_exp) + 1e-3, r
    if name == "moe_sequence_ffn":
        assert all(r["moe_z_loss"] > 0 for r in rows), rows  # --moe-z-loss-weight 0.001
    else:
        assert all(r["moe_z_loss"] == 0 for r in rows)
    epoch = train_epoch_stats(t.log)[-1]
    assert epoch["num_updates"] == MAX_UPDATE and "moe_entropy" in epoch


# ---- 3. MEO evaluated as MoE (same function for linear experts) ----------------------------


def test_meo_checkpoint_evaluated_as_moe_gives_the_same_loss(lm_bin, lm_models):
    t = lm_models["meo_sequence"]
    as_moe, top1 = parallel(
        [
            partial(evaluate, lm_bin, t.checkpoint, "--model-overrides", "{'moe_mode': 'moe'}"),
            partial(
                evaluate, lm_bin, t.checkpoint, "--model-overrides", "{'moe_mode': 'moe', 'moe_top_k': 1}"
            ),
        ]
    )
    print(
        f"eval-lm loss: MEO {t.ev.precise_loss:.6f} ({t.ev.loss}), "
        f"MEO-as-MoE {as_moe.precise_loss:.6f} ({as_moe.loss})"
    )
    assert abs(as_moe.precise_loss - t.ev.precise_loss) < 1e-3, (t.ev, as_moe)
    assert abs(as_moe.loss - t.ev.loss) < 1e-3
    # the override does reach the model: top-1 routing changes the function
    assert abs(top1.precise_loss - t.ev.precise_loss) > 1e-3, (t.ev, top1)


# ---- 4. upcycling ---------------------------------------------------------------------------

UPCYCLE = {
    "meo": ["--moe-mode", "meo", "--moe-level", "sequence", "--moe-segment-length", "16"],
    "moe_token": ["--moe-mode", "moe", "--moe-level", "token"],
    "meo_token_compressed": [
        "--moe-mode",
        "meo",
        "--moe-level",
        "token",
        "--moe-segment-length",
        "16",
        "--moe-compressed-experts",
        "1",
    ],
}


def upcycle(lm_bin, dense_ckpt, save, moe_args):
    """Build the expert model from the dense checkpoint, train 1 update at lr 0, evaluate."""
    args = [
        lm_bin,
        "--user-dir",
        USER_DIR,
        *ARCH,
        *moe_args,
        *MOE_SMALL,
        *LM_COMMON,
        *SGD_LR0,
        "--max-update",
        1,
        "--save-dir",
        save,
        "--disable-validation",
        "--moe-upcycle-from",
        dense_ckpt,
    ]
    log = run("train", args).log
    return log, evaluate(lm_bin, save / "checkpoint_last.pt")


@pytest.fixture(scope="module")
def upcycled(lm_bin, lm_models, tmp_path_factory):
    """ "<source>-><target>" -> (dense Trained, training log, EvalLM of the upcycled model)."""
    root = tmp_path_factory.mktemp("upcycle")
    jobs = {f"transformer_lm->{n}": ("transformer_lm", opts) for n, opts in UPCYCLE.items()}
    jobs["plugin_dense->meo"] = ("dense", UPCYCLE["meo"])
    results = parallel(
        [
            partial(upcycle, lm_bin, lm_models[src].checkpoint, root / re.sub(r"\W", "_", name), opts)
            for name, (src, opts) in jobs.items()
        ]
    )
    return {name: (lm_models[src], *res) for (name, (src, _)), res in zip(jobs.items(), results)}


@pytest.mark.parametrize("name", [f"transformer_lm->{n}" for n in UPCYCLE] + ["plugin_dense->meo"])
def test_upcycled_model_computes_the_dense_function(upcycled, name):
    dense, log, up = upcycled[name]
    assert re.search(
        r"upcycled 2 expert FFNs and copied \d+ tensors from " + re.escape(str(dense.checkpoint)), log
    ), log[-3000:]
    rows = train_inner(log)
    assert [r["num_updates"] for r in rows] == [1] and "moe_balance" in rows[0], rows
    print(
        f"eval-lm loss: dense {dense.ev.precise_loss:.6f} ({dense.ev.loss}), "
        f"upcycled {name} at update 0 {up.precise_loss:.6f} ({up.loss})"
    )
    assert abs(up.precise_loss - dense.ev.precise_loss) < 1e-4, (dense.ev, up)
    assert up.loss == pytest.approx(dense.ev.loss, abs=1.5e-4)


# ---- 7. bad options fail at model build, naming the flag ------------------------------------

BAD = {
    "top_k_above_experts": (["--moe-mode", "meo", "--moe-experts", "4", "--moe-top-k", "5"], "--moe-top-k"),
    "compressed_not_below_top_k": (
        ["--moe-mode", "meo", "--moe-level", "token", *MOE_SMALL, "--moe-compressed-experts", "2"],
        "--moe-compressed-experts",
    ),
    "encoder_routing_in_lm": (
        ["--moe-mode", "meo", *MOE_SMALL, "--moe-decoder-routing", "encoder"],
        "--moe-decoder-routing",
    ),
    "unknown_mode": (["--moe-mode", "bogus", *MOE_SMALL], "--moe-mode"),
    "upcycle_shape_mismatch": (
        ["--moe-mode", "meo", *MOE_SMALL, "--decoder-ffn-embed-dim", "128"],
        "--moe-upcycle-from",
    ),
    "upcycle_missing_file": (["--moe-mode", "meo", *MOE_SMALL], "--moe-upcycle-from"),
}


@pytest.fixture(scope="module")
def bad_runs(lm_bin, lm_models, tmp_path_factory):
    """All the failing commands, run at once (each stops at model build)."""
    root = tmp_path_factory.mktemp("bad")
    missing = root / "no-such-dir" / "dense.pt"
    jobs, names = [], []
    for name, (opts, _) in BAD.items():
        extra = []
        if name == "upcycle_shape_mismatch":
            extra = ["--moe-upcycle-from", lm_models["transformer_lm"].checkpoint]
        elif name == "upcycle_missing_file":
            extra = ["--moe-upcycle-from", missing]
        args = [
            lm_bin,
            "--user-dir",
            USER_DIR,
            *ARCH,
            *opts,
            *extra,
            *LM_COMMON,
            *ADAM,
            "--max-update",
            1,
            "--save-dir",
            root / name,
        ]
        jobs.append(("train", args))
        names.append(name)
    return dict(zip(names, run_many(jobs))), missing


@pytest.mark.parametrize("name", list(BAD))
def test_bad_option_fails_at_model_build(bad_runs, name):
    results, missing = bad_runs
    res = results[name]
    flag = BAD[name][1]
    assert res.returncode != 0, res.describe()
    assert "num_updates" not in res.log and "begin training" not in res.log, res.describe()
    if name == "unknown_mode":  # argparse rejects it before anything is built
        print(f"{name}: {res.stderr.strip().splitlines()[-1]}")
        assert re.search(r"argument --moe-mode: invalid choice: '?bogus'?", res.stderr), res.describe()
        return
    # the error is raised while building the model, and its message names the flag
    assert "build_model" in res.log, res.describe()
    err = [line for line in res.log.splitlines() if re.match(r"\w*(Error|Exception): ", line)]
    assert err, res.describe()
    print(f"{name}: {err[-1]}")
    assert flag in err[-1], (err, res.describe())
    if name == "top_k_above_experts":
        assert "5" in err[-1] and "4" in err[-1]
    if name == "upcycle_shape_mismatch":
        assert "128" in err[-1] or "256" in err[-1], err[-1]
    if name == "upcycle_missing_file":
        assert str(missing) in err[-1], err[-1]


# ---- 5. resume after SIGKILL ----------------------------------------------------------------


def test_resume_after_sigkill(lm_bin, tmp_path):
    save = tmp_path / "ckpt"
    max_update = 20
    args = [
        lm_bin,
        "--user-dir",
        USER_DIR,
        *ARCH,
        *LM_RUNS["meo_sequence"],
        *LM_COMMON,
        *ADAM,
        "--max-update",
        max_update,
        "--save-interval-updates",
        5,
        "--save-dir",
        save,
    ]
    last = save / "checkpoint_last.pt"

    def saved(text):  # the "Saved checkpoint" line is logged after checkpoint_last.pt is written
        return last.exists() and "Saved checkpoint" in text

    log1 = train_until_then_kill(args, tmp_path / "first.log", saved)
    assert "done training" not in log1
    saves = re.findall(r"Saved checkpoint \S+ \(epoch (\d+) @ (\d+) updates", log1)
    assert saves, log1[-3000:]
    saved_updates = int(saves[-1][1])
    assert saved_updates % 5 == 0 and 5 <= saved_updates < max_update, saves
    first_rows = train_inner(log1)
    print(f"killed at update {first_rows[-1]['num_updates']}, last checkpoint at update {saved_updates}")

    log2 = run("train", args).log
    m = re.search(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", log2)
    assert m, log2[-3000:]
    assert Path(m.group(1)).resolve() == last.resolve() and int(m.group(2)) == saved_updates, m.group(0)
    rows = train_inner(log2)
    assert [r["num_updates"] for r in rows] == list(range(saved_updates + 1, max_update + 1)), [
        r["num_updates"] for r in rows
    ]
    # the weights were restored too: the first resumed loss is far below a fresh model's
    assert rows[0]["loss"] < first_rows[0]["loss"] - 1.0, (rows[0], first_rows[0])
    assert f"Stopping training due to num_updates: {max_update} >= max_update: {max_update}" in log2
    assert train_epoch_stats(log2)[-1]["num_updates"] == max_update


# ---- 6. bfloat16 training (python -m meo_fairseq.train) -------------------------------------


def test_bf16_training_entry_point(lm_bin, tmp_path):
    """fairseq-train takes --bf16 for --tpu and fails without torch_xla; meo_fairseq.train runs
    the same options as fairseq's own training, in bfloat16 (here on the CPU)."""
    args = [
        lm_bin,
        "--user-dir",
        USER_DIR,
        *ARCH,
        *LM_RUNS["meo_sequence"],
        *LM_COMMON,
        *ADAM,
        "--bf16",
        "--max-update",
        4,
        "--save-dir",
        tmp_path / "ckpt",
    ]
    plain = run("train", args, cwd=REPO, check=False)
    assert plain.returncode != 0 and "xla" in plain.stderr
    rows = train_inner(run("meo_fairseq.train", args, cwd=REPO).log)
    assert [r["num_updates"] for r in rows] == [1, 2, 3, 4] and all(finite(r["loss"]) for r in rows)
    both = run("meo_fairseq.train", [*args, "--fp16"], cwd=REPO, check=False)
    assert both.returncode == 2 and "--bf16 and --fp16 exclude each other" in both.stderr
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    experts = [v for k, v in state["model"].items() if k.endswith("experts.weight")]
    # the model ran in bf16 (fairseq saves half-precision weights as fp32): every weight is a bf16 value
    assert experts and all(torch.equal(v.bfloat16().float(), v) and v.abs().sum() > 0 for v in experts)
