"""Sequence to sequence from the command line: fairseq-train, fairseq-generate (beam search and
--score-reference) and fairseq-interactive with meo_transformer_tiny, MEO evaluated as MoE, and
upcycling from a dense fairseq `transformer`.

Data: word-level pairs made of the first 60 words of each tests/data/xsum document (source) and
the first 20 words of its summary (target), binarized with a joined dictionary.
"""

import math
import re
from functools import partial

import pytest
from cli_utils import (
    ADAM,
    SGD_LR0,
    TINY_RUN,
    USER_DIR,
    dict_size,
    finite,
    hypotheses,
    parallel,
    preprocess_seq2seq,
    run,
    sources,
    train_inner,
    valid_stats,
    write_seq2seq_text,
)

MAX_UPDATE = 20
N_TEST = 20  # lines of tests/data/xsum/test.jsonl
N_VALID = 20
COMMON = ["--task", "translation", "--source-lang", "src", "--target-lang", "tgt", *TINY_RUN]
LS = ["--label-smoothing", "0.1"]
MOE = [
    "--user-dir",
    USER_DIR,
    "--arch",
    "meo_transformer_tiny",
    "--criterion",
    "moe_label_smoothed_cross_entropy",
    *LS,
    "--moe-experts",
    "4",
    "--moe-top-k",
    "2",
]
MODELS = {
    # sequence-level MEO: encoder layers route on the source mean, decoder layers on the encoder output
    "meo": [*MOE, "--moe-mode", "meo", "--moe-level", "sequence"],
    "moe_token": [*MOE, "--moe-mode", "moe", "--moe-level", "token"],
    # fairseq's own transformer at the sizes of meo_transformer_tiny (the upcycling source)
    "transformer": [
        "--arch",
        "transformer",
        "--criterion",
        "label_smoothed_cross_entropy",
        *LS,
        "--encoder-embed-dim",
        "64",
        "--encoder-ffn-embed-dim",
        "256",
        "--encoder-layers",
        "2",
        "--encoder-attention-heads",
        "4",
        "--decoder-embed-dim",
        "64",
        "--decoder-ffn-embed-dim",
        "256",
        "--decoder-layers",
        "2",
        "--decoder-attention-heads",
        "4",
    ],
}
# fairseq drops a final batch smaller than --required-batch-size-multiple (default 8): with
# multiple 1 and a batch larger than the split every input is decoded
ALL_IN_ONE_BATCH = ["--batch-size", "32", "--required-batch-size-multiple", "1"]
MAX_LEN = ["--max-len-a", "0", "--max-len-b", "20"]
INTERACTIVE_INPUTS = 2


@pytest.fixture(scope="module")
def s2s(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2s")
    write_seq2seq_text(root / "text")
    data_bin = preprocess_seq2seq(root / "text", root / "data-bin")
    return root, data_bin


@pytest.fixture(scope="module")
def s2s_models(s2s):
    """name -> (checkpoint, training log), the three models trained side by side."""
    root, data_bin = s2s

    def train(name):
        save = root / name
        log = run(
            "train", [data_bin, *MODELS[name], *COMMON, *ADAM, "--max-update", MAX_UPDATE, "--save-dir", save]
        ).log
        return save / "checkpoint_last.pt", log

    return dict(zip(MODELS, parallel([partial(train, n) for n in MODELS])))


def generate(data_bin, ckpt, *extra):
    return run(
        "generate", [data_bin, "--user-dir", USER_DIR, "--path", ckpt, "--cpu", *ALL_IN_ONE_BATCH, *extra]
    ).log


def upcycle_and_score(data_bin, dense_ckpt, save):
    args = [
        data_bin,
        *MODELS["meo"],
        *COMMON,
        *SGD_LR0,
        "--max-update",
        1,
        "--save-dir",
        save,
        "--moe-upcycle-from",
        dense_ckpt,
    ]
    log = run("train", args).log
    return log, generate(data_bin, save / "checkpoint_last.pt", "--gen-subset", "valid", "--score-reference")


@pytest.fixture(scope="module")
def s2s_outputs(s2s, s2s_models):
    """Everything decoded from the trained models (run side by side)."""
    root, data_bin = s2s
    meo = s2s_models["meo"][0]
    lines = (root / "text" / "test.src").read_text().splitlines()[:INTERACTIVE_INPUTS]
    jobs = {
        "generate:meo": partial(generate, data_bin, meo, "--gen-subset", "test", "--beam", "4", *MAX_LEN),
        "generate:moe_token": partial(
            generate, data_bin, s2s_models["moe_token"][0], "--gen-subset", "test", "--beam", "4", *MAX_LEN
        ),
        "score_reference:meo": partial(generate, data_bin, meo, "--gen-subset", "test", "--score-reference"),
        "score_reference:meo_as_moe": partial(
            generate,
            data_bin,
            meo,
            "--gen-subset",
            "test",
            "--score-reference",
            "--model-overrides",
            "{'moe_mode': 'moe'}",
        ),
        "interactive:meo": lambda: (
            run(
                "interactive",
                [
                    data_bin,
                    "--user-dir",
                    USER_DIR,
                    "--path",
                    meo,
                    "--source-lang",
                    "src",
                    "--target-lang",
                    "tgt",
                    "--beam",
                    "4",
                    *MAX_LEN,
                    "--buffer-size",
                    INTERACTIVE_INPUTS,
                    "--batch-size",
                    INTERACTIVE_INPUTS,
                    "--cpu",
                ],
                input="\n".join(lines) + "\n",
            ).log
        ),
        "score_reference:transformer": partial(
            generate, data_bin, s2s_models["transformer"][0], "--gen-subset", "valid", "--score-reference"
        ),
        "upcycle": partial(upcycle_and_score, data_bin, s2s_models["transformer"][0], root / "upcycled"),
    }
    out = dict(zip(jobs, parallel(list(jobs.values()))))
    out["interactive_inputs"] = lines
    return out


@pytest.mark.parametrize("name", ["meo", "moe_token"])
def test_seq2seq_training(s2s, s2s_models, name):
    _, data_bin = s2s
    _, log = s2s_models[name]
    uniform = math.log2(dict_size(data_bin, "dict.tgt.txt"))
    rows = train_inner(log)
    assert [r["num_updates"] for r in rows] == list(range(1, MAX_UPDATE + 1)), log[-3000:]
    losses = [r["loss"] for r in rows]
    assert all(finite(x) for x in losses) and all(finite(r["nll_loss"]) for r in rows)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5, losses
    for r in rows:
        for key in ("moe_balance", "moe_max_frac", "moe_entropy"):
            assert finite(r[key]), (key, r)
        assert 0.25 - 1e-3 <= r["moe_max_frac"] <= 1 and 0 <= r["moe_entropy"] <= math.log(4) + 1e-3, r
    valid = valid_stats(log)[-1]
    assert valid["num_updates"] == MAX_UPDATE and finite(valid["loss"]) and valid["loss"] < uniform - 2, (
        valid,
        uniform,
    )


@pytest.mark.parametrize("name", ["meo", "moe_token"])
def test_generate_beam4_one_hypothesis_per_input(s2s_outputs, name):
    log = s2s_outputs[f"generate:{name}"]
    hyps = hypotheses(log)
    assert sorted(hyps) == list(range(N_TEST)), (sorted(hyps), log[-3000:])
    assert sorted(sources(log, "S")) == list(range(N_TEST))
    for i, (score, text) in hyps.items():
        assert finite(score) and score < 0, (i, score)
        assert len(text.split()) <= 20
    assert re.search(r"Generate test with beam=4: BLEU4 = [\d.]+", log), log[-2000:]
    assert f"Translated {N_TEST} sentences" in log


def _unescape(t: str) -> str:
    return t.replace("<<unk>>", "<unk>")


def test_score_reference(s2s_outputs):
    log = s2s_outputs["score_reference:meo"]
    hyps, refs = hypotheses(log), sources(log, "T")
    assert sorted(hyps) == sorted(refs) == list(range(N_TEST)), log[-3000:]
    for i, (score, text) in hyps.items():
        assert text == _unescape(refs[i]), (i, text, refs[i])  # the "hypothesis" is the reference
        assert finite(score) and score < 0


def test_meo_checkpoint_scored_as_moe_gives_the_same_scores(s2s_outputs):
    meo = hypotheses(s2s_outputs["score_reference:meo"])
    as_moe = hypotheses(s2s_outputs["score_reference:meo_as_moe"])
    assert sorted(meo) == sorted(as_moe) == list(range(N_TEST))
    diff = max(abs(meo[i][0] - as_moe[i][0]) for i in meo)
    print(f"score-reference, MEO vs MEO-as-MoE: max per-sentence difference {diff:.2e}")
    assert diff < 1e-3, diff
    assert all(meo[i][1] == as_moe[i][1] for i in meo)


def test_interactive(s2s_outputs):
    log, lines = s2s_outputs["interactive:meo"], s2s_outputs["interactive_inputs"]
    hyps, srcs = hypotheses(log), sources(log, "S")
    assert sorted(hyps) == sorted(srcs) == list(range(INTERACTIVE_INPUTS)), log[-3000:]
    for i, line in enumerate(lines):
        # words outside the dictionary show as <unk>; the others are the input's
        shown, given = srcs[i].split(), line.split()
        assert len(shown) == len(given) and all(s in (g, "<unk>") for s, g in zip(shown, given)), (
            shown,
            given,
        )
        assert finite(hyps[i][0]) and hyps[i][0] < 0
    # the same inputs decoded by fairseq-generate in a padded batch of 20 give the same output
    batch = hypotheses(s2s_outputs["generate:meo"])
    for i in range(INTERACTIVE_INPUTS):
        assert hyps[i][1] == batch[i][1], (hyps[i], batch[i])
        assert abs(hyps[i][0] - batch[i][0]) < 1e-3, (hyps[i], batch[i])


def test_upcycle_from_fairseq_transformer(s2s_models, s2s_outputs):
    up_log, up_scored = s2s_outputs["upcycle"]
    assert re.search(r"upcycled 4 expert FFNs and copied \d+ tensors from ", up_log), up_log[-3000:]
    rows = train_inner(up_log)
    assert [r["num_updates"] for r in rows] == [1] and "moe_balance" in rows[0], rows
    dense = hypotheses(s2s_outputs["score_reference:transformer"])
    up = hypotheses(up_scored)
    assert sorted(dense) == sorted(up) == list(range(N_VALID))
    diff = max(abs(dense[i][0] - up[i][0]) for i in dense)
    print(
        "score-reference, dense transformer vs upcycled meo_transformer_tiny at update 0: "
        f"max difference {diff:.2e}"
    )
    assert diff < 1e-4, diff
    # the validation that ends each training run: same loss and nll_loss
    dense_valid = valid_stats(s2s_models["transformer"][1])[-1]
    up_valid = valid_stats(up_log)[-1]
    assert dense_valid["num_updates"] == MAX_UPDATE and up_valid["num_updates"] == 1
    assert up_valid["loss"] == pytest.approx(dense_valid["loss"], abs=1.5e-3), (dense_valid, up_valid)
    assert up_valid["nll_loss"] == pytest.approx(dense_valid["nll_loss"], abs=1.5e-3), (dense_valid, up_valid)
