"""reference.py against every fast path; the reference path without host syncs (op counts that do
not depend on the data, zero graph breaks, compiled equals eager); impl selection; fairseq's NaN
detector on the layers."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from meo_fairseq.modules import MoEConfig, MoEFFN, Router, merged_linear, mix_linear, reference, set_impl
from meo_fairseq.modules.gating import noisy_top_k_gating

D, FF = 8, 12


def _randomize_(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in m.modules():
            if isinstance(r, Router):
                for p in (r.w_gate, r.w_noise, r.default_logits):
                    p.copy_(torch.randn(p.shape, generator=g))
    return m


def _step(cfg, impl, x, pad, train=True, context=None):
    """Outputs, input gradient, aux loss and every parameter gradient of one step."""
    torch.manual_seed(0)
    router_dim = D if context is not None else None  # (encoder routing: every router reads the context)
    m = _randomize_(MoEFFN(D, FF, cfg.with_(impl=impl), router_dim=router_dim)).train(train)
    torch.manual_seed(1)  # the same gate noise on both paths
    xi = x.clone().requires_grad_(True)
    y = m(xi, pad, context)
    aux = sum((r.aux_loss for r in m.routers() if r.aux_loss is not None), torch.zeros(()))
    (y.square().sum() + aux).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    return [y, xi.grad, aux] + grads


CASES = [
    # mode, level, routing, unit, compressed experts, balance loss
    ("meo", "sequence", "sequence", "linear", 0, "cv"),
    ("meo", "token", "sequence", "linear", 0, "cv"),
    ("meo", "sequence", "segment", "linear", 0, "cv"),
    ("meo", "sequence", "prefix", "ffn", 0, "switch"),
    ("meo", "sequence", "encoder", "linear", 1, "cv"),
    ("meo", "sequence", "sequence", "ffn", 1, "none"),
    ("moe", "token", "token", "linear", 0, "cv"),
    ("moe", "token", "token", "linear", 0, "switch"),
    ("moe", "token", "token", "ffn", 1, "cv"),
    ("moe", "sequence", "sequence", "linear", 0, "cv"),
    ("moe", "sequence", "segment", "ffn", 0, "cv"),
    ("meo", "sequence", "sequence", "linear", 2, "cv", dict(compressed_weighting="authors")),
    ("moe", "token", "token", "ffn", 1, "cv", dict(compressed_weighting="authors")),
    ("meo", "token", "segment", "linear", 0, "cv", dict(token_block_order="block_first")),
    ("meo", "token", "prefix", "ffn", 1, "switch", dict(token_block_order="block_first")),
]


def _case_config(case, noise):
    mode, level, routing, unit, nce, balance, *extra = case
    return MoEConfig(
        mode=mode,
        level=level,
        routing=routing,
        experts=4,
        top_k=min(4, 2 + nce),
        expert_unit=unit,
        segment_length=3,
        prefix_length=3,
        compressed_experts=nce,
        balance_loss=balance,
        z_loss_weight=1e-3,
        gate_noise=noise,
        **(extra[0] if extra else {}),
    )


def _case_inputs(case):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 10, D, generator=g)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    context = torch.randn(3, D, generator=g) if case[2] == "encoder" else None
    return x, pad, context


@pytest.mark.parametrize("train,noise", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_equals_blocked_path(case, train, noise):
    """impl="reference" and impl="blocked" (fused gating, blocked merge, compute-then-mix, the cost
    model's choice) compute the same values, aux loss and gradients (fp32 router: 1e-5)."""
    cfg = _case_config(case, noise)
    x, pad, context = _case_inputs(case)
    ref = _step(cfg, "reference", x, pad, train, context)
    fast = _step(cfg, "blocked", x, pad, train, context)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_nodes_equal_plain_autograd(case, noise, monkeypatch):
    """impl="reference" with its fused autograd nodes (reference.MergedLinear,
    gating.NoisyTopKGating) against the same path in plain autograd (reference.FUSED = False):
    values, aux loss and every gradient (fp32 router: 1e-5)."""
    cfg = _case_config(case, noise)
    x, pad, context = _case_inputs(case)
    fused = _step(cfg, "reference", x, pad, True, context)
    monkeypatch.setattr(reference, "FUSED", False)
    plain = _step(cfg, "reference", x, pad, True, context)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_merged_linear_node_equals_plain_autograd_fp64(monkeypatch):
    """reference.MergedLinear against merge_experts + apply_merged in plain autograd, in fp64 (tight),
    with and without bias and for every subset of inputs that needs a gradient."""
    g = torch.Generator().manual_seed(4)
    n, gr, t, din, dout = 5, 3, 7, 6, 4
    x = torch.randn(gr, t, din, generator=g, dtype=torch.float64)
    gates = torch.rand(gr, n, generator=g, dtype=torch.float64) * (torch.rand(gr, n, generator=g) > 0.4)
    w = torch.randn(n, dout, din, generator=g, dtype=torch.float64)
    b = torch.randn(n, dout, generator=g, dtype=torch.float64)
    dy = torch.randn(gr, t, dout, generator=g, dtype=torch.float64)
    for bias in (b, None):
        for need in ((True, True, True, True), (False, True, True, False), (True, False, False, True)):
            outs = []
            for fused in (True, False):
                monkeypatch.setattr(reference, "FUSED", fused)
                leaves = [
                    a.clone().requires_grad_(r) if a is not None else None
                    for a, r in zip((x, gates, w, bias), need)
                ]
                y = reference.merged_linear(*leaves)
                y.backward(dy)
                outs.append([y] + [a.grad for a in leaves if a is not None and a.requires_grad])
            assert len(outs[0]) == len(outs[1]) == 1 + sum(need[:3]) + (need[3] and bias is not None)
            for a, c in zip(*outs):
                torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    small = (x[:2, :3], gates[:2], w, b)  # the node's own backward against finite differences
    assert torch.autograd.gradcheck(
        reference.MergedLinear.apply, [a.clone().requires_grad_(True) for a in small]
    )


def test_merged_linear_backward_holds_one_merged_weight_at_a_time(monkeypatch):
    """The node's backward frees the merged weight it made again (for the input gradient) before it
    makes the merged weight's gradient, as large: with merged weights much larger than the
    activations (many sequences of few tokens), a training step's peak stays near one merged weight
    (it was two)."""
    from meo_fairseq.benchmark.layers import build, peak_memory

    monkeypatch.setattr(reference, "FUSED", True)
    groups, tokens, dim, ffn = 8, 2, 64, 256
    m = build("meo", dim, ffn, 4, 2, "cpu", torch.float32, impl="reference")
    x, probe = torch.randn(groups, tokens, dim), torch.randn(groups, tokens, dim)
    merged = groups * dim * ffn * 4  # bytes of one merged weight (G, out, in), fp32
    activations = groups * tokens * (dim + ffn) * 4 * 8  # generously: every activation 8 times over
    assert merged < peak_memory(m, x, probe) < merged + activations < 1.4 * merged


def test_reference_merged_linear_and_moe_linear_equal_fast_kernels():
    """fp64, no fp32 step: tight."""
    g = torch.Generator().manual_seed(0)
    n, gr, t, din, dout = 5, 4, 6, 12, 8
    x = torch.randn(gr, t, din, generator=g, dtype=torch.float64)
    gates = torch.rand(gr, n, generator=g, dtype=torch.float64) * (torch.rand(gr, n, generator=g) > 0.4)
    w = torch.randn(n, dout, din, generator=g, dtype=torch.float64)
    b = torch.randn(n, dout, generator=g, dtype=torch.float64)
    dy = torch.randn(gr, t, dout, generator=g, dtype=torch.float64)

    def run(fn, *args):
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
        y = fn(*leaves)
        y.backward(dy.reshape(y.shape))
        return [y] + [a.grad for a in leaves if a.is_floating_point()]

    for a, c in zip(run(reference.merged_linear, x, gates, w, b), run(merged_linear, x, gates, w, b)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    xt = x.reshape(gr * t, din)
    idx = torch.randint(0, n, (gr * t, 2), generator=g)
    idx[:, 1] = (idx[:, 0] + 1 + torch.randint(0, n - 1, (gr * t,), generator=g)) % n  # distinct
    wk = torch.rand(gr * t, 2, generator=g, dtype=torch.float64)
    ref = run(lambda xx, ww, wt, bb: reference.moe_linear(xx, idx, ww, wt, bb), xt, wk, w, b)
    fast = run(lambda xx, ww, wt, bb: mix_linear(xx, idx, ww, wt, bb), xt, wk, w, b)
    for a, c in zip(ref, fast):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["torch", "refused", "absent"])
@pytest.mark.parametrize("din,dout,empty", [(16, 8, False), (16, 8, True), (6, 5, False)])
def test_grouped_mm_kernel_and_fallback_equal_per_group_matmuls(
    din, dout, empty, kernel, monkeypatch, caplog
):
    """torch's grouped_mm (16-byte aligned shapes) and the per-group fallback (6, 5) against one
    matmul per group, values and gradients; an expert with no rows gets a zero gradient. The
    fallback also serves a torch without the kernel, or whose kernel refuses the device or dtype
    (said once)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("not implemented for this device")

    monkeypatch.setattr(reference, "_REFUSED", set())
    if kernel != "torch":
        monkeypatch.setattr(reference, "_GROUPED_MM", refuse if kernel == "refused" else None)
    g = torch.Generator().manual_seed(1)
    counts = [3, 0, 5, 2] if empty else [3, 1, 5, 2]
    r = sum(counts)
    a = torch.randn(r, din, generator=g, requires_grad=True)
    b = torch.randn(len(counts), din, dout, generator=g, requires_grad=True)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    dy = torch.randn(r, dout, generator=g)
    y = reference.grouped_mm(a, b, offsets)
    y.backward(dy)
    ga, gb = a.grad, b.grad
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    parts, start = [], 0
    for e, c in enumerate(counts):
        parts.append(a2[start : start + c] @ b2[e])
        start += c
    y2 = torch.cat(parts)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga, a2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, b2.grad, rtol=1e-6, atol=1e-6)
    if empty:
        assert torch.count_nonzero(gb[1]) == 0
    if kernel == "refused" and din == 16:  # (aligned: the kernel was tried, once, then not again)
        assert len(calls) == 1 and caplog.text.count("grouped_mm refuses cpu torch.float32") == 1
    assert not calls or kernel == "refused"


@pytest.mark.parametrize("noisy,keep", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("balance,zw", [("cv", 0.0), ("cv", 1e-3), ("none", 1e-3)])
def test_reference_gating_equals_fused_gating(noisy, keep, balance, zw):
    g = torch.Generator().manual_seed(2)
    gr, d, n, k = 9, 6, 5, 2
    inp = torch.randn(gr, d, generator=g)
    wg, wn = torch.randn(d, n, generator=g), torch.randn(d, n, generator=g) * 0.3
    noise = torch.randn(gr, n, generator=g) if noisy else None
    kp = (torch.rand(gr, generator=g) > 0.3).float() if keep else None
    probe = torch.randn(gr, n, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (inp, wg, wn)]
        gates, w, idx, aux = fn(*leaves)
        ((gates * probe).sum() + (w * probe[:, :k]).sum() + aux).backward()
        return [gates, w, idx, aux] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]

    def ref(i, a, b):
        out, loss = reference.noisy_top_k(
            i, a, b, k, noise, kp, balance=balance, balance_weight=0.01, z_weight=zw
        )
        return out.gates, out.topk_gates, out.topk_idx, loss.aux_loss

    def fused(i, a, b):
        gates, w, idx, aux, _ = noisy_top_k_gating(i, a, b, noise, kp, k, balance, 0.01, zw)
        return gates, w, idx, aux

    for a, c in zip(run(ref), run(fused)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,routing", [("meo", "sequence"), ("meo", "segment"), ("moe", "token")])
@pytest.mark.parametrize("unit", ["linear", "ffn"])
def test_one_expert_equals_a_dense_ffn(mode, routing, unit):
    cfg = MoEConfig(
        mode=mode,
        level="token" if routing == "token" else "sequence",
        routing=routing,
        experts=1,
        top_k=1,
        expert_unit=unit,
        segment_length=3,
        impl="reference",
    )
    m = _randomize_(MoEFFN(D, FF, cfg, activation_fn=F.gelu)).train()
    x = torch.randn(2, 7, D, requires_grad=True)
    y = m(x)
    e1, e2 = m.fc1.experts, m.fc2.experts
    dense = F.linear(F.gelu(F.linear(x, e1.weight[0], e1.bias[0])), e2.weight[0], e2.bias[0])
    torch.testing.assert_close(y, dense, rtol=1e-6, atol=1e-6)
    gx = torch.autograd.grad(y.sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(dense.sum(), x)[0], rtol=1e-6, atol=1e-6)


# ---- no host syncs: op counts, graph breaks, compiled == eager ----------------------------------


def _count_ops(m, x):
    from meo_fairseq.benchmark.layers import count_ops

    return count_ops(m, x, torch.randn(x.shape))["non_view"]


def test_reference_op_count_is_fixed_and_bounded():
    """The reference path's training step has a fixed number of ops (no loop over experts or
    groups, no data-dependent branch): the same for other shapes, experts and data. Bound against
    the dense FFN: see docs/layer-library.md for the measured ratios."""
    from meo_fairseq.benchmark.layers import build

    counts = {}
    for n, k, b, t, seed in [(4, 2, 2, 5, 0), (8, 2, 3, 17, 1), (8, 3, 1, 40, 2)]:
        for v in ("dense", "meo", "meo-token", "moe-token"):
            m = build(v, 16, 32, n, k, "cpu", torch.float32, seed=seed, impl="reference")
            counts.setdefault(v, set()).add(_count_ops(m, torch.randn(b, t, 16)))
    assert all(len(c) == 1 for c in counts.values()), counts
    dense = counts["dense"].pop()
    assert dense == 15  # two addmm, gelu, their backward (mm, mm, sum each, gelu_backward), the loss
    # docs/efficiency.md: 79 for MEO, the two routers' CV loss included (the floor of this layout)
    assert counts["meo"].pop() <= 79 and counts["meo-token"].pop() <= 103 and counts["moe-token"].pop() <= 111
    # bfloat16 (the GPU's precision): the routers compute in fp32, at the cost of a few casts (the
    # router weights and their gradients, the gates); the input is pooled straight into fp32 and
    # the noise weights, unread without noise, are not cast
    bf16 = {
        v: _count_ops(
            build(v, 16, 32, 4, 2, "cpu", torch.bfloat16, impl="reference"), torch.randn(2, 5, 16).bfloat16()
        )
        for v in ("dense", "meo")
    }
    assert bf16["dense"] == 17 and bf16["meo"] <= 93, bf16


class HostSyncs(TorchDispatchMode):
    """Records what makes the host wait for the device: a scalar read (``item``, ``bool``), an
    output whose shape depends on the data (``nonzero``, boolean indexing, ``unique``...), and the
    ``tolist`` / ``item`` calls, which on the CPU dispatch nothing: ``patch(monkeypatch)`` counts
    them (they still work). ``seen``: what was recorded, in order."""

    SYNC = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim"}
    SYNC |= {"unique_consecutive", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen, self.recording = [], False

    def patch(self, monkeypatch):
        for name in ("tolist", "item"):
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        return self

    def _counted(self, name, original):
        def counted(t, *args, **kwargs):
            if self.recording:
                self.seen.append(f"Tensor.{name}")
            return original(t, *args, **kwargs)

        return counted

    def __enter__(self):
        self.recording = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.recording = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNC:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["meo", "meo-token", "moe-token"])
def test_reference_training_and_decoding_steps_never_wait_for_the_device(variant, monkeypatch):
    """The GPU path's promise, checked on the CPU: a training step (forward, auxiliary loss,
    backward) and every incremental decoding step, with and without cached merges, read no value
    of a tensor on the host and make no tensor whose shape depends on the data."""
    from meo_fairseq.benchmark.layers import variant_config

    syncs = HostSyncs().patch(monkeypatch)
    m = _randomize_(MoEFFN(16, 32, variant_config(variant, 4, 2, "reference"))).train()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    x = torch.randn(2, 6, 16, requires_grad=True)
    m(x, pad).sum().backward()  # (warm-up: lazy state)
    with syncs:
        loss = m(x, pad).square().sum() + sum(r.aux_loss for r in m.routers())
        loss.backward()
    assert syncs.seen == []
    if variant == "moe-token":  # (token routing decodes as it trains)
        return
    for unit, routing in (("linear", "encoder"), ("ffn", "prefix")):
        cfg = MoEConfig(mode="meo", experts=4, top_k=2, routing=routing, prefix_length=2, expert_unit=unit)
        cfg = cfg.with_(level=variant_config(variant, 4, 2).level, impl="reference")
        m = _randomize_(MoEFFN(16, 32, cfg, router_dim=16 if routing == "encoder" else None)).eval()
        ctx, state = torch.randn(3, 16), {}
        with torch.no_grad(), syncs:
            for _ in range(4):  # prefix routing fixes its gates after 2 positions; then cached
                m(torch.randn(3, 1, 16), context=ctx, state=state)
        assert syncs.seen == [], (unit, routing)


def _breaks(fn, *args):
    import torch._dynamo

    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    return e.graph_count, e.graph_break_count


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("variant", ["meo", "meo-token", "moe-token"])
def test_training_forward_compiles_without_graph_breaks(variant, impl):
    from meo_fairseq.benchmark.layers import variant_config

    m = _randomize_(MoEFFN(16, 32, variant_config(variant, 4, 2, impl))).train()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    assert _breaks(lambda x: m(x, pad), torch.randn(2, 6, 16, requires_grad=True)) == (1, 0)


@pytest.mark.parametrize("unit,routing", [("linear", "encoder"), ("ffn", "prefix")])
def test_cached_decoding_step_compiles_without_graph_breaks(unit, routing):
    cfg = MoEConfig(mode="meo", experts=4, top_k=2, routing=routing, prefix_length=2, expert_unit=unit)
    m = _randomize_(MoEFFN(16, 32, cfg, router_dim=16 if routing == "encoder" else None)).eval()
    ctx, state = torch.randn(3, 16), {}
    with torch.no_grad():
        for t in (1, 2, 1):  # the merges are cached once the gates are fixed
            m(torch.randn(3, t, 16), context=ctx, state=state)
        x = torch.randn(3, 1, 16)
        y = m(x, state=dict(state))
        assert _breaks(lambda inp: m(inp, state=state), x) == (1, 0)
        torch.testing.assert_close(m(x, state=state), y, rtol=0, atol=0)


def test_compiled_training_step_equals_eager():
    """One inductor compile (slow on small CPUs): MEO with default options, forward and backward."""
    import torch._inductor.config as inductor_config

    cfg = MoEConfig(mode="meo", experts=4, top_k=2)
    m = _randomize_(MoEFFN(8, 16, cfg)).train()
    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True

    def loss_fn(inp):
        y = m(inp, pad)
        return y.square().sum() + sum(r.aux_loss for r in m.routers())

    def step(fn):
        for p in m.parameters():
            p.grad = None
        torch.manual_seed(4)
        xi = x.clone().requires_grad_(True)
        loss = fn(xi)
        loss.backward()
        return [loss, xi.grad] + [p.grad for p in m.parameters() if p.grad is not None]

    old = inductor_config.fallback_random
    inductor_config.fallback_random = True  # the same gate noise as eager
    try:
        torch._dynamo.reset()
        compiled = step(torch.compile(loss_fn, fullgraph=True))
    finally:
        inductor_config.fallback_random = old
        torch._dynamo.reset()
    eager = step(loss_fn)
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- impl selection ----------------------------------------------------------------------------


def test_impl_is_chosen_at_build_and_can_be_switched():
    with pytest.raises(ValueError, match="--moe-impl"):
        MoEConfig(impl="fast")
    m = MoEFFN(8, 16, MoEConfig(mode="meo", experts=4, top_k=2, impl="reference"))
    assert m.impl == m.fc1.impl == "reference" and all(r.reference for r in m.routers())
    set_impl(m, "blocked")
    assert m.fc2.impl == "blocked" and not any(r.reference for r in m.routers())
    auto = MoEFFN(8, 16, MoEConfig(mode="meo", experts=4, top_k=2))
    assert auto.fc1.impl == ("reference" if torch.cuda.is_available() else "blocked")


def test_fairseq_flags_reach_the_layer_config():
    import argparse

    from meo_fairseq.models.moe_args import layer_configs

    args = argparse.Namespace(moe_impl="reference", moe_compile=True)
    cfg = layer_configs(args, "encoder", 1)[0]
    assert cfg.impl == "reference" and cfg.compile
    cfg = layer_configs(argparse.Namespace(), "encoder", 1)[0]
    assert cfg.impl == "auto" and not cfg.compile
    # gate noise: off unless --moe-gate-noise (no_moe_gate_noise False, as old checkpoints store it)
    assert not cfg.gate_noise and cfg.gate_noise_scale == 1.0
    for stored, noisy in ((None, False), (True, False), (False, True)):
        ns = argparse.Namespace(no_moe_gate_noise=stored, moe_gate_noise_scale=0.25)
        cfg = layer_configs(ns, "encoder", 1)[0]
        assert cfg.gate_noise == noisy and cfg.gate_noise_scale == 0.25


# ---- fairseq's NaN detector --------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["linear", "ffn"])
def test_nan_detector_names_the_module(caplog, unit):
    """fairseq's NanDetector hooks every module (forward and backward): every module forward in the
    library returns tensors, so it reports the NaN instead of failing in torch's hook."""
    from fairseq.nan_detector import NanDetector

    m = _randomize_(MoEFFN(8, 16, MoEConfig(mode="meo", experts=4, top_k=2, expert_unit=unit))).train()
    with torch.no_grad():
        m.fc1.experts.weight[:, 0, 0] = float("nan")
    x = torch.randn(2, 5, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="fairseq.nan_detector"), NanDetector(m):
        y = m(x)
        (y.sum() + sum(r.aux_loss for r in m.routers())).backward()
    assert "NaN detected in output of" in caplog.text


# ---- the authors' orders: token-block order, compressed-expert weighting -----------------------


def _trained_block_(m):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for tb in [mod for mod in m.modules() if mod.__class__.__name__ == "TokenBlock"]:
            for p in tb.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return m


def _merge_ref(x, gates, experts):
    """Plain MEO linear: x (B, T, in), gates (B, N) -> (B, T, out), in fp64."""
    w = torch.einsum("bn,noi->boi", gates.double(), experts.weight.double())
    return torch.einsum("boi,bti->bto", w, x.double()) + (gates.double() @ experts.bias.double())[:, None]


@pytest.mark.parametrize("order", ["route_first", "block_first"])
@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_token_block_orders_against_plain_references(order, impl):
    """route_first (the authors' GPT-2 layer): route on x, block before the matmul; block_first (their
    encoder layer): block first, route on the mean of x + block(x)."""
    cfg = MoEConfig(mode="meo", level="token", experts=4, top_k=2, token_block_order=order, impl=impl)
    m = _trained_block_(_randomize_(MoEFFN(D, FF, cfg, activation_fn=F.gelu))).eval()
    x = torch.randn(3, 6, D)
    lin = m.fc1
    xt = lin.token_block(x)
    g = lin.router.routing(x if order == "route_first" else xt).gates[:, 0]
    ref = _merge_ref(xt, g, lin.experts)
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-5, atol=1e-5)
    other = "block_first" if order == "route_first" else "route_first"
    twin = MoEFFN(D, FF, cfg.with_(token_block_order=other), activation_fn=F.gelu).eval()
    twin.load_state_dict(m.state_dict())
    assert (twin.fc1(x) - lin(x)).abs().max() > 1e-3  # a trained block tells the orders apart
    with torch.no_grad():
        for mod in (m, twin):
            for lay in (mod.fc1, mod.fc2):
                lay.token_block.reset_identity_()
    torch.testing.assert_close(twin(x), m(x), rtol=0, atol=0)  # at init (identity block) they agree


def test_block_first_ffn_unit_against_plain_reference():
    cfg = MoEConfig(
        mode="meo", level="token", experts=4, top_k=2, expert_unit="ffn", token_block_order="block_first"
    )
    m = _trained_block_(_randomize_(MoEFFN(D, FF, cfg, activation_fn=F.gelu))).eval()
    x = torch.randn(2, 5, D)
    xt = m.token_block(x)
    g = m.router.routing(xt).gates[:, 0]
    h = F.gelu(_merge_ref(xt, g, m.fc1.experts))
    torch.testing.assert_close(m(x).double(), _merge_ref(h, g, m.fc2.experts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit", ["linear", "ffn"])
def test_block_first_incremental_decoding_equals_teacher_forcing(unit):
    cfg = MoEConfig(
        mode="meo",
        level="token",
        experts=4,
        top_k=2,
        routing="segment",
        segment_length=3,
        expert_unit=unit,
        token_block_order="block_first",
    )
    m = _trained_block_(_randomize_(MoEFFN(D, FF, cfg))).eval()
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        full = m(x)
        state, steps = {}, []
        for t in range(8):
            steps.append(m(x[:, t : t + 1], state=state))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["authors", "renormalised"])
@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_compressed_expert_weightings_against_plain_references(weighting, impl):
    """Main experts: softmax over all N logits at their indices (authors, Compressed Experts' code),
    or a softmax over their own logits (renormalised); compressed experts: always renormalised,
    their scaling vectors merged and applied to the main experts' input."""
    n, k, nce = 6, 3, 1
    cfg = MoEConfig(
        mode="meo", experts=n, top_k=k, compressed_experts=nce, compressed_weighting=weighting, impl=impl
    )
    m = _randomize_(MoEFFN(D, FF, cfg)).eval()
    with torch.no_grad():
        m.fc1.experts.scales.copy_(torch.rand(n, D) + 0.5)
    x = torch.randn(3, 5, D)
    lin = m.fc1
    logits = x.mean(1) @ lin.router.w_gate  # (B, N), eval: no noise
    top_v, top_i = logits.topk(k, -1)
    main_i = top_i[:, : k - nce]
    if weighting == "authors":
        main_g = torch.softmax(logits, -1).gather(1, main_i)
    else:
        main_g = torch.softmax(top_v[:, : k - nce], -1)
    gates = torch.zeros(3, n).scatter(1, main_i, main_g)
    comp = torch.zeros(3, n).scatter(1, top_i[:, k - nce :], torch.softmax(top_v[:, k - nce :], -1))
    xs = x * (comp @ lin.experts.scales)[:, None]
    torch.testing.assert_close(lin(x).double(), _merge_ref(xs, gates, lin.experts), rtol=1e-5, atol=1e-5)
    if weighting == "authors":
        assert (gates.sum(1) < 1 - 1e-3).all()  # the compressed experts' mass is dropped


def test_order_and_weighting_flags_follow_the_kind_of_model():
    import argparse

    from meo_fairseq.models.moe_args import layer_configs

    ns = argparse.Namespace
    assert layer_configs(ns(), "decoder", 1, is_lm=True)[0].token_block_order == "route_first"
    assert layer_configs(ns(), "encoder", 1)[0].token_block_order == "block_first"
    assert layer_configs(ns(), "decoder", 1)[0].token_block_order == "block_first"
    flag = ns(moe_token_block_order="route-first")
    assert layer_configs(flag, "encoder", 1)[0].token_block_order == "route_first"
    assert layer_configs(ns(), "encoder", 1)[0].compressed_weighting == "authors"
    assert (
        layer_configs(ns(moe_upcycle_from="dense.pt"), "encoder", 1)[0].compressed_weighting == "renormalised"
    )
    flag = ns(moe_compressed_weighting="renormalised")
    assert layer_configs(flag, "encoder", 1)[0].compressed_weighting == "renormalised"
    with pytest.raises(ValueError, match="--moe-token-block-order"):
        MoEConfig(token_block_order="sideways")
    with pytest.raises(ValueError, match="--moe-compressed-weighting"):
        MoEConfig(compressed_weighting="raw")


def test_moe_compile_runs_the_fairseq_ffn_through_torch_compile(monkeypatch):
    """--moe-compile: a fairseq expert FFN's training forward goes through the shared compiled
    function (dynamo with the eager backend here: no inductor build in CI) and computes the same
    output; incremental decoding stays eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from meo_fairseq.models import moe_layers

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(
        moe_layers, "_compiled_ffn_forward", torch.compile(moe_layers._ffn_forward, backend="eager")
    )
    cfg = MoEConfig(mode="meo", experts=4, top_k=2, routing="segment", segment_length=3)
    eager = _randomize_(moe_layers.FairseqMoEFFN(D, FF, cfg)).eval()
    compiled = moe_layers.FairseqMoEFFN(D, FF, cfg.with_(compile=True)).eval()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(7, 2, D)  # (T, B, C), fairseq's layout
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for m in (eager, compiled):
        m.set_routing_inputs(pad)
    y_eager, y_compiled = eager(x), compiled(x)
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
