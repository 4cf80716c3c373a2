"""gating.py: the fused noisy top-k gating equals the step-by-step router code (Router.fused =
False), values and gradients, in every configuration it takes; and the routing summaries."""

import itertools

import pytest
import torch

from meo_fairseq.criterions.moe_aux import aux_and_stats
from meo_fairseq.modules import MoEConfig, MoEFFN, Router
from meo_fairseq.modules.router import summarize


def _route(fused, cfg, d, x, mask, noise_scale=0.5, seed=3, half=False):
    """One training route() of a seeded router with fixed upstream gradients; returns outputs,
    aux, stats and the gradients of (x, w_gate, w_noise)."""
    torch.manual_seed(seed)
    r = Router(d, cfg)
    with torch.no_grad():
        r.w_gate.normal_()
        r.w_noise.normal_(std=noise_scale)
    r.train()
    r.fused = fused  # (instance attribute: the class default stays)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed + 1)  # the same noise draw in both paths
    gates, idx, w, ce = r.route(x.half() if half else x, mask)
    assert ce is None
    torch.manual_seed(7)
    gg, gw = torch.randn_like(gates), torch.randn_like(w)
    ((gates * gg).sum() + (w * gw).sum() + 3.0 * r.aux_loss).backward()
    grads = [t if t is not None else torch.zeros(1) for t in (x.grad, r.w_gate.grad, r.w_noise.grad)]
    return [gates.detach(), idx, w.detach(), r.aux_loss.detach()], r.stats, grads


CASES = list(
    itertools.product(["cv", "none"], [0.0, 1e-2], [True, False], [1, 2, 3], [4, 8], ["all", "some"])
)


@pytest.mark.parametrize("balance,z,noise,k,n,mask", CASES)
def test_fused_gating_equals_reference(balance, z, noise, k, n, mask):
    cfg = MoEConfig(
        mode="meo",
        level="sequence",
        routing="sequence",
        experts=n,
        top_k=k,
        balance_loss=balance,
        z_loss_weight=z,
        gate_noise=noise,
        balance_weight=0.1,
    )
    g, d = 7, 5
    x = torch.randn(g, d, generator=torch.Generator().manual_seed(k * n))
    m = None if mask == "all" else torch.tensor([True, False, True, True, False, True, True])
    out_r, st_r, gr_r = _route(False, cfg, d, x, m)
    out_f, st_f, gr_f = _route(True, cfg, d, x, m)
    assert torch.equal(out_r[1], out_f[1])  # same experts selected
    for a, b in zip(out_r + gr_r, out_f + gr_f):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert st_r.keys() == st_f.keys() == {"balance", "z_loss", "fraction", "entropy"}
    for key in st_r:
        torch.testing.assert_close(st_f[key], st_r[key], rtol=1e-5, atol=1e-6)
    if noise and balance == "cv":
        assert gr_f[2].abs().sum() > 0  # the smooth load estimate reaches the noise weights


@pytest.mark.parametrize("balance,mask", [("cv", "all"), ("cv", "some"), ("none", "all")])
def test_gate_noise_scale_scales_the_std_on_every_path(balance, mask):
    """gate_noise_scale multiplies the noise std: the fused node equals the step-by-step router and
    reference.noisy_top_k (values and gradients), and the noisy logits move by scale x noise x std."""
    from meo_fairseq.modules import reference

    g, d, n, k = 7, 5, 6, 2
    x = torch.randn(g, d, generator=torch.Generator().manual_seed(1))
    m = None if mask == "all" else torch.tensor([True, False, True, True, False, True, True])
    runs = {}
    for scale in (1.0, 0.3):
        cfg = MoEConfig(
            mode="meo", level="sequence", routing="sequence", experts=n, top_k=k, balance_loss=balance,
            gate_noise=True, gate_noise_scale=scale, balance_weight=0.1,
        )  # fmt: skip
        out_r, _, gr_r = _route(False, cfg, d, x, m)
        out_f, _, gr_f = _route(True, cfg, d, x, m)
        assert torch.equal(out_r[1], out_f[1])
        for a, b in zip(out_r + gr_r, out_f + gr_f):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        runs[scale] = out_f
        # reference.noisy_top_k with the same weights and noise draw
        torch.manual_seed(3)
        r = Router(d, cfg)
        with torch.no_grad():
            r.w_gate.normal_()
            r.w_noise.normal_(std=0.5)
        torch.manual_seed(4)
        noise = torch.randn(g, n)
        keep = m.float() if m is not None else None
        ref, loss = reference.noisy_top_k(
            x, r.w_gate, r.w_noise, k, noise, keep, balance=balance, balance_weight=0.1, noise_scale=scale
        )
        torch.testing.assert_close(ref.gates, out_f[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.aux_loss, out_f[3], rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs[1.0][0], runs[0.3][0])  # the scale changes the draw's effect
    with pytest.raises(ValueError, match="--moe-gate-noise-scale"):
        MoEConfig(gate_noise_scale=0.0)


def test_fused_gating_softplus_linear_region_and_half_input():
    """Large noise logits (softplus beyond its threshold of 20) and fp16 router inputs."""
    cfg = MoEConfig(mode="meo", level="sequence", routing="sequence", experts=6, top_k=2, balance_weight=0.5)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0)) * 10
    for half in (False, True):
        out_r, _, gr_r = _route(False, cfg, 4, x, None, noise_scale=30.0, half=half)
        out_f, _, gr_f = _route(True, cfg, 4, x, None, noise_scale=30.0, half=half)
        for a, b in zip(out_r + gr_r, out_f + gr_f):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_unsupported_configs_take_the_reference_path():
    """Compressed experts and the switch loss are not fused: same results with fused on or off."""
    for kw in (dict(compressed_experts=1, top_k=3), dict(balance_loss="switch", top_k=2)):
        cfg = MoEConfig(mode="meo", level="sequence", routing="sequence", experts=6, **kw)
        x = torch.randn(5, 4)
        torch.manual_seed(0)
        r = Router(4, cfg).train()
        torch.manual_seed(1)
        a, aux_a = r.route(x), r.aux_loss
        r.fused = False
        torch.manual_seed(1)
        b, aux_b = r.route(x), r.aux_loss
        for u, v in zip(a, b):
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.equal(u, v)
        assert torch.equal(aux_a, aux_b)


def test_summaries_and_stats_by_hand():
    s = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.5, 0.25], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    got = summarize(s)
    torch.testing.assert_close(got["fraction"], torch.tensor([[0.75, 0.25, 0, 0], [0.25, 0.25, 0.25, 0.25]]))
    torch.testing.assert_close(got["balance"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(got["z_loss"], torch.tensor([0.25, 0.0]))
    h = -(0.75 * torch.log(torch.tensor(0.75)) + 0.25 * torch.log(torch.tensor(0.25)))
    torch.testing.assert_close(got["entropy"], torch.stack([h, torch.log(torch.tensor(4.0))]))
    r = Router(4, MoEConfig(experts=4, top_k=2))
    assert r.stats == {}
    r.summary = s[0]
    assert r.stats["fraction"].shape == (4,) and float(r.stats["balance"]) == 0.5


def test_criterion_stats_are_the_averages_of_the_routers():
    torch.manual_seed(0)
    cfg = MoEConfig(mode="meo", level="sequence", routing="sequence", experts=4, top_k=2, z_loss_weight=1e-3)
    model = torch.nn.ModuleList([MoEFFN(8, 16, cfg), MoEFFN(8, 16, cfg)]).train()
    x = torch.randn(3, 5, 8)
    for m in model:
        for r in m.routers():
            with torch.no_grad():
                r.w_gate.normal_()
        x = m(x)
    routers = [r for m in model for r in m.routers()]
    total, stats = aux_and_stats(model)
    torch.testing.assert_close(total, sum(r.aux_loss for r in routers))
    n = len(routers)
    assert stats["moe_batches"] == 1 and float(stats["moe_aux"]) == pytest.approx(float(total.detach()))
    # tensors, as fairseq's own losses: read on the host when fairseq logs, not between forward
    # and backward
    assert all(
        torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad
        for k, v in stats.items()
        if k != "moe_batches"
    )
    assert float(stats["moe_balance"]) == pytest.approx(
        sum(float(r.stats["balance"]) for r in routers) / n, rel=1e-6
    )
    assert float(stats["moe_z_loss"]) == pytest.approx(
        sum(float(r.stats["z_loss"]) for r in routers) / n, rel=1e-6
    )
    assert float(stats["moe_max_frac"]) == pytest.approx(
        sum(float(r.stats["fraction"].max()) for r in routers) / n, rel=1e-6
    )
    assert float(stats["moe_entropy"]) == pytest.approx(
        sum(float(r.stats["entropy"]) for r in routers) / n, rel=1e-6
    )


def test_criterion_stats_with_routers_of_different_sizes():
    """Routers with different numbers of experts (a model built from the library by hand)."""
    torch.manual_seed(1)
    cfgs = [MoEConfig(mode="meo", level="sequence", routing="sequence", experts=n, top_k=2) for n in (4, 6)]
    model = torch.nn.ModuleList([MoEFFN(8, 16, c) for c in cfgs]).train()
    x = torch.randn(3, 5, 8)
    for m in model:
        x = m(x)
    routers = [r for m in model for r in m.routers()]
    _, stats = aux_and_stats(model)
    n = len(routers)
    assert float(stats["moe_max_frac"]) == pytest.approx(
        sum(float(r.stats["fraction"].max()) for r in routers) / n, rel=1e-6
    )
    assert float(stats["moe_entropy"]) == pytest.approx(
        sum(float(r.stats["entropy"]) for r in routers) / n, rel=1e-6
    )
    assert float(stats["moe_balance"]) == pytest.approx(
        sum(float(r.stats["balance"]) for r in routers) / n, rel=1e-6
    )
