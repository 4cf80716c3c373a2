"""GradBuffer: the memory of an expert weight's gradient is reused only once nobody holds it."""

import copy
import pickle

import pytest
import torch

from meo_fairseq.modules import MoEConfig, MoEFFN, merged_linear, mix_linear
from meo_fairseq.modules.buffers import GradBuffer, kept_zeros, release_scratch, scratch, scratch_bytes

D = torch.float64


def test_get_reuses_storage_only_when_released():
    buf = GradBuffer()
    a = buf.get((3, 4), D, "cpu")
    a.fill_(1.0)
    b = buf.get((3, 4), D, "cpu")  # `a` is alive: fresh memory
    assert b.data_ptr() != a.data_ptr()
    ptr = a.data_ptr()
    del a
    c = buf.get((3, 4), D, "cpu")  # released: the same memory again
    assert c.data_ptr() == ptr and c.shape == (3, 4) and c.is_contiguous() and c._base is None
    del c
    d = buf.get((4, 3), D, "cpu")  # another shape: fresh
    assert d.data_ptr() != ptr and d.shape == (4, 3)
    e = buf.get((4, 3), torch.float32, "cpu")
    assert e.dtype == torch.float32


def test_slots_are_independent_and_kept_zeros_are_zeros():
    buf = GradBuffer()
    a = buf.get((3, 4), D, "cpu")
    b = buf.get((3, 4), D, "cpu", slot="out")  # another slot: its own storage, even with `a` alive
    assert a.data_ptr() != b.data_ptr()
    ptr_b = b.data_ptr()
    b.fill_(7.0)
    del b
    z = kept_zeros(buf, "out", (3, 4), torch.ones(1, dtype=D))
    assert z.data_ptr() == ptr_b and torch.equal(z, torch.zeros(3, 4, dtype=D))  # reused, and zeroed
    z2 = kept_zeros(buf, "out", (3, 4), torch.ones(1, dtype=D))  # `z` alive: fresh zeros
    assert z2.data_ptr() != ptr_b and torch.equal(z2, torch.zeros(3, 4, dtype=D))
    assert kept_zeros(None, "out", (2,), torch.ones(1)).tolist() == [0.0, 0.0]


def test_copies_and_pickles_start_empty():
    buf = GradBuffer()
    t = buf.get((2, 2), D, "cpu")
    for other in (copy.deepcopy(buf), pickle.loads(pickle.dumps(buf))):
        assert other._slots == {}
        assert other.get((2, 2), D, "cpu").data_ptr() != t.data_ptr()


def _layer_grad(m, x, probe):
    y = m(x)
    (y * probe).sum().backward()
    return {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("mode,level", [("meo", "sequence"), ("moe", "token")])
def test_training_steps_reuse_gradient_memory_and_stay_exact(mode, level):
    torch.manual_seed(0)
    cfg = MoEConfig(
        mode=mode,
        level=level,
        routing="sequence" if level == "sequence" else "token",
        experts=4,
        top_k=2,
        expert_unit="linear",
        gate_noise=False,
    )
    m = MoEFFN(6, 10, cfg).to(D)
    ref = copy.deepcopy(m)
    for r in ref.modules():  # the reference allocates every gradient afresh
        if hasattr(r, "grad_buffer"):
            r.grad_buffer = None
    x, probe = torch.randn(3, 5, 6, dtype=D), torch.randn(3, 5, 6, dtype=D)
    ptrs = None
    for _step in range(3):
        for p in list(m.parameters()) + list(ref.parameters()):
            p.grad = None
        got, want = _layer_grad(m, x, probe), _layer_grad(ref, x, probe)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12)
        now = (m.fc1.experts.weight.grad.data_ptr(), m.fc2.experts.weight.grad.data_ptr())
        if mode == "moe":  # compute-then-mix also keeps its outputs' and input gradients' memory
            slots = [e.grad_buffer._slots for e in (m.fc1.experts, m.fc2.experts)]
            # (x needs no gradient here, so fc1 computes no input gradient)
            assert slots[0].keys() == {"grad", "out"} and slots[1].keys() == {"grad", "out", "grad_in"}
            now += tuple(sl[k][0].data_ptr() for sl in slots for k in sorted(sl))
        if ptrs is not None:
            assert now == ptrs  # the freed memory was used again
        ptrs = now
        del got, want  # (nobody holds the gradients any more once .grad is reset)


@pytest.mark.parametrize("fn", ["merged", "mix"])
def test_kept_gradient_is_never_overwritten(fn):
    """Gradient accumulation (the previous .grad alive) and a user holding on to a gradient."""
    torch.manual_seed(1)
    n, o, i = 3, 4, 5
    weight = torch.randn(n, o, i, dtype=D, requires_grad=True)
    buf = GradBuffer()
    x = torch.randn(2, 6, i, dtype=D)
    gates = torch.softmax(torch.randn(2, n, dtype=D), -1)
    idx = torch.tensor([[0, 1]] * 12)
    w = torch.full((12, 2), 0.5, dtype=D)

    def run(scale):
        if fn == "merged":
            y = merged_linear(x * scale, gates, weight, None, buf)
        else:
            y = mix_linear((x * scale).reshape(12, i), idx, w, weight, None, buf)
        y.sum().backward()

    run(1.0)
    g1 = weight.grad.clone()
    run(2.0)  # accumulates into the alive .grad: the buffer is busy
    torch.testing.assert_close(weight.grad, 3 * g1)
    kept = weight.grad
    weight.grad = None
    run(1.0)  # `kept` still holds the old memory: it must not be reused
    torch.testing.assert_close(kept, 3 * g1)
    torch.testing.assert_close(weight.grad, g1)


# ---- scratch: one reusable storage for temporaries that never leave their caller ---------------


def test_scratch_reuses_grows_and_never_hands_out_memory_in_use():
    release_scratch()
    a = scratch(10, D, "cpu")
    assert a.shape == (10,) and a.dtype == D and scratch_bytes() == 80
    b = scratch(4, D, "cpu")  # `a` is still alive: fresh memory, the scratch is not touched
    assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() and scratch_bytes() == 80
    ptr = a.untyped_storage().data_ptr()
    del a, b
    c = scratch(6, torch.float32, "cpu")  # free again: the same memory, any dtype
    assert c.untyped_storage().data_ptr() == ptr and c.dtype == torch.float32 and c.shape == (6,)
    del c
    d = scratch(30, D, "cpu")  # larger: grown once, kept at the largest request
    assert d.numel() == 30 and scratch_bytes() == 240
    del d
    assert scratch(3, D, "cpu").untyped_storage().nbytes() == 240
    release_scratch()
    assert scratch_bytes() == 0


@pytest.mark.parametrize("whole", [True, False])
def test_merged_linear_is_exact_whether_the_scratch_is_free_or_held(monkeypatch, whole):
    """The merged weights and per-group weight gradients live in the scratch memory; a scratch
    held by somebody else (a misuse) only costs a fresh allocation."""
    from meo_fairseq.modules import merge as M

    if not whole:  # the blocked path, several row blocks
        monkeypatch.setattr(M, "MERGE_BLOCK_BYTES", 8 * 3 * 5 * 2)
        monkeypatch.setattr(M, "MERGE_MIN_ROWS", 1)
    torch.manual_seed(2)
    g, t, i, o, n = 3, 4, 5, 7, 4
    x = torch.randn(g, t, i, dtype=D, requires_grad=True)
    gates = torch.softmax(torch.randn(g, n, dtype=D), -1).requires_grad_(True)
    w = torch.randn(n, o, i, dtype=D, requires_grad=True)
    b = torch.randn(n, o, dtype=D, requires_grad=True)
    probe = torch.randn(g, t, o, dtype=D)
    ref = sum(gates[:, e, None, None] * (x @ w[e].t() + b[e]) for e in range(n))
    want = torch.autograd.grad((ref * probe).sum(), [x, gates, w, b])
    for held in (False, True, False):
        release_scratch()
        keep = scratch(1, D, "cpu") if held else None
        if keep is not None:
            keep.fill_(7.0)
        y = M.merged_linear(x, gates, w, b)
        got = torch.autograd.grad((y * probe).sum(), [x, gates, w, b])
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        if held:
            assert float(keep[0]) == 7.0  # never written by the layer
        else:
            assert scratch_bytes() > 0  # the layer used the scratch


def test_kept_output_is_never_overwritten():
    """An output of compute-then-mix that the caller still holds keeps its values when the layer
    runs again (the second call gets fresh memory), and a released one is reused."""
    torch.manual_seed(2)
    weight, bias = torch.randn(3, 4, 5, dtype=D), torch.randn(3, 4, dtype=D)
    buf = GradBuffer()
    x = torch.randn(6, 5, dtype=D)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0]] * 2)
    w = torch.full((6, 2), 0.5, dtype=D)
    y1 = mix_linear(x, idx, w, weight, bias, buf)
    keep, ptr = y1.clone(), y1.data_ptr()
    y2 = mix_linear(2 * x, idx, w, weight, bias, buf)
    assert y2.data_ptr() != ptr and torch.equal(y1, keep)
    torch.testing.assert_close(y2, mix_linear(2 * x, idx, w, weight, bias))
    del y1, y2
    y3 = mix_linear(x, idx, w, weight, bias, buf)
    assert y3.data_ptr() == ptr and torch.equal(y3, keep)
