"""The MEO merge: W = sum_i g_i W_i, b = sum_i g_i b_i, y = x W^T + b, and its custom autograd."""

import pytest
import torch

from meo_fairseq.modules import apply_merged, merge_weights, merged_linear
from meo_fairseq.modules import merge as merge_mod
from meo_fairseq.modules.merge import MergedLinearFunction

D = torch.float64

# (groups, tokens per group, in, out, experts, top_k), MegaBlocks-style small grid
SHAPES = [(1, 1, 3, 2, 1, 1), (2, 5, 8, 6, 4, 2), (3, 4, 6, 10, 8, 3), (4, 7, 16, 8, 4, 4)]


def topk_gates(g, n, k, dtype=D):
    """Random top-k gates [G, N]: softmax over k random logits, zeros elsewhere."""
    logits = torch.randn(g, n, dtype=dtype)
    v, i = logits.topk(k, dim=-1)
    return torch.zeros(g, n, dtype=dtype).scatter(1, i, torch.softmax(v, -1))


def reference(x, gates, weight, bias):
    """Vanilla MoE with the same gates: sum_i g_i (x W_i^T + b_i), experts run one by one."""
    y = 0
    for i in range(weight.size(0)):
        yi = x @ weight[i].t()
        if bias is not None:
            yi = yi + bias[i]
        y = y + gates[:, i, None, None] * yi
    return y


def make(g, t, i, o, n, k, bias=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(g, t, i, dtype=D)
    gates = topk_gates(g, n, k)
    w = torch.randn(n, o, i, dtype=D)
    b = torch.randn(n, o, dtype=D) if bias else None
    return x, gates, w, b


@pytest.mark.parametrize("g,t,i,o,n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_merge_weights_is_the_gate_weighted_sum(g, t, i, o, n, k, bias):
    _, gates, w, b = make(g, t, i, o, n, k, bias)
    wm, bm = merge_weights(gates, w, b)
    assert wm.shape == (g, o, i)
    torch.testing.assert_close(wm, torch.einsum("gn,noi->goi", gates, w), rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(bm, gates @ b, rtol=1e-12, atol=1e-12)
    else:
        assert bm is None
    # only the selected experts contribute: changing an unselected expert changes nothing
    unused = (gates == 0).all(0).nonzero().flatten()
    if len(unused):
        w2 = w.clone()
        w2[unused] += 100.0
        torch.testing.assert_close(merge_weights(gates, w2, b)[0], wm, rtol=0, atol=1e-12)


@pytest.mark.parametrize("g,t,i,o,n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_merged_linear_equals_vanilla_moe_forward_and_backward(g, t, i, o, n, k, bias):
    x, gates, w, b = make(g, t, i, o, n, k, bias)
    leaves = [x, gates, w] + ([b] if bias else [])
    for v in leaves:
        v.requires_grad_(True)
    probe = torch.randn(g, t, o, dtype=D)
    y = merged_linear(x, gates, w, b)
    yr = reference(x, gates, w, b)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad((y * probe).sum(), leaves)
    want = torch.autograd.grad((yr * probe).sum(), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 3 * 8 * 2, 2**25])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_merged_linear_function(monkeypatch, chunk_bytes, bias):
    monkeypatch.setattr(merge_mod, "MERGE_CHUNK_BYTES", chunk_bytes)
    g, t, i, o, n = 5, 3, 3, 2, 3
    # the chunking really happens: 1 byte -> one group per chunk; 96 bytes -> two groups
    n_chunks = len(list(merge_mod._chunks(g, torch.empty(n, o, i, dtype=D))))
    assert n_chunks == {1: 5, 96: 3, 2**25: 1}[chunk_bytes]
    torch.manual_seed(1)
    x = torch.randn(g, t, i, dtype=D, requires_grad=True)
    gates = torch.rand(g, n, dtype=D, requires_grad=True)  # any gates, not only top-k
    w = torch.randn(n, o, i, dtype=D, requires_grad=True)
    b = torch.randn(n, o, dtype=D, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(MergedLinearFunction.apply, (x, gates, w, b))


@pytest.mark.parametrize("chunk_bytes", [1, 2**25])
def test_chunked_forward_backward_matches_unchunked(monkeypatch, chunk_bytes):
    x, gates, w, b = make(6, 4, 5, 7, 4, 2)
    probe = torch.randn(6, 4, 7, dtype=D)
    results = []
    for cb in (chunk_bytes, 2**40):
        monkeypatch.setattr(merge_mod, "MERGE_CHUNK_BYTES", cb)
        leaves = [v.detach().clone().requires_grad_(True) for v in (x, gates, w, b)]
        y = merged_linear(*leaves)
        results.append([y] + list(torch.autograd.grad((y * probe).sum(), leaves)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["x", "gates", "weight", "bias"])
def test_partial_requires_grad(which):
    """Each backward branch alone gives the reference gradient of its input."""
    x, gates, w, b = make(3, 4, 5, 6, 4, 2)
    names = ["x", "gates", "weight", "bias"]
    vals = [x, gates, w, b]
    pos = names.index(which)
    vals[pos] = vals[pos].clone().requires_grad_(True)
    probe = torch.randn(3, 4, 6, dtype=D)
    (got,) = torch.autograd.grad((merged_linear(*vals) * probe).sum(), [vals[pos]])
    (want,) = torch.autograd.grad((reference(*vals) * probe).sum(), [vals[pos]])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_non_contiguous_input_gradient():
    torch.manual_seed(2)
    base = torch.randn(4, 3, 5, dtype=D)  # [T, G, in] (fairseq time-major) -> [G, T, in] view
    x = base.transpose(0, 1).requires_grad_(True)
    gates = topk_gates(3, 4, 2)
    w, b = torch.randn(4, 6, 5, dtype=D), torch.randn(4, 6, dtype=D)
    probe = torch.randn(3, 4, 6, dtype=D)
    (gx,) = torch.autograd.grad((merged_linear(x, gates, w, b) * probe).sum(), [x])
    xr = x.detach().contiguous().requires_grad_(True)
    (gr,) = torch.autograd.grad((reference(xr, gates, w, b) * probe).sum(), [xr])
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-10)


def test_merged_weights_are_not_saved_for_backward():
    """Memory: only x, gates, weight, bias are kept; no [G, out, in] merged weight."""
    g, t, i, o, n = 6, 2, 5, 7, 4
    x = torch.randn(g, t, i, requires_grad=True)
    gates = torch.rand(g, n, requires_grad=True)
    w = torch.randn(n, o, i, requires_grad=True)
    b = torch.randn(n, o, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        merged_linear(x, gates, w, b)
    assert (g, o, i) not in saved
    assert sum(torch.Size(s).numel() for s in saved) == x.numel() + gates.numel() + w.numel() + b.numel()


def test_dtypes_gates_fp32_weights_fp64():
    x, gates, w, b = make(2, 3, 4, 5, 4, 2)
    x32 = x.float().requires_grad_(True)  # input cast to the weight dtype
    g32 = gates.float().requires_grad_(True)
    y = merged_linear(x32, g32, w, b)
    assert y.dtype == D
    gx, gg = torch.autograd.grad(y.sum(), [x32, g32])
    assert gx.dtype == torch.float32 and gg.dtype == torch.float32
    torch.testing.assert_close(y, reference(x, g32.detach().double(), w, b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_apply_merged_equals_merged_linear(bias):
    x, gates, w, b = make(3, 4, 5, 6, 4, 3, bias)
    wm, bm = merge_weights(gates, w, b)
    torch.testing.assert_close(apply_merged(x, wm, bm), merged_linear(x, gates, w, b), rtol=1e-12, atol=1e-12)


def test_bf16_merged_linear_close_to_fp64():
    x, gates, w, b = make(2, 8, 16, 12, 4, 2)
    y = merged_linear(x.bfloat16(), gates.float(), w.bfloat16(), b.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference(x, gates, w, b), rtol=5e-2, atol=5e-2)
