"""Reliability (issue 18): nothing lost, nothing wrong reported, every failure names its cause.

Model-level cases through the fairseq command lines, with meo_transformer_lm_tiny trained for a
few updates on tests/data/wikitext-2:
- a run with experts but no expert layer (--moe-freq above the layer count) is refused;
- a checkpoint evaluated or resumed with another dictionary of the same size is refused, naming
  both dictionary files (checkpoints without a fingerprint still load);
- resuming with other --moe-* options is refused, naming them, unless --reset-moe-options;
- resuming an upcycled run does not read the dense file again;
- an unreadable --moe-upcycle-from file is reported with the flag, the file and what was expected.
"""

import logging
import re
import shutil

import pytest
import torch
from cli_utils import (
    ADAM,
    LM_COMMON,
    MOE_SMALL,
    USER_DIR,
    eval_lm,
    run,
    run_many,
    train_inner,
)

ARCH = ["--arch", "meo_transformer_lm_tiny", "--criterion", "moe_cross_entropy"]
MEO = ["--moe-mode", "meo", "--moe-level", "sequence", *MOE_SMALL, "--moe-segment-length", "16"]


def train_args(data, save, *extra, updates=2):
    return [data, "--user-dir", USER_DIR, *ARCH, *LM_COMMON, *ADAM, "--max-update", updates,
            "--save-dir", save, "--disable-validation", *extra]  # fmt: skip


def eval_args(data, ckpt, *extra):
    return [data, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "test", "--tokens-per-sample", "64",
            "--max-tokens", "2048", "--cpu", "--num-workers", "0", *extra]  # fmt: skip


def error_line(res, kind=r"[\w.]*(Error|Exception)"):
    """The last error line of the log (``kind``: a regex of the exception's name)."""
    lines = [line for line in res.log.splitlines() if re.match(kind + ": ", line)]
    assert lines, res.describe()
    return lines[-1]


@pytest.fixture(scope="module")
def meo_run(lm_bin, tmp_path_factory):
    """An MEO model trained for 2 updates (checkpoint_last.pt in its save dir)."""
    save = tmp_path_factory.mktemp("meo") / "ckpt"
    run("train", train_args(lm_bin, save, *MEO))
    return save


@pytest.fixture(scope="module")
def swapped_bin(lm_bin, tmp_path_factory):
    """lm_bin with two dictionary entries swapped: same size, same .bin, other words."""
    out = tmp_path_factory.mktemp("swapped") / "data-bin"
    shutil.copytree(lm_bin, out)
    lines = (out / "dict.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    (out / "dict.txt").write_text("".join(lines), encoding="utf-8")
    return out


# ---- item 2: --moe-freq above the number of layers --------------------------------------------


def test_moe_freq_without_expert_layer_is_refused(lm_bin, tmp_path):
    bad, dense_ok, freq2 = run_many([
        ("train", train_args(lm_bin, tmp_path / "a", *MEO, "--moe-freq", 3)),
        ("train", train_args(lm_bin, tmp_path / "b", "--moe-mode", "dense", "--moe-freq", 3, updates=1)),
        ("train", train_args(lm_bin, tmp_path / "c", *MEO, "--moe-freq", 2, updates=1)),
    ])  # fmt: skip
    assert bad.returncode != 0 and "num_updates" not in bad.log, bad.describe()
    err = error_line(bad)
    assert "--moe-freq 3" in err and "2 layers" in err, err
    assert not (tmp_path / "a" / "checkpoint_last.pt").exists()
    assert dense_ok.returncode == 0, dense_ok.describe()  # a dense model has no expert layer to miss
    # --moe-freq 2 with 2 layers still builds one expert layer
    assert freq2.returncode == 0 and "moe_aux" in train_inner(freq2.log)[0], freq2.describe()


# ---- item 3: dictionary fingerprint ----------------------------------------------------------


def test_checkpoint_records_the_dictionary(meo_run, lm_bin):
    from meo_fairseq.models.common import META_KEY, decode_metadata

    state = torch.load(meo_run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    meta = decode_metadata(state["model"][META_KEY])
    assert [d["role"] for d in meta["dictionaries"]] == ["source", "target"]
    assert {d["file"] for d in meta["dictionaries"]} == {str(lm_bin / "dict.txt")}
    assert meta["moe"]["moe_mode"] == "meo" and meta["moe"]["moe_top_k"] == 2


def test_other_dictionary_of_the_same_size_is_refused(meo_run, lm_bin, swapped_bin, tmp_path):
    ckpt = meo_run / "checkpoint_last.pt"
    # an old checkpoint (no fingerprint) still loads and gives the same loss
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["model"]["moe_meta"]
    torch.save(state, tmp_path / "old.pt")
    good, bad, old = run_many([
        ("eval_lm", eval_args(lm_bin, ckpt)),
        ("eval_lm", eval_args(swapped_bin, ckpt)),
        ("eval_lm", eval_args(lm_bin, tmp_path / "old.pt")),
    ])  # fmt: skip
    assert good.returncode == 0 and old.returncode == 0, (good.describe(), old.describe())
    assert eval_lm(old.log).loss == eval_lm(good.log).loss
    assert bad.returncode != 0, bad.describe()
    assert "Loss (base 2)" not in bad.log, "no perplexity may be reported"
    err = error_line(bad)
    print(err)
    assert "dictionary mismatch" in err and str(ckpt) in err, err
    assert str(swapped_bin / "dict.txt") in err and str(lm_bin / "dict.txt") in err, err
    # resuming on that data is refused too
    save = tmp_path / "resume"
    shutil.copytree(meo_run, save)
    res = run("train", train_args(swapped_bin, save, *MEO, updates=3), check=False)
    assert res.returncode != 0 and "dictionary mismatch" in error_line(res, r"\S*CheckpointMismatchError"), (
        res.describe()
    )
    assert not train_inner(res.log)


# ---- item 6: resuming with other --moe-* options --------------------------------------------


def test_resume_with_other_moe_options_is_refused(meo_run, lm_bin, tmp_path):
    saves = {n: tmp_path / n for n in ("topk", "mode", "reset", "same")}
    for s in saves.values():
        shutil.copytree(meo_run, s)
    before = torch.load(meo_run / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    topk, mode = run_many([
        ("train", train_args(lm_bin, saves["topk"], *MEO, "--moe-top-k", 1, updates=3)),
        ("train", train_args(lm_bin, saves["mode"], *MEO, "--moe-mode", "moe", "--moe-level", "token",
                             updates=3)),
    ])  # fmt: skip
    for res, needles in (
        (topk, ["--moe-top-k 2 (checkpoint) vs 1 (now)"]),
        (mode, ["--moe-mode meo (checkpoint) vs moe (now)", "--moe-level sequence (checkpoint) vs token"]),
    ):
        assert res.returncode != 0 and not train_inner(res.log), res.describe()
        err = error_line(res, r"\S*CheckpointMismatchError")  # (fairseq's trainer re-raises it "from" it)
        print(err)
        for n in needles:
            assert n in err, err
        assert "--reset-moe-options" in err
    # nothing was written over the checkpoint
    after = torch.load(saves["topk"] / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # on purpose: --reset-moe-options loads the weights and trains on with the new options
    reset, same = run_many([
        ("train", train_args(lm_bin, saves["reset"], *MEO, "--moe-top-k", 1, "--reset-moe-options",
                             updates=3)),
        # other loss weights, and the default routing given explicitly: the same meaning
        ("train", train_args(lm_bin, saves["same"], *MEO, "--moe-balance-weight", 0.02,
                             "--moe-decoder-routing", "segment", updates=3)),
    ])  # fmt: skip
    for res in (reset, same):
        assert res.returncode == 0, res.describe()
        assert re.search(r"Loaded checkpoint \S+ \(epoch \d+ @ 2 updates\)", res.log), res.log[-3000:]
        assert [r["num_updates"] for r in train_inner(res.log)] == [3]


def test_resume_check_compares_block_order_and_weighting_where_they_apply():
    """--moe-token-block-order and --moe-compressed-weighting change the function of token-level
    MEO / of compressed experts, and nothing elsewhere: recorded (and so compared on resume) only
    there."""
    from argparse import Namespace

    from meo_fairseq.models.common import MEANING_OPTIONS, build_metadata

    class NoDicts:
        source_dictionary = target_dictionary = None

    def meta(**kw):
        return build_metadata(Namespace(**kw), NoDicts(), dictionary_files=(None, None))["moe"]

    assert {"moe_token_block_order", "moe_compressed_weighting"} <= set(MEANING_OPTIONS)
    token = dict(moe_mode="meo", moe_level="token")
    assert meta(**token, moe_token_block_order="block-first")["moe_token_block_order"] == "block-first"
    assert meta(**token, moe_token_block_order="route-first")["moe_token_block_order"] == "route-first"
    seq = dict(moe_mode="meo", moe_level="sequence")
    assert meta(**seq, moe_token_block_order="block-first") == meta(
        **seq, moe_token_block_order="route-first"
    )
    assert meta(moe_compressed_experts=1, moe_compressed_weighting="authors")["moe_compressed_weighting"] == (
        "authors"
    )
    assert meta(moe_compressed_experts=0, moe_compressed_weighting="authors") == meta(
        moe_compressed_experts=0, moe_compressed_weighting="renormalised"
    )


def test_resume_warns_when_the_gate_noise_differs(caplog):
    """The gate noise does not change the function (no refusal), but resuming without it a run that
    trained with it changes the training: a warning, also for checkpoints written before the
    default changed (they do not record it and trained with noise unless told otherwise)."""
    from argparse import Namespace

    from meo_fairseq.models.common import _warn_training_changes, build_metadata

    class NoDicts:
        source_dictionary = target_dictionary = None

    def meta(**kw):
        return build_metadata(Namespace(**kw), NoDicts(), dictionary_files=(None, None))

    quiet, noisy = meta(), meta(no_moe_gate_noise=False)
    assert quiet["training"] == {"gate_noise": False} and noisy["training"] == {"gate_noise": True}
    old = {k: v for k, v in noisy.items() if k != "training"}
    cases = [(old, quiet, "written before the default changed"), (noisy, quiet, "trained with gate noise"),
             (quiet, noisy, "trained without gate noise"), (noisy, noisy, None), (quiet, quiet, None),
             (old, noisy, None)]  # fmt: skip
    for saved, own, needle in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meo_fairseq.models.common"):
            _warn_training_changes(saved, own, "checkpoint c.pt")
        text = " ".join(r.getMessage() for r in caplog.records)
        assert (needle in text) if needle else not text, (needle, text)


# ---- items 7 and 8: upcycling ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_ckpt(lm_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("dense") / "ckpt"
    run("train", train_args(lm_bin, save, "--moe-mode", "dense", updates=1))
    return save / "checkpoint_last.pt"


def test_resuming_an_upcycled_run_does_not_need_the_dense_file(lm_bin, dense_ckpt, tmp_path):
    dense = tmp_path / "dense.pt"
    shutil.copy(dense_ckpt, dense)
    save = tmp_path / "ckpt"
    first = run("train", train_args(lm_bin, save, *MEO, "--moe-upcycle-from", dense, updates=1))
    assert "upcycled 2 expert FFNs" in first.log
    dense.unlink()
    second = run("train", train_args(lm_bin, save, *MEO, "--moe-upcycle-from", dense, updates=2), check=False)
    assert second.returncode == 0, second.describe()
    assert "not read: fairseq-train restores the model from" in second.log
    assert [r["num_updates"] for r in train_inner(second.log)] == [2]


def test_unreadable_upcycle_file_names_flag_and_file(lm_bin, dense_ckpt, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(dense_ckpt, map_location="cpu", weights_only=True)["model"], bare)
    trunc = tmp_path / "truncated.pt"
    data = dense_ckpt.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    files = {text: "not a file written by torch.save", bare: "bare state_dict", trunc: "zip archive"}
    results = run_many([("train", train_args(lm_bin, tmp_path / f.stem, *MEO, "--moe-upcycle-from", f,
                                             updates=1))
                        for f in files])  # fmt: skip
    for (f, why), res in zip(files.items(), results):
        assert res.returncode != 0 and not train_inner(res.log), res.describe()
        err = error_line(res)
        print(err)
        assert err.startswith("ValueError: ") and f"--moe-upcycle-from {f}:" in err and why in err, err
        assert "expected a checkpoint written by fairseq-train" in err


# ---- item 11: scorers and the FLOPs tool ---------------------------------------------------------


@pytest.mark.parametrize("scorer", ["rouge", "squad", "fairseq_output"])
def test_scorers_name_a_file_that_is_not_utf8(scorer, tmp_path, capsys):
    import importlib

    bad = tmp_path / "hyp.txt"
    bad.write_bytes("caf\u00e9\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"))
    good = tmp_path / "ref.txt"
    good.write_text("a\nb\n", encoding="utf-8")
    main = importlib.import_module(f"meo_fairseq.scoring.{scorer}").main
    argv = {
        "rouge": ["--hyp", bad, "--ref", good],
        "squad": ["--hyp", bad, "--ids", good, "--ref", good],
        "fairseq_output": [bad, "--out", tmp_path / "out.txt", "--num", 2],
    }[scorer]
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not UTF-8 text (byte 0xef" in err, err
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--experts", "0"], "--experts must be >= 1, got 0"),
    (["--top-k", "17"], "--top-k 17 must not exceed --experts 16"),
])  # fmt: skip
def test_flops_cli_rejects_bad_sizes(argv, needle, capsys):
    from meo_fairseq.benchmark.flops import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err
