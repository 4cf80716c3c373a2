"""Expert layers: MEO == vanilla MoE, upcycling, padding, causality, incremental decoding,
compressed experts, merge/mix paths, half precision.

Layers are built in float64; the router computes its gates in fp32 by design, so comparisons
that go through gates of different layers use the same router parameters and inputs (equal fp32
gates) and comparisons against a dense function allow for fp32 gate sums (|sum g - 1| ~ 1e-7).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from meo_fairseq.modules import (
    ExpertLinear,
    MoEConfig,
    MoEFFN,
    Router,
    StackedExperts,
    TokenBlock,
    reorder_state,
)
from meo_fairseq.modules import decoding as decoding_mod
from meo_fairseq.modules import layer as layer_mod

D = torch.float64
DM, FF, DC = 8, 12, 5  # model dim, ffn dim, encoder context dim
SEG = PRE = 3  # segment length / prefix length

# (batch, seq, experts, top_k)
SHAPES = [(1, 1, 1, 1), (2, 5, 4, 2), (3, 7, 8, 3), (2, 9, 4, 4)]
KINDS = ["linear", "ffn", "ffn-unit"]  # ExpertLinear; MoEFFN, unit linear; MoEFFN, unit ffn

TIGHT = dict(rtol=1e-10, atol=1e-10)
FP32_GATES = dict(rtol=1e-6, atol=1e-6)
# Incremental decoding against teacher forcing: the router computes in fp32 (whatever the input
# dtype) and decoding accumulates its segment / prefix means step by step, in another summation
# order than the teacher-forced mean. The gates then agree to fp32 precision, not fp64's: measured
# differences of the outputs reach 1.6e-7 on some CPUs of this kind (bit-identical on others).
DECODE = FP32_GATES


def cfg_for(mode, routing, n=4, k=2, **kw):
    if routing == "token":
        kw.setdefault("level", "token")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `full` routing warns by design
        return MoEConfig(
            mode=mode, routing=routing, experts=n, top_k=k, segment_length=SEG, prefix_length=PRE, **kw
        )


def randomize_(m):
    """Routers, token blocks and compressed scales start at identity/zero; make them matter."""
    with torch.no_grad():
        for sub in m.modules():
            if isinstance(sub, Router):
                sub.w_gate.normal_()
                sub.w_noise.normal_().mul_(0.3)
                sub.default_logits.normal_()
            elif isinstance(sub, TokenBlock):
                sub.up.weight.normal_().mul_(0.3)
                sub.up.bias.normal_().mul_(0.3)
            elif isinstance(sub, StackedExperts) and sub.scales is not None:
                sub.scales.uniform_(0.5, 1.5)
    return m


def make(kind, cfg, seed=0, dtype=D):
    torch.manual_seed(seed)
    dc = DC if cfg.routing == "encoder" else None
    if kind == "linear":
        m = ExpertLinear(DM, FF, cfg, router_dim=dc)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unit_cfg = cfg.with_(expert_unit="ffn" if kind == "ffn-unit" else "linear")
        m = MoEFFN(DM, FF, unit_cfg, router_dim=dc)
    return randomize_(m).to(dtype)


def twin(m, kind, cfg, strict=True):
    """A layer of the same kind with another config and the same parameters."""
    other = make(kind, cfg, seed=123)
    other.load_state_dict(m.state_dict(), strict=strict)
    return other


def data(b, t, routing, seed=0, dtype=D):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(b, t, DM, generator=g).to(dtype)
    ctx = torch.randn(b, DC, generator=g).to(dtype) if routing == "encoder" else None
    return x, ctx


def aux(m):
    return sum(
        (r.aux_loss for r in m.modules() if isinstance(r, Router) and r.aux_loss is not None), torch.zeros(())
    )


def forward_backward(m, x, ctx=None, pad=None, seed=None):
    """Output, and gradients of (y * probe).sum() + aux w.r.t. x and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = m(x, pad, ctx)
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * probe).sum() + aux(m).to(y.dtype)
    names, params = zip(*m.named_parameters())
    grads = torch.autograd.grad(loss, (x,) + params, allow_unused=True)
    out = {"x": grads[0]}
    for name, p, g in zip(names, params, grads[1:]):
        out[name] = torch.zeros_like(p) if g is None else g
    return y.detach(), out


ROUTER_TOL = dict(rtol=1e-5, atol=1e-6)


def assert_grads_close(ga, gb, router_tol=None, tol=TIGHT):
    """Expert gradients tight; at fp32 precision the router parameters and what feeds a router
    (x, and fc1 when fc2 has its own router reading fc1's output)."""
    if router_tol is None:
        router_tol = ROUTER_TOL
    assert ga.keys() == gb.keys()
    fc2_routes = any(k.startswith("fc2.router") for k in ga)
    for k in ga:
        fp32 = "router" in k or k == "x" or (fc2_routes and k.startswith("fc1."))
        t = router_tol if fp32 else tol
        torch.testing.assert_close(ga[k], gb[k], **t, msg=lambda s, k=k: f"{k}: {s}")


def ragged_pad(b, t, seed=0):
    lengths = torch.randint(1, t + 1, (b,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = t
    return torch.arange(t)[None] >= lengths[:, None]


# ---- MEO == vanilla MoE ----------------------------------------------------------------------


@pytest.mark.parametrize("b,t,n,k", SHAPES)
@pytest.mark.parametrize("routing", ["sequence", "segment", "prefix", "encoder", "full"])
@pytest.mark.parametrize("kind", ["linear", "ffn"])
@pytest.mark.parametrize("train", [False, True])
def test_meo_equals_vanilla_moe_with_the_same_gates(b, t, n, k, routing, kind, train):
    meo = make(kind, cfg_for("meo", routing, n, k)).train(train)
    moe = twin(meo, kind, cfg_for("moe", routing, n, k)).train(train)
    x, ctx = data(b, t, routing)
    pad = ragged_pad(b, t) if routing != "encoder" else None
    ya, ga = forward_backward(meo, x, ctx, pad, seed=7)
    yb, gb = forward_backward(moe, x, ctx, pad, seed=7)
    torch.testing.assert_close(ya, yb, **TIGHT)
    assert_grads_close(ga, gb)
    if n > 1:
        assert any(v.abs().sum() > 0 for name, v in ga.items() if "w_gate" in name)  # gates are trained


@pytest.mark.parametrize("kind", ["linear", "ffn"])
def test_meo_equals_vanilla_moe_with_compressed_experts(kind):
    meo = make(kind, cfg_for("meo", "segment", 6, 3, compressed_experts=1))
    moe = twin(meo, kind, cfg_for("moe", "segment", 6, 3, compressed_experts=1))
    x, _ = data(3, 8, "segment")
    ya, ga = forward_backward(meo, x, seed=7)
    yb, gb = forward_backward(moe, x, seed=7)
    torch.testing.assert_close(ya, yb, **TIGHT)
    assert_grads_close(ga, gb)
    assert any(v.abs().sum() > 0 for name, v in ga.items() if "scales" in name)


@pytest.mark.parametrize(
    "mode,routing",
    [("moe", "token")]
    + [(m, r) for m in ("moe", "meo") for r in ("sequence", "segment", "prefix", "encoder")],
)
def test_expert_linear_equals_naive_reference_with_router_gates(mode, routing):
    """y[b, t] = sum_i g_i(b, t) (W_i x[b, t] + b_i), the gates taken from the router itself."""
    m = make("linear", cfg_for(mode, routing, 8, 3)).eval()
    x, ctx = data(3, 8, routing)
    y = m(x, None, ctx)
    r = m.router(x, None, ctx)
    gates = r.gates if r.bounds is None else r.gates.repeat_interleave(torch.tensor(r.bounds).diff(), 1)
    ex = m.experts
    ref = torch.einsum("btn,noi,bti->bto", gates.double(), ex.weight, x) + gates.double() @ ex.bias
    torch.testing.assert_close(y, ref, **TIGHT)


def test_ffn_unit_reference_meo_and_moe():
    """Expert unit ffn: MEO merges fc1 and fc2 with one gate vector; MoE mixes whole expert FFNs."""
    x, _ = data(2, 6, "sequence")
    meo = make("ffn-unit", cfg_for("meo", "sequence", 4, 2)).eval()
    g = meo.router(x).gates[:, 0].double()  # [B, N]
    e1, e2 = meo.fc1.experts, meo.fc2.experts
    w1, b1 = torch.einsum("bn,noi->boi", g, e1.weight), g @ e1.bias
    w2, b2 = torch.einsum("bn,noi->boi", g, e2.weight), g @ e2.bias
    h = F.relu(torch.einsum("boi,bti->bto", w1, x) + b1[:, None])
    ref = torch.einsum("boi,bti->bto", w2, h) + b2[:, None]
    torch.testing.assert_close(meo(x), ref, **TIGHT)

    moe = make("ffn-unit", cfg_for("moe", "token", 4, 2)).eval()
    g = moe.router(x).gates.double()  # [B, T, N]
    e1, e2 = moe.fc1.experts, moe.fc2.experts
    ref = 0
    for i in range(4):
        yi = F.linear(F.relu(F.linear(x, e1.weight[i], e1.bias[i])), e2.weight[i], e2.bias[i])
        ref = ref + g[..., i : i + 1] * yi
    torch.testing.assert_close(moe(x), ref, **TIGHT)


def test_token_level_meo_is_token_block_then_sequence_merge():
    m = make("linear", cfg_for("meo", "sequence", 4, 2, level="token")).eval()
    assert m.token_block is not None
    x, _ = data(2, 5, "sequence")
    g = m.router(x).gates[:, 0].double()  # routed on x, before the token block
    tb = m.token_block
    xt = x + tb.up(F.relu(tb.down(x)))
    w, b = torch.einsum("bn,noi->boi", g, m.experts.weight), g @ m.experts.bias
    torch.testing.assert_close(m(x), torch.einsum("boi,bti->bto", w, xt) + b[:, None], **TIGHT)


# ---- one expert / upcycling == dense ---------------------------------------------------------


def dense_ffn(x, w1, b1, w2, b2):
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mode,routing", [("moe", "token"), ("moe", "sequence"), ("meo", "sequence"), ("meo", "segment")]
)
def test_one_expert_top1_equals_dense(kind, mode, routing):
    m = make(kind, cfg_for(mode, routing, 1, 1)).train()
    x, _ = data(3, 7, routing)
    y, g = forward_backward(m, x, seed=0)
    xr = x.clone().requires_grad_(True)
    if kind == "linear":
        w, b = (
            m.experts.weight.detach()[0].requires_grad_(True),
            m.experts.bias.detach()[0].requires_grad_(True),
        )
        yr = F.linear(xr, w, b)
        ref_params = {"experts.weight": w, "experts.bias": b}
    else:
        w1, b1 = (
            m.fc1.experts.weight.detach()[0].requires_grad_(True),
            m.fc1.experts.bias.detach()[0].requires_grad_(True),
        )
        w2, b2 = (
            m.fc2.experts.weight.detach()[0].requires_grad_(True),
            m.fc2.experts.bias.detach()[0].requires_grad_(True),
        )
        yr = dense_ffn(xr, w1, b1, w2, b2)
        ref_params = {
            "fc1.experts.weight": w1,
            "fc1.experts.bias": b1,
            "fc2.experts.weight": w2,
            "fc2.experts.bias": b2,
        }
    torch.testing.assert_close(y, yr.detach(), **TIGHT)
    probe = torch.linspace(-1, 1, yr.numel(), dtype=D).view_as(yr)
    grads = torch.autograd.grad((yr * probe).sum(), [xr] + list(ref_params.values()))
    torch.testing.assert_close(g["x"], grads[0], **TIGHT)
    for (name, _), gr in zip(ref_params.items(), grads[1:]):
        torch.testing.assert_close(g[name][0], gr, **TIGHT)
    for name, v in g.items():
        if "router" in name:
            assert v.abs().max() == 0, name
    assert aux(m).item() == 0.0


UPCYCLE_CFGS = [
    dict(mode="dense", routing="sequence"),
    dict(mode="moe", routing="token"),
    dict(mode="moe", routing="sequence"),
    dict(mode="meo", routing="sequence"),
    dict(mode="meo", routing="sequence", level="token"),
    dict(mode="meo", routing="sequence", top_k=3, compressed_experts=1),
    dict(mode="moe", routing="token", top_k=3, compressed_experts=2),
    dict(mode="meo", routing="segment"),
    dict(mode="meo", routing="prefix", level="token", top_k=3, compressed_experts=1),
    dict(mode="meo", routing="encoder"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", UPCYCLE_CFGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("dense_bias", [True, False])
def test_upcycled_layer_equals_dense_source(kind, spec, dense_bias):
    spec = dict(spec)
    cfg = cfg_for(spec.pop("mode"), spec.pop("routing"), n=6, k=spec.pop("top_k", 2), **spec)
    m = make(kind, cfg).train()  # randomized routers / token blocks / scales, all reset by upcycling
    torch.manual_seed(5)
    fc1, fc2 = (
        torch.nn.Linear(DM, FF, bias=dense_bias).double(),
        torch.nn.Linear(FF, DM, bias=dense_bias).double(),
    )
    if kind == "linear":
        m.upcycle_(fc1.weight, fc1.bias)
        dense = fc1
    else:
        m.upcycle_(fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        dense = lambda v: fc2(F.relu(fc1(v)))  # noqa: E731
    x, ctx = data(3, 7, cfg.routing)
    pad = ragged_pad(3, 7)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    for _ in range(2):  # two noise draws in train mode
        y = m(xa, pad, ctx)
        yr = dense(xb)
        torch.testing.assert_close(y, yr, **FP32_GATES)
        (ga,) = torch.autograd.grad(y.sum(), [xa])
        (gb,) = torch.autograd.grad(yr.sum(), [xb])
        torch.testing.assert_close(ga, gb, **FP32_GATES)
    for r in m.modules():
        if isinstance(r, Router):
            assert all(p.abs().max() == 0 for p in r.parameters())


# ---- padding ---------------------------------------------------------------------------------

PAD_CASES = [
    ("moe", "token"),
    ("moe", "sequence"),
    ("meo", "sequence"),
    ("moe", "segment"),
    ("meo", "segment"),
    ("meo", "prefix"),
    ("moe", "prefix"),
    ("meo", "encoder"),
]


def per_position(r, t):
    return r.gates if r.bounds is None else r.gates.repeat_interleave(torch.tensor(r.bounds).diff(), 1)


def routers_of(m):
    """The router of the layer (for an FFN with one router per linear: fc1's)."""
    return m.router if m.router is not None else m.fc1.router


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mode,routing,side",
    # left padding shifts positions, so only position-free sequence routing must ignore it
    [(m, r, "right") for m, r in PAD_CASES] + [("moe", "sequence", "left"), ("meo", "sequence", "left")],
)
def test_padding_changes_nothing_at_real_positions(kind, mode, routing, side):
    m = make(kind, cfg_for(mode, routing, 6, 2)).eval()
    b, t = 4, 8
    x, ctx = data(b, t, routing)
    lengths = [8, 3, 5, 1]
    pad = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if side == "right":
            pad[i, n:] = True
        else:
            pad[i, : t - n] = True
    x = x.masked_fill(pad[..., None], 1e3)  # loud junk at pad positions
    y = m(x, pad, ctx)
    router = routers_of(m)
    gates = per_position(router(x, pad, ctx), t)
    for i, n in enumerate(lengths):
        real = slice(0, n) if side == "right" else slice(t - n, t)
        xi = x[i : i + 1, real]
        ci = ctx[i : i + 1] if ctx is not None else None
        # masked and plain means may round differently in fp32: gates agree to fp32 precision
        torch.testing.assert_close(y[i, real], m(xi, None, ci)[0], **FP32_GATES)
        torch.testing.assert_close(
            gates[i, real], per_position(router(xi, None, ci), n)[0], rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("kind", ["linear", "ffn-unit"])
@pytest.mark.parametrize("mode,routing", PAD_CASES)
def test_right_padding_changes_neither_aux_loss_nor_outputs(kind, mode, routing):
    m = make(kind, cfg_for(mode, routing, 6, 2, z_loss_weight=1e-3)).eval()
    x, ctx = data(3, 7, routing)
    y = m(x, None, ctx)
    loss = aux(m)
    xp = torch.cat([x, 1e3 * torch.ones(3, 4, DM, dtype=D)], 1)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[:, 7:] = True
    yp = m(xp, pad, ctx)
    torch.testing.assert_close(yp[:, :7], y, **FP32_GATES)
    torch.testing.assert_close(aux(m), loss, rtol=1e-5, atol=1e-9)
    assert loss > 0


# ---- causality -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mode,routing",
    [
        ("moe", "token"),
        ("meo", "encoder"),
        ("moe", "encoder"),
        ("meo", "segment"),
        ("moe", "segment"),
        ("meo", "prefix"),
        ("moe", "prefix"),
        ("meo", "full"),
    ],
)
def test_causality(kind, mode, routing):
    m = make(kind, cfg_for(mode, routing, 6, 2, level="token" if routing == "token" else "sequence")).eval()
    t = 8
    x, ctx = data(2, t, routing)
    y = m(x, None, ctx)
    leaked = False
    for pos in [0, 1, 2, 3, 5, 7]:  # inside the first segment / prefix, at and after the boundary
        x2 = x.clone()
        x2[:, pos] = 3 * torch.randn(2, DM, dtype=D)
        y2 = m(x2, None, ctx)
        assert not torch.allclose(y2[:, pos], y[:, pos])  # the change is visible where it is made
        if routing == "full":
            leaked |= pos > 0 and not torch.allclose(y2[:, :pos], y[:, :pos], rtol=1e-9, atol=1e-9)
        else:
            torch.testing.assert_close(y2[:, :pos], y[:, :pos], rtol=0, atol=1e-12)
    assert leaked == (routing == "full")


# ---- incremental decoding --------------------------------------------------------------------

INC_CASES = [
    ("moe", "token", {}),
    ("moe", "encoder", {}),
    ("meo", "encoder", {}),
    ("moe", "segment", {}),
    ("meo", "segment", {}),
    ("moe", "prefix", {}),
    ("meo", "prefix", {}),
    ("meo", "segment", dict(top_k=3, compressed_experts=1)),
    ("meo", "prefix", dict(level="token")),
    ("meo", "encoder", dict(merge_min_tokens=1e9)),  # MEO taking the compute-then-mix path
    ("moe", "token", dict(top_k=3, compressed_experts=2)),
]


def decode(m, x, ctx, chunks, state=None, start=0):
    state = {} if state is None else state
    outs, p = [], start
    for c in chunks:
        outs.append(m(x[:, p : p + c], None, ctx, state))
        p += c
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,routing,extra", INC_CASES, ids=lambda v: str(v))
def test_incremental_decoding_equals_teacher_forcing(kind, mode, routing, extra):
    extra = dict(extra)
    k = extra.pop("top_k", 2)
    m = make(kind, cfg_for(mode, routing, 6, k, **extra)).eval()
    b, t = 3, 8
    x, ctx = data(b, t, routing)
    with torch.no_grad():
        y = m(x, None, ctx)
        for chunks in ([1] * t, [2, 3, 1, 2]):  # one at a time; chunks across boundaries
            yi, _ = decode(m, x, ctx, chunks)
            torch.testing.assert_close(yi, y, **DECODE, msg=lambda s, chunks=chunks: f"chunks {chunks}: {s}")

        # beam search: reorder the state after `t0` steps, go on with the reordered batch
        # (inside the first segment / prefix, a permutation) and (after it, beam-style repeats)
        for t0, order in ((2, [2, 0, 1]), (4, [2, 2])):  # a permutation; repeats + finished rows dropped
            new_order = torch.tensor(order)
            _, state = decode(m, x, ctx, [1] * t0)
            state = reorder_state(state, new_order)
            xo = x[new_order]
            co = ctx[new_order] if ctx is not None else None
            yo, _ = decode(m, xo, co, [1] * (t - t0), state, start=t0)
            torch.testing.assert_close(yo, m(xo, None, co)[:, t0:], **DECODE)


@pytest.mark.parametrize("kind,keys", [("linear", ("merged",)), ("ffn-unit", ("merged1", "merged2"))])
@pytest.mark.parametrize("routing,merges", [("encoder", 1), ("segment", 3), ("prefix", 2)])
def test_decoding_merges_once_per_gate_change(monkeypatch, kind, keys, routing, merges):
    """One merge per source (encoder), per segment, per prefix phase; cached in between."""
    m = make(kind, cfg_for("meo", routing, 6, 2, merge_min_tokens=0)).eval()
    calls = []
    real = decoding_mod.merge_weights

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(decoding_mod, "merge_weights", spy)
    x, ctx = data(2, 8, routing)
    with torch.no_grad():
        yi, state = decode(m, x, ctx, [1] * 8)
        torch.testing.assert_close(yi, m(x, None, ctx), **DECODE)
    assert len(calls) == merges * len(keys)
    for key in keys:  # the cache holds the merged weights of the current gates
        assert state[key].version == state["router"]["version"]


def test_runs_finds_beam_blocks():
    a, b, c = torch.eye(3, dtype=D)
    assert decoding_mod._runs(torch.stack([a, a, b, b, c, c])) == 2
    assert decoding_mod._runs(torch.stack([a, a, b, b, a, a])) == 2  # equal gates of other sentences
    assert decoding_mod._runs(torch.stack([a, a, a, a])) == 4  # one sentence, four beams
    assert decoding_mod._runs(torch.stack([a, a, b])) == 1  # uneven
    assert decoding_mod._runs(torch.stack([a, b, a, b])) == 1
    assert decoding_mod._runs(torch.stack([a, a, b, c])) == 1
    assert decoding_mod._runs(a.unsqueeze(0)) == 1


@pytest.mark.parametrize("kind,keys", [("linear", ("merged",)), ("ffn-unit", ("merged1", "merged2"))])
def test_beam_search_merges_once_per_sentence(monkeypatch, kind, keys):
    """Beams repeat their sentence's gates: one merged matrix per sentence, kept through beam
    reorders, shrinking batches and (falling back to one per row) orders that mix sentences."""
    m = make(kind, cfg_for("meo", "encoder", 6, 2, merge_min_tokens=0)).eval()
    rows = []
    real = decoding_mod.merge_weights
    monkeypatch.setattr(decoding_mod, "merge_weights", lambda g, *a: rows.append(g.size(0)) or real(g, *a))
    beam, t = 3, 6
    xs, ctx = data(4, t, "encoder")
    x = xs.repeat_interleave(beam, 0)  # 4 sentences x 3 beams, consecutive as in fairseq
    c = ctx.repeat_interleave(beam, 0)
    with torch.no_grad():
        y = m(x, None, c)
        _, state = decode(m, x, c, [1] * 2)
        assert rows == [4] * len(keys)  # merged once per sentence, not per beam
        assert all(state[k].block == beam and state[k].weight.size(0) == 4 for k in keys)
        for order, block, matrices in (
            ([1, 1, 0, 5, 3, 4, 8, 8, 8, 9, 11, 10], beam, 4),  # beam reorder inside each sentence
            ([3, 4, 4, 9, 9, 10], beam, 2),  # sentences 0 and 2 finished
            ([0, 3, 3], 1, 3),  # a new block takes rows of two sentences: one matrix per row
        ):
            new_order = torch.tensor(order)
            state = reorder_state(state, new_order)
            x, c, y = x[new_order], c[new_order], y[new_order]
            assert all(state[k].block == block and state[k].weight.size(0) == matrices for k in keys)
            yo, state = decode(m, x, c, [1] * 2, state, start=2)  # (encoder gates: any position)
            torch.testing.assert_close(yo, y[:, 2:4], **DECODE)
        assert rows == [4] * len(keys)  # never merged again: reorders select


def test_reorder_state_nested():
    s = {
        "a": torch.arange(6).view(3, 2),
        "b": (torch.tensor([1.0, 2.0, 3.0]), None),
        "pos": 4,
        "c": [torch.tensor(7.0), {"d": torch.arange(3)}],
    }
    r = reorder_state(s, torch.tensor([2, 2, 0]))
    assert torch.equal(r["a"], torch.tensor([[4, 5], [4, 5], [0, 1]]))
    assert torch.equal(r["b"][0], torch.tensor([3.0, 3.0, 1.0])) and r["b"][1] is None
    assert r["pos"] == 4 and r["c"][0].item() == 7.0
    assert torch.equal(r["c"][1]["d"], torch.tensor([2, 2, 0]))


def test_reorder_state_identity_keeps_tensors_and_shrinking_still_selects():
    s = {"w": torch.arange(6.0).view(3, 2), "t": (torch.arange(3),)}
    same = reorder_state(s, torch.arange(3))
    assert same["w"] is s["w"] and same["t"][0] is s["t"][0]  # nothing copied
    first_two = reorder_state(s, torch.arange(2))  # sentences finished: the batch shrinks
    assert torch.equal(first_two["w"], torch.tensor([[0.0, 1.0], [2.0, 3.0]])) and torch.equal(
        first_two["t"][0], torch.arange(2)
    )


# ---- compressed experts ----------------------------------------------------------------------


def test_no_compressed_experts_is_vanilla_top_k():
    for mode in ("moe", "meo"):
        m = make("linear", cfg_for(mode, "sequence", 6, 3, compressed_experts=0)).eval()
        assert m.experts.scales is None
        x, _ = data(3, 5, "sequence")
        logits = x.float().mean(1) @ m.router.w_gate.float()
        v, i = logits.topk(3, -1)
        g = torch.zeros(3, 6).scatter(1, i, torch.softmax(v, -1)).double()
        ex = m.experts
        ref = torch.einsum("bn,noi,bti->bto", g, ex.weight, x) + (g @ ex.bias)[:, None]
        torch.testing.assert_close(m(x), ref, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mode,routing", [("moe", "token"), ("moe", "sequence"), ("meo", "sequence"), ("meo", "segment")]
)
@pytest.mark.parametrize("k,nce", [(2, 1), (4, 2)])
def test_compressed_experts_with_unit_scales_equal_top_k_minus_nce(kind, mode, routing, k, nce):
    comp = make(kind, cfg_for(mode, routing, 6, k, compressed_experts=nce))
    with torch.no_grad():
        for sub in comp.modules():
            if isinstance(sub, StackedExperts):
                sub.scales.fill_(1.0)
    plain = twin(comp, kind, cfg_for(mode, routing, 6, k - nce), strict=False)
    x, _ = data(3, 7, routing)
    for train in (False, True):  # in training the same noise draw gives the same top-(k - n_ce)
        comp.train(train), plain.train(train)
        torch.manual_seed(3)
        ya = comp(x)
        torch.manual_seed(3)
        yb = plain(x)
        torch.testing.assert_close(ya, yb, **FP32_GATES)


@pytest.mark.parametrize("mode", ["moe", "meo"])
def test_compressed_experts_reference(mode):
    """Main experts see x scaled by the gate-merged scaling vectors of the compressed experts."""
    n, k, nce = 6, 4, 2
    m = make("linear", cfg_for(mode, "sequence", n, k, compressed_experts=nce)).eval()
    x, _ = data(3, 5, "sequence")
    logits = x.float().mean(1) @ m.router.w_gate.float()
    v, i = logits.topk(k, -1)
    g = torch.zeros(3, n).scatter(1, i[:, : k - nce], torch.softmax(v[:, : k - nce], -1)).double()
    c = torch.zeros(3, n).scatter(1, i[:, k - nce :], torch.softmax(v[:, k - nce :], -1)).double()
    ex = m.experts
    xs = x * (c @ ex.scales)[:, None]
    ref = torch.einsum("bn,noi,bti->bto", g, ex.weight, xs) + (g @ ex.bias)[:, None]
    torch.testing.assert_close(m(x), ref, **TIGHT)


@pytest.mark.parametrize("mode", ["moe", "meo"])
def test_compressed_experts_reference_ffn_unit(mode):
    """Whole-FFN experts: fc1 inputs scaled by the merged fc1 scales, fc2 inputs by the fc2 ones."""
    n, k, nce = 6, 3, 1
    m = make("ffn-unit", cfg_for(mode, "sequence", n, k, compressed_experts=nce)).eval()
    x, _ = data(3, 5, "sequence")
    r = m.router(x)
    g, c = r.gates[:, 0].double(), r.ce[:, 0].double()
    assert (c > 0).sum(-1).eq(nce).all() and (g > 0).sum(-1).eq(k - nce).all()
    e1, e2 = m.fc1.experts, m.fc2.experts
    s1, s2 = (c @ e1.scales)[:, None], (c @ e2.scales)[:, None]
    if mode == "moe":
        ref = 0
        for i in range(n):
            h = s2 * F.relu(F.linear(s1 * x, e1.weight[i], e1.bias[i]))
            ref = ref + g[:, i, None, None] * F.linear(h, e2.weight[i], e2.bias[i])
    else:
        w1, b1 = torch.einsum("bn,noi->boi", g, e1.weight), (g @ e1.bias)[:, None]
        w2, b2 = torch.einsum("bn,noi->boi", g, e2.weight), (g @ e2.bias)[:, None]
        h = s2 * F.relu(torch.einsum("boi,bti->bto", w1, s1 * x) + b1)
        ref = torch.einsum("boi,bti->bto", w2, h) + b2
    torch.testing.assert_close(m(x), ref, **TIGHT)


# ---- merge vs mix paths, cost model ----------------------------------------------------------


@pytest.mark.parametrize("routing", ["sequence", "segment", "prefix", "encoder"])
@pytest.mark.parametrize("b,t,n,k", SHAPES[1:])
def test_meo_merge_and_mix_paths_agree(monkeypatch, routing, b, t, n, k):
    merge = make("linear", cfg_for("meo", routing, n, k, merge_min_tokens=0))
    mix = twin(merge, "linear", cfg_for("meo", routing, n, k, merge_min_tokens=1e9))
    used = []
    for name in ("merged_linear", "mix_linear"):
        real = getattr(layer_mod, name)
        monkeypatch.setattr(
            layer_mod, name, lambda *a, _real=real, _name=name: used.append(_name) or _real(*a)
        )
    x, ctx = data(b, t, routing)
    ya, ga = forward_backward(merge, x, ctx, ragged_pad(b, t) if routing != "encoder" else None, seed=1)
    assert set(used) == {"merged_linear"}
    used.clear()
    yb, gb = forward_backward(mix, x, ctx, ragged_pad(b, t) if routing != "encoder" else None, seed=1)
    assert set(used) == {"mix_linear"}
    torch.testing.assert_close(ya, yb, **TIGHT)
    assert_grads_close(ga, gb)


def test_cost_model():
    m = ExpertLinear(512, 2048, MoEConfig(mode="meo", experts=16, top_k=4))
    assert m.choose_merge(16, 128, cached=False)  # a training batch: merge once per sequence
    assert not m.choose_merge(16, 1, cached=False)  # a decoding step: run the selected experts
    assert m.choose_merge(1, 4096, cached=False)
    assert m.choose_merge(16, 1, cached=True)  # ... unless the merged weights are cached
    assert not m.choose_merge(192, 1, cached=True)  # 192 sentences: mixing reads fewer weights
    assert m.choose_merge(32, 6, cached=True)  # 32 sentences x 6 beams sharing their gates
    top2 = ExpertLinear(512, 2048, MoEConfig(mode="meo", experts=8, top_k=2))
    assert top2.choose_merge(5, 400, cached=False)  # whole documents: merge
    assert not top2.choose_merge(64, 32, cached=False)  # segments of 32 tokens, top-2: mix
    tiny = ExpertLinear(64, 256, MoEConfig(mode="meo", experts=8, top_k=2))
    assert tiny.choose_merge(64, 32, cached=False)  # small layers: per-expert calls dominate
    forced = ExpertLinear(8, 8, MoEConfig(mode="meo", experts=16, top_k=4, merge_min_tokens=10))
    assert forced.choose_merge(16, 10, cached=False) and not forced.choose_merge(16, 9, cached=False)


# ---- bf16 with huge logits -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "mode,routing", [("moe", "token"), ("meo", "sequence"), ("meo", "segment"), ("meo", "prefix")]
)
@pytest.mark.parametrize("nce", [0, 1])
def test_bf16_huge_logits_stay_finite(kind, mode, routing, nce):
    m = make(
        kind, cfg_for(mode, routing, 4, 2, compressed_experts=nce, z_loss_weight=1e-3), dtype=torch.float32
    )
    routings = []
    with torch.no_grad():
        for r in m.modules():
            if isinstance(r, Router):
                r.w_gate.mul_(1e4)
                r.w_noise.mul_(1e4)
                r.default_logits.mul_(1e4)
                # the layers call router.routing (not the module: its output is no tensor)
                r.routing = (lambda f: lambda *a, **k: routings.append(f(*a, **k)) or routings[-1])(r.routing)
    m = m.to(torch.bfloat16)
    x, _ = data(3, 7, routing, dtype=torch.bfloat16)
    x.requires_grad_(True)
    for train in (False, True):
        m.train(train)
        routings.clear()
        y = m(x, ragged_pad(3, 7))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        assert routings
        for rt in routings:
            assert torch.isfinite(rt.gates).all() and (rt.ce is None or torch.isfinite(rt.ce).all())
        loss = aux(m)
        assert torch.isfinite(loss) and loss > 0
        grads = torch.autograd.grad(y.float().sum() + loss, [x] + list(m.parameters()), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
