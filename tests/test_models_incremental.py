"""Incremental decoding of the plugin's models equals the teacher-forced forward pass.

For every causal routing mode, decoding one position at a time (fairseq's incremental state,
with a beam reorder in the middle) gives the same output distribution as one forward pass.
"""

import os

import pytest
import torch
from fairseq import models, options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import meo_fairseq  # noqa: F401  (registers the models)

USER_DIR = os.path.dirname(meo_fairseq.__file__)


class _Task:
    def __init__(self, d):
        self.source_dictionary = self.target_dictionary = d


def _dictionary(n=40):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def build(arch, task, extra):
    parser = options.get_training_parser()
    argv = ["/nonexistent", "--task", task, "--arch", arch, "--user-dir", USER_DIR] + extra
    args = options.parse_args_and_arch(parser, argv)
    d = _dictionary()
    torch.manual_seed(0)
    # the path fairseq-train takes: Namespace -> config -> models.build_model
    model = models.build_model(convert_namespace_to_omegaconf(args).model, _Task(d))
    # make routing non-trivial (routers start at zero)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 1.0)
    return model.eval(), d


def _incremental(decoder, tokens, encoder_out, reorder_at=None, order=None):
    state = {}
    outs = []
    for t in range(tokens.size(1)):
        if reorder_at is not None and t == reorder_at:
            decoder.reorder_incremental_state_scripting(state, order)
            # the reordered hypotheses keep their prefixes and continue with new tokens
            tokens = torch.cat([tokens.index_select(0, order)[:, :t], tokens[:, t:]], 1)
            outs = [o.index_select(0, order) for o in outs]
        y, _ = decoder(tokens[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        outs.append(y[:, -1])
    return torch.stack(outs, 1)


SEQ2SEQ = [
    ("meo", "sequence", "linear", "encoder"),
    ("meo", "sequence", "ffn", "encoder"),
    ("meo", "token", "linear", "segment"),
    ("meo", "sequence", "linear", "prefix"),
    ("moe", "sequence", "linear", "segment"),
    ("moe", "token", "ffn", "encoder"),
    ("meo", "sequence", "ffn", "prefix"),
]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("mode,level,unit,routing", SEQ2SEQ)
def test_seq2seq_incremental_equals_forward(mode, level, unit, routing, impl):
    extra = [
        "--moe-mode",
        mode,
        "--moe-level",
        level,
        "--moe-expert-unit",
        unit,
        "--moe-experts",
        "4",
        "--moe-top-k",
        "2",
        "--moe-decoder-routing",
        routing,
        "--moe-segment-length",
        "3",
        "--moe-prefix-length",
        "4",
        "--moe-compressed-experts",
        "1",
        "--moe-impl",
        impl,
    ]
    model, d = build("meo_transformer_tiny", "translation", extra)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, len(d), (3, 7), generator=g)
    src[0, :2] = d.pad()  # left padding, as fairseq's translation task
    lengths = src.ne(d.pad()).sum(1)
    tgt = torch.randint(4, len(d), (3, 9), generator=g)
    tgt[:, 0] = d.eos()
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full, _ = model.decoder(tgt, encoder_out=enc)
        inc = _incremental(model.decoder, tgt, enc)
        torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
        # beam search reorders hypotheses of one source: 3 beams of source 1, reordered at step 5
        beams = src[1:2].expand(3, -1)
        enc = model.encoder(beams, src_lengths=lengths[1:2].expand(3))
        order = torch.tensor([2, 0, 0])
        reordered = _incremental(model.decoder, tgt, enc, reorder_at=5, order=order)
        expected = torch.cat([tgt.index_select(0, order)[:, :5], tgt[:, 5:]], 1)
        full_perm, _ = model.decoder(expected, encoder_out=enc)
        torch.testing.assert_close(reordered, full_perm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "mode,level,unit,routing",
    [
        ("meo", "sequence", "linear", "segment"),
        ("meo", "sequence", "ffn", "segment"),
        ("meo", "token", "linear", "prefix"),
        ("moe", "token", "linear", "segment"),
        ("moe", "sequence", "ffn", "prefix"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_lm_incremental_equals_forward(mode, level, unit, routing, impl):
    extra = [
        "--moe-mode",
        mode,
        "--moe-level",
        level,
        "--moe-expert-unit",
        unit,
        "--moe-experts",
        "4",
        "--moe-top-k",
        "2",
        "--moe-decoder-routing",
        routing,
        "--moe-segment-length",
        "3",
        "--moe-prefix-length",
        "4",
        "--moe-impl",
        impl,
    ]
    model, d = build("meo_transformer_lm_tiny", "language_modeling", extra)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, len(d), (2, 11), generator=g)
    with torch.no_grad():
        full, _ = model.decoder(tokens)
        inc = _incremental(model.decoder, tokens, None)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)


def test_full_routing_leaks_so_incremental_differs():
    """The authors' whole-sequence routing sees the future: teacher forcing and decoding differ."""
    extra = ["--moe-experts", "4", "--moe-top-k", "2", "--moe-decoder-routing", "full"]
    with pytest.warns(UserWarning, match="future"):
        model, d = build("meo_transformer_lm_tiny", "language_modeling", extra)
    tokens = torch.randint(4, len(d), (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model.decoder(tokens)
        inc = _incremental(model.decoder, tokens, None)
    assert not torch.allclose(inc[:, :-1], full[:, :-1], atol=1e-4)


def test_lm_causal_teacher_forced():
    """Changing token t changes no output before t (segment routing, t inside the first segment)."""
    extra = ["--moe-experts", "4", "--moe-top-k", "2", "--moe-segment-length", "4"]
    model, d = build("meo_transformer_lm_tiny", "language_modeling", extra)
    tokens = torch.randint(4, len(d), (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base, _ = model.decoder(tokens)
        for t in (2, 5, 9):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] - 4 + 7) % (len(d) - 4) + 4
            out, _ = model.decoder(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 1]])  # greedy decoding's identity; a sentence finished
def test_identity_and_shrinking_reorders(order):
    """An identity reorder is skipped without touching the state; the same order over fewer rows
    (the batch shrinks when sentences finish) must still drop the finished rows."""
    extra = ["--moe-experts", "4", "--moe-top-k", "2", "--moe-decoder-routing", "encoder"]
    model, d = build("meo_transformer_tiny", "translation", extra)
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, len(d), (3, 6), generator=g)
    tgt = torch.randint(4, len(d), (3, 7), generator=g)
    tgt[:, 0] = d.eos()
    order = torch.tensor(order)
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=torch.full((3,), 6))
        state, outs = {}, []
        for t in range(tgt.size(1)):
            if t == 4:
                before = dict(state)
                model.decoder.reorder_incremental_state_scripting(state, order)
                if len(order) == 3:  # nothing replaced
                    assert all(state[k] is v for k, v in before.items())
                enc = model.encoder.reorder_encoder_out(enc, order)
                tgt, outs = tgt.index_select(0, order), [o.index_select(0, order) for o in outs]
            y, _ = model.decoder(tgt[:, : t + 1], encoder_out=enc, incremental_state=state)
            outs.append(y[:, -1])
        full, _ = model.decoder(tgt, encoder_out=enc)
    assert full.size(0) == len(order)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-4, atol=1e-4)
