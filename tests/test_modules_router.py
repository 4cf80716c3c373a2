"""Noisy top-k router: gates of every routing granularity against references, aux losses."""

import math

import pytest
import torch

from meo_fairseq.modules import MoEConfig, Router, masked_mean

# (batch, seq, hidden, experts, top_k)
SHAPES = [(1, 1, 4, 1, 1), (2, 5, 8, 4, 2), (3, 7, 6, 8, 3), (2, 9, 16, 4, 4)]


def make_router(d, n, k, scale=1.0, seed=0, **kw):
    cfg = MoEConfig(experts=n, top_k=k, **kw)
    torch.manual_seed(seed)
    r = Router(d, cfg)
    with torch.no_grad():
        r.w_gate.normal_().mul_(scale)
        r.w_noise.normal_().mul_(0.1)
        r.default_logits.normal_()
    return r


def ref_gates(logits, k):
    """Dense top-k softmax gates [G, N] of logits [G, N]."""
    v, i = logits.float().topk(k, dim=-1)
    return torch.zeros_like(logits, dtype=torch.float32).scatter(1, i, torch.softmax(v, -1))


def check_consistent(r, k):
    """gates, idx, w describe the same top-k gating; gates sum to one."""
    n = r.gates.size(-1)
    g = r.gates.reshape(-1, n)
    idx, w = r.idx.reshape(-1, r.idx.size(-1)), r.w.reshape(-1, r.w.size(-1))
    assert idx.size(1) == k
    torch.testing.assert_close(g.sum(-1), torch.ones(g.size(0)), rtol=1e-6, atol=1e-6)
    assert ((g > 0).sum(-1) <= k).all()
    torch.testing.assert_close(g.gather(1, idx), w)
    assert (w[:, :-1] >= w[:, 1:]).all()  # sorted descending
    assert (idx.sort(-1).values[:, 1:] != idx.sort(-1).values[:, :-1]).all()  # distinct


@pytest.mark.parametrize("b,t,d,n,k", SHAPES)
def test_token_routing_is_top_k_softmax_of_x_w_gate(b, t, d, n, k):
    r = make_router(d, n, k, mode="moe", level="token", routing="token").eval()
    x = torch.randn(b, t, d)
    out = r(x)
    assert out.bounds is None and out.gates.shape == (b, t, n) and out.ce is None
    torch.testing.assert_close(out.gates.reshape(-1, n), ref_gates(x.reshape(-1, d) @ r.w_gate, k))
    check_consistent(out, k)


@pytest.mark.parametrize("b,t,d,n,k", SHAPES)
def test_sequence_routing_uses_masked_mean(b, t, d, n, k):
    r = make_router(d, n, k).eval()
    x = torch.randn(b, t, d)
    lengths = torch.randint(1, t + 1, (b,))
    pad = torch.arange(t)[None, :] >= lengths[:, None]
    out = r(x, pad)
    assert out.bounds == [0, t] and out.gates.shape == (b, 1, n)
    means = torch.stack([x[i, : lengths[i]].mean(0) for i in range(b)])
    torch.testing.assert_close(out.gates[:, 0], ref_gates(means @ r.w_gate, k))
    check_consistent(out, k)


def test_masked_mean_hand_values():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    pad = torch.tensor([[False, False, True], [True, True, True]])
    torch.testing.assert_close(masked_mean(x, pad), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(masked_mean(x, None), x.mean(1))
    assert masked_mean(x.half(), None).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_masked_mean_gradient_matches_autograd_reference(dtype, padded):
    b, t, d = 3, 5, 4
    x = torch.randn(b, t, d).to(dtype)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True], [True] * 5]) if padded else None
    g = torch.randn(b, d)
    x1 = x.clone().requires_grad_(True)
    y1 = masked_mean(x1, pad)
    (y1 * g).sum().backward()
    x2 = x.float().requires_grad_(True)
    keep = torch.ones(b, t) if pad is None else (~pad).float()
    y2 = (x2 * keep.unsqueeze(2)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)
    (y2 * g).sum().backward()
    assert y1.dtype == torch.float32 and x1.grad.dtype == dtype and x1.grad.shape == x.shape
    torch.testing.assert_close(y1, y2)
    tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(x1.grad.float(), x2.grad, **tol)
    if padded:  # pad positions get no gradient
        assert (x1.grad[pad] == 0).all()
    # the same values without autograd
    torch.testing.assert_close(masked_mean(x, pad), y1.detach())


@pytest.mark.parametrize("t,seg", [(7, 3), (6, 3), (3, 3), (2, 3), (9, 1)])
def test_segment_routing_routes_on_previous_segment(t, seg):
    b, d, n, k = 2, 6, 4, 2
    r = make_router(d, n, k, routing="segment", segment_length=seg).eval()
    x = torch.randn(b, t, d)
    out = r(x)
    s = math.ceil(t / seg)
    assert out.bounds == [min(i * seg, t) for i in range(s + 1)]
    default = ref_gates(r.default_logits.detach()[None], k)[0]
    torch.testing.assert_close(out.gates[:, 0], default.expand(b, n))
    for j in range(1, s):
        prev = x[:, (j - 1) * seg : j * seg].mean(1)
        torch.testing.assert_close(out.gates[:, j], ref_gates(prev @ r.w_gate, k))
    check_consistent(out, k)


@pytest.mark.parametrize("t", [2, 4, 9])
def test_prefix_routing(t):
    b, d, n, k, p = 3, 6, 8, 3, 4
    r = make_router(d, n, k, routing="prefix", prefix_length=p).eval()
    x = torch.randn(b, t, d)
    out = r(x)
    default = ref_gates(r.default_logits.detach()[None], k)[0].expand(b, n)
    if t <= p:
        assert out.bounds == [0, t]
        torch.testing.assert_close(out.gates[:, 0], default)
    else:
        assert out.bounds == [0, p, t]
        torch.testing.assert_close(out.gates[:, 0], default)
        torch.testing.assert_close(out.gates[:, 1], ref_gates(x[:, :p].mean(1) @ r.w_gate, k))
    check_consistent(out, k)


def test_encoder_routing_uses_context_and_requires_it():
    d, dc, n, k = 6, 5, 4, 2
    r = make_router(dc, n, k, routing="encoder").eval()
    x, ctx = torch.randn(2, 3, d), torch.randn(2, dc)
    out = r(x, context=ctx)
    assert out.bounds == [0, 3]
    torch.testing.assert_close(out.gates[:, 0], ref_gates(ctx @ r.w_gate, k))
    with pytest.raises(ValueError, match="context"):
        r(x)


def test_sequence_routing_cannot_decode_incrementally():
    r = make_router(4, 4, 2).eval()
    with pytest.raises(ValueError):
        r(torch.randn(1, 1, 4), state={})


@pytest.mark.parametrize("n,k,nce", [(4, 2, 1), (8, 4, 2), (8, 3, 2)])
def test_compressed_expert_gates(n, k, nce):
    d = 6
    r = make_router(d, n, k, compressed_experts=nce).eval()
    x = torch.randn(5, 3, d)
    out = r(x)
    kf = k - nce
    logits = x.mean(1) @ r.w_gate
    v, i = logits.topk(k, -1)
    full = torch.zeros(5, n).scatter(1, i[:, :kf], torch.softmax(v[:, :kf], -1))
    ce = torch.zeros(5, n).scatter(1, i[:, kf:], torch.softmax(v[:, kf:], -1))
    torch.testing.assert_close(out.gates[:, 0], full)
    torch.testing.assert_close(out.ce[:, 0], ce)
    assert ((out.gates > 0) & (out.ce > 0)).sum() == 0
    check_consistent(out, kf)


# ---- auxiliary losses for a hand-set w_gate ---------------------------------------------------


def hand_router(**kw):
    """4 experts, top-2, token routing; token e0 has logits [2, 1, 0, -1], token e1 [-1, 0, 1, 2]."""
    cfg = MoEConfig(mode="moe", level="token", routing="token", experts=4, top_k=2, **kw)
    r = Router(4, cfg).eval()
    with torch.no_grad():
        r.w_gate[0] = torch.tensor([2.0, 1.0, 0.0, -1.0])
        r.w_gate[1] = torch.tensor([-1.0, 0.0, 1.0, 2.0])
        r.w_gate[2:] = 0.5
    x = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    return r, x


def test_router_cv_aux_hand_value():
    r, x = hand_router(balance_loss="cv", balance_weight=0.01)
    out = r(x)
    p = 1 / (1 + math.exp(-1))  # softmax([2, 1])[0]
    torch.testing.assert_close(out.gates[0], torch.tensor([[p, 1 - p, 0, 0], [0, 0, 1 - p, p]]))
    # importance [p, 1-p, 1-p, p]: mean 1/2, unbiased var 4 (p - 1/2)^2 / 3; load [1, 1, 1, 1]
    cv_imp = 4 * (p - 0.5) ** 2 / 3 / 0.25
    assert r.aux_loss.item() == pytest.approx(0.01 * cv_imp, rel=1e-5)
    assert r.stats["balance"].item() == pytest.approx(cv_imp, rel=1e-5)
    torch.testing.assert_close(r.stats["fraction"], torch.tensor([p, 1 - p, 1 - p, p]) / 2)


def test_router_switch_and_z_aux_hand_value():
    r, x = hand_router(balance_loss="switch", balance_weight=0.01, z_loss_weight=1e-3)
    r(x)
    e = [math.exp(v) for v in (2, 1, 0, -1)]
    s = [v / sum(e) for v in e]
    p_mean = [(a + b) / 2 for a, b in zip(s, reversed(s))]
    switch = 4 * (0.5 * p_mean[0] + 0.5 * p_mean[3])  # top choices: expert 0 and expert 3
    z = math.log(sum(e)) ** 2
    assert r.stats["balance"].item() == pytest.approx(switch, rel=1e-5)
    assert r.stats["z_loss"].item() == pytest.approx(z, rel=1e-5)
    assert r.aux_loss.item() == pytest.approx(0.01 * switch + 1e-3 * z, rel=1e-5)


def test_router_collapsed_routing_aux_values():
    """Every token picks experts 0 and 1: load [G, G, 0, 0], CV^2 of it is 4/3 * ... hand value."""
    r, _ = hand_router(balance_loss="cv", balance_weight=1.0)
    x = torch.tensor([[[1.0, 0, 0, 0]] * 3])
    r(x)
    p = 1 / (1 + math.exp(-1))
    imp = [3 * p, 3 * (1 - p), 0, 0]
    load = [3, 3, 0, 0]

    def cv2(v):
        m = sum(v) / len(v)
        return sum((a - m) ** 2 for a in v) / (len(v) - 1) / m**2

    assert r.aux_loss.item() == pytest.approx(cv2(imp) + cv2(load), rel=1e-5)
    # uniform routing over a balanced pair of tokens with top-k == N: zero
    cfg = MoEConfig(mode="moe", level="token", routing="token", experts=4, top_k=4, balance_weight=1.0)
    r0 = Router(4, cfg).eval()
    r0(torch.randn(1, 5, 4))
    assert r0.aux_loss.item() == pytest.approx(0.0, abs=1e-9)


def test_sequence_aux_ignores_all_pad_sequences():
    r = make_router(6, 4, 2, balance_loss="cv").eval()
    x = torch.randn(3, 5, 6)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1] = True
    r(x, pad)
    with_pad = r.aux_loss.item()
    r(x[[0, 2]])
    assert with_pad == pytest.approx(r.aux_loss.item(), rel=1e-6)


def test_token_aux_ignores_pad_tokens():
    r = make_router(6, 4, 2, mode="moe", level="token", routing="token").eval()
    x = torch.randn(2, 4, 6)
    r(x)
    ref = r.aux_loss.item()
    xp = torch.cat([x, 50 * torch.randn(2, 3, 6)], 1)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, 4:] = True
    r(xp, pad)
    assert r.aux_loss.item() == pytest.approx(ref, rel=1e-6)


def test_noisy_training_gates_and_differentiable_load():
    r = make_router(6, 8, 2, seed=3, gate_noise=True).train()
    x = torch.randn(16, 5, 6)
    out = r(x)
    check_consistent(out, 2)
    gw, gn = torch.autograd.grad(r.aux_loss, [r.w_gate, r.w_noise])
    assert gw.abs().sum() > 0 and gn.abs().sum() > 0  # smooth load estimate reaches the noise net
    # the noise is really there: eval gates differ from some training draw
    r.eval()
    clean = r(x).gates
    r.train()
    assert any(not torch.equal(r(x).gates, clean) for _ in range(5))


# ---- half precision with huge logits ----------------------------------------------------------


@pytest.mark.parametrize("routing", ["token", "sequence", "segment", "prefix"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("balance,nce", [("cv", 0), ("switch", 0), ("cv", 1)])
def test_half_precision_huge_logits_stay_finite(routing, train, dtype, balance, nce):
    extra = dict(mode="moe", level="token") if routing == "token" else {}
    r = make_router(
        8,
        4,
        2,
        routing=routing,
        segment_length=2,
        prefix_length=2,
        balance_loss=balance,
        z_loss_weight=1e-3,
        compressed_experts=nce,
        **extra,
    )
    with torch.no_grad():
        r.w_gate.uniform_(-3, 3).mul_(1e4)
        r.w_noise.uniform_(-3, 3).mul_(1e4)
        r.default_logits.uniform_(-3, 3).mul_(1e4)
    r = r.to(dtype).train(train)
    x = torch.randn(3, 5, 8, dtype=dtype)
    out = r(x)
    for t in (out.gates, out.w, out.ce):
        if t is not None:
            assert torch.isfinite(t).all()
            assert t.dtype == torch.float32
    torch.testing.assert_close(out.gates.sum(-1), torch.ones_like(out.gates[..., 0]), rtol=1e-5, atol=1e-5)
    if out.ce is not None:
        torch.testing.assert_close(out.ce.sum(-1), torch.ones_like(out.ce[..., 0]), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(r.aux_loss)
    assert all(torch.isfinite(v).all() for v in r.stats.values())
    loss = r.aux_loss + out.gates.sum() + (out.ce.sum() if out.ce is not None else 0)
    for g in torch.autograd.grad(loss, list(r.parameters()), allow_unused=True):
        assert g is None or torch.isfinite(g).all()
