"""Model building: upcycling details and warnings (python API, no CLI)."""

import logging

import pytest
import torch
from fairseq import checkpoint_utils
from test_models_incremental import build
from test_modules_reference import HostSyncs

from meo_fairseq.criterions.moe_aux import add_aux
from meo_fairseq.models.upcycle import upcycle_from_checkpoint


def _save(model, path, extra_row=False):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if extra_row:  # as bart.* checkpoints: one more embedding row (<mask>) than the dictionary
        for k in list(state):
            if k.endswith("embed_tokens.weight") or k.endswith("output_projection.weight"):
                state[k] = torch.cat([state[k], torch.randn(1, state[k].size(1))])
    checkpoint_utils.torch_persistent_save(
        {
            "model": state,
            "args": None,
            "cfg": None,
            "optimizer_history": [
                {"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {}, "num_updates": 0}
            ],
            "extra_state": {},
            "last_optimizer_state": None,
        },
        str(path),
    )


def _outputs(model, d):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, len(d), (2, 6), generator=g)
    tgt = torch.randint(4, len(d), (2, 5), generator=g)
    with torch.no_grad():
        return model(src, src.ne(d.pad()).sum(1), tgt)[0]


def test_upcycle_drops_bart_mask_row_and_keeps_the_function(tmp_path):
    dense, d = build("meo_transformer_tiny", "translation", ["--moe-mode", "dense", "--share-all-embeddings"])
    _save(dense, tmp_path / "dense.pt", extra_row=True)
    moe, _ = build(
        "meo_transformer_tiny",
        "translation",
        ["--moe-experts", "4", "--moe-top-k", "2", "--share-all-embeddings"],
    )
    before = _outputs(moe, d)
    upcycle_from_checkpoint(moe, str(tmp_path / "dense.pt"))
    after = _outputs(moe, d)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _outputs(dense, d), rtol=1e-5, atol=1e-5)


def test_warning_when_segments_are_longer_than_samples(caplog):
    with caplog.at_level(logging.WARNING):
        build(
            "meo_transformer_lm_tiny",
            "language_modeling",
            ["--moe-segment-length", "64", "--tokens-per-sample", "32"],
        )
    assert "never route" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(
            "meo_transformer_lm_tiny",
            "language_modeling",
            ["--moe-segment-length", "16", "--tokens-per-sample", "32"],
        )
    assert "never route" not in caplog.text


@pytest.mark.parametrize(
    "arch,task", [("meo_transformer_lm_tiny", "language_modeling"), ("meo_transformer_tiny", "translation")]
)
def test_warning_for_the_switch_loss_with_meo_only(caplog, arch, task):
    """The Switch loss with MEO (docs/quality.md 2(iv)) warns, once per build; with vanilla MoE, or
    MEO with the default loss, nothing is said."""
    for flags, warned in (
        (["--moe-mode", "meo", "--moe-balance-loss", "switch"], True),
        (["--moe-mode", "moe", "--moe-balance-loss", "switch"], False),
        (["--moe-mode", "meo"], False),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build(arch, task, flags)
        assert caplog.text.count("--moe-balance-loss switch with --moe-mode meo") == int(warned), flags


def test_upcycle_vocabulary_mismatch_names_the_dictionary(tmp_path):
    dense, d = build("meo_transformer_tiny", "translation", ["--moe-mode", "dense", "--share-all-embeddings"])
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    for k in list(state):
        if k.endswith("embed_tokens.weight") or k.endswith("output_projection.weight"):
            state[k] = torch.cat([state[k], torch.randn(3, state[k].size(1))])  # 3 more words
    _save_state(state, tmp_path / "dense.pt")
    moe, _ = build(
        "meo_transformer_tiny",
        "translation",
        ["--moe-experts", "4", "--moe-top-k", "2", "--share-all-embeddings"],
    )
    with pytest.raises(ValueError, match=r"the dictionaries differ \(\d+ entries in the checkpoint"):
        upcycle_from_checkpoint(moe, str(tmp_path / "dense.pt"))


def _save_state(state, path):
    meta = {"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {}, "num_updates": 0}
    checkpoint_utils.torch_persistent_save(
        {"model": state, "args": None, "cfg": None, "optimizer_history": [meta], "extra_state": {},
         "last_optimizer_state": None},
        str(path),
    )  # fmt: skip


def _train_step(model, tokens, task):
    """Forward, the criteria's auxiliary loss and statistics (moe_aux.add_aux), backward."""
    if task == "language_modeling":
        out = model(tokens)[0]
    else:
        out = model(tokens, torch.tensor([15, 20, 20]), tokens)[0]
    logging_output = {}
    add_aux(out.float().logsumexp(-1).sum(), model, 10, logging_output).backward()
    return logging_output


@pytest.mark.parametrize(
    "arch,task,extra",
    [
        (
            "meo_transformer_lm_tiny",
            "language_modeling",
            ["--tokens-per-sample", "64", "--moe-segment-length", "8"],
        ),
        ("meo_transformer_tiny", "translation", []),
    ],
)
def test_expert_layers_add_no_host_sync_to_a_fairseq_training_step(arch, task, extra, monkeypatch):
    """A fairseq model's training step (forward, the criteria's auxiliary loss and statistics,
    backward) with the GPU path (--moe-impl reference) waits for the device exactly as often as the
    dense model of the same architecture: fairseq's own reads (positions, padding), none of ours."""
    syncs = HostSyncs().patch(monkeypatch)
    seen = {}
    for mode in (["dense"], ["meo"], ["moe", "--moe-level", "token"]):
        flags = extra + [
            "--moe-experts",
            "4",
            "--moe-top-k",
            "2",
            "--moe-impl",
            "reference",
            "--moe-mode",
            *mode,
        ]
        model, d = build(arch, task, flags)
        model.train()
        tokens = torch.randint(4, len(d), (3, 20), generator=torch.Generator().manual_seed(0))
        tokens[0, 15:] = d.pad()
        _train_step(model, tokens, task)  # (warm-up: lazy state)
        syncs.seen = []
        with syncs:
            logged = _train_step(model, tokens, task)
        seen[mode[0]] = syncs.seen
        assert ("moe_balance" in logged) == (mode[0] != "dense")
    assert seen["meo"] == seen["moe"] == seen["dense"], seen
