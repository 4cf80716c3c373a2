"""Token-level compute-then-mix dispatch against a naive per-token Python reference."""

import pytest
import torch
import torch.nn.functional as F

from meo_fairseq.modules import dispatch, mix_linear

D = torch.float64

# (tokens, in, out, experts, top_k)
SHAPES = [(1, 3, 2, 1, 1), (7, 8, 6, 4, 2), (16, 6, 10, 8, 3), (9, 16, 8, 4, 4), (5, 4, 4, 16, 2)]


def route(m, n, k):
    """Random distinct top-k experts per token and their softmax gates."""
    v, idx = torch.randn(m, n, dtype=D).topk(k, dim=-1)
    return idx, torch.softmax(v, -1)


def naive_mix(x, idx, w, weight, bias):
    rows = []
    for t in range(x.size(0)):
        y = 0
        for j in range(idx.size(1)):
            e = int(idx[t, j])
            y = y + w[t, j] * (weight[e] @ x[t] + (bias[e] if bias is not None else 0))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("m,i,o,n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_mix_linear_equals_naive_per_token_reference(m, i, o, n, k, bias):
    torch.manual_seed(m * 31 + n)
    x = torch.randn(m, i, dtype=D, requires_grad=True)
    idx, w = route(m, n, k)
    w.requires_grad_(True)
    weight = torch.randn(n, o, i, dtype=D, requires_grad=True)
    b = torch.randn(n, o, dtype=D, requires_grad=True) if bias else None
    leaves = [x, w, weight] + ([b] if bias else [])
    probe = torch.randn(m, o, dtype=D)
    y = mix_linear(x, idx, w, weight, b)
    yr = naive_mix(x, idx, w, weight, b)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for a, e in zip(
        torch.autograd.grad((y * probe).sum(), leaves), torch.autograd.grad((yr * probe).sum(), leaves)
    ):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_mix_linear_all_tokens_on_one_expert_and_unused_experts():
    torch.manual_seed(0)
    m, i, o, n = 6, 4, 3, 5
    x = torch.randn(m, i, dtype=D)
    idx = torch.full((m, 1), 3)
    w = torch.ones(m, 1, dtype=D)
    weight, b = torch.randn(n, o, i, dtype=D), torch.randn(n, o, dtype=D)
    torch.testing.assert_close(
        mix_linear(x, idx, w, weight, b), F.linear(x, weight[3], b[3]), rtol=1e-12, atol=1e-12
    )
    # the last expert is used by no token, the first by all
    idx = torch.stack([torch.zeros(m, dtype=torch.long), torch.arange(m) % 3 + 1], 1)
    w = torch.rand(m, 2, dtype=D)
    torch.testing.assert_close(
        mix_linear(x, idx, w, weight, b), naive_mix(x, idx, w, weight, b), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("m,i,o,n,k", SHAPES)
def test_dispatch_nonlinear_experts_with_side_input(m, i, o, n, k):
    torch.manual_seed(m + 7 * k)
    x = torch.randn(m, i, dtype=D, requires_grad=True)
    side = torch.randn(m, o, dtype=D)
    idx, w = route(m, n, k)
    w.requires_grad_(True)
    weight = torch.randn(n, o, i, dtype=D, requires_grad=True)
    calls = []

    def fn(e, xe, se):
        calls.append((e, xe.size(0)))
        return torch.tanh(xe @ weight[e].t()) * se + e

    y = dispatch(x, idx, w, fn, o, side)
    rows = []
    for t in range(m):
        rows.append(
            sum(
                w[t, j] * (torch.tanh(weight[int(idx[t, j])] @ x[t]) * side[t] + int(idx[t, j]))
                for j in range(k)
            )
        )
    yr = torch.stack(rows)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    leaves = [x, w, weight]
    for a, e in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(yr.sum(), leaves)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # one call per used expert (a loop over experts, not tokens), each with all of its tokens
    counts = torch.bincount(idx.flatten(), minlength=n)
    assert calls == [(e, int(c)) for e, c in enumerate(counts) if c > 0]


def test_dispatch_empty_batch():
    x = torch.zeros(0, 4)
    y = dispatch(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), lambda e, xe, se: xe[:, :3], 3)
    assert y.shape == (0, 3)


def test_mix_linear_function_gradcheck_float64():
    """The custom backward of MixLinearFunction (x, gates, weight, bias), with an unused expert."""
    from meo_fairseq.modules.dispatch import MixLinearFunction

    g = torch.Generator().manual_seed(5)
    m, k, n, din = 7, 2, 4, 3
    x = torch.randn(m, din, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(n - 1, generator=g)[:k] for _ in range(m)])  # expert n-1 unused
    w = torch.rand(m, k, dtype=torch.float64, generator=g, requires_grad=True)
    for dout in (5, 2):  # out > in and out < in take different backward formulations
        weight = torch.randn(n, dout, din, dtype=torch.float64, generator=g, requires_grad=True)
        bias = torch.randn(n, dout, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: MixLinearFunction.apply(*a, idx), (x, w, weight, bias))
        assert torch.autograd.gradcheck(lambda *a: MixLinearFunction.apply(*a, None, idx), (x, w, weight))
        # without a gate gradient nothing is kept from forward, and the other gradients still hold
        wc = w.detach()
        assert torch.autograd.gradcheck(
            lambda x_, wt, b_, wc=wc: MixLinearFunction.apply(x_, wc, wt, b_, idx), (x, weight, bias)
        )
