"""Reusable memory for the gradient of stacked expert weights.

An expert weight's gradient ([N, out, in], N times a dense one) is written whole at every
backward. A fresh allocation of that size comes straight from the OS and every page faults on
first touch, which costs several times the write itself (figures in docs/layer-library.md); a
training step writes it once per expert linear. fairseq frees the gradients at every step
(``zero_grad`` sets them to None), so the memory of one step's gradient can serve the next one.

:class:`GradBuffer` keeps one storage per slot and hands out a tensor on it when nobody else holds
it any more (the previous gradient was freed); otherwise it allocates as usual. The tensor handed
out aliases the storage without being a view, so autograd adopts it as ``.grad`` without a copy.
Vanilla MoE's linears keep their output and input gradient the same way (slots ``out`` and
``grad_in``) for the same reason. (MEO's merged linear does not: it measured slower with them.)
"""

import threading

import torch
from torch import Tensor

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class GradBuffer:
    """``get(shape, dtype, device, slot)`` -> an uninitialised contiguous tensor, reusing freed
    memory. One storage per ``slot``: "grad" (the weight's gradient), and for the layers' other
    large per-step tensors (compute-then-mix's output and input gradient) a slot of their own."""

    def __init__(self):
        self._slots = {}  # slot -> (storage, key)

    def get(self, shape, dtype: torch.dtype, device: torch.device, slot: str = "grad") -> Tensor:
        key = (tuple(shape), dtype, torch.device(device))
        st, st_key = self._slots.get(slot, (None, None))
        if st is not None and key == st_key and _use_count(st._cdata) == 1:  # only ours
            return torch.empty(0, dtype=dtype, device=device).set_(st, 0, key[0])
        t = torch.empty(shape, dtype=dtype, device=device)
        if _use_count is not None and (st is None or _use_count(st._cdata) == 1):
            self._slots[slot] = (t.untyped_storage(), key)  # (a busy one stays: it comes back)
        return t

    def clear(self):
        self._slots = {}

    def kept_bytes(self, exclude=("grad",)) -> int:
        """Bytes held between steps by the slots other than ``exclude``."""
        return sum(st.nbytes() for slot, (st, _) in self._slots.items() if slot not in exclude)

    # never copied or pickled with a module: a copy starts empty
    def __deepcopy__(self, memo):
        return GradBuffer()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def kept_empty(buffer, slot: str, shape, like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` (dtype and device of ``like``) on the ``slot`` storage
    of ``buffer`` (a GradBuffer) on the CPU, so that a large per-step tensor (a layer's output or
    input gradient) faults its pages once, not at every step; a fresh one without a buffer or off
    the CPU."""
    if buffer is None or like.device.type != "cpu":
        return like.new_empty(shape)
    return buffer.get(shape, like.dtype, like.device, slot)


def kept_zeros(buffer, slot: str, shape, like: Tensor) -> Tensor:
    """Zeros on a kept slot (see :func:`kept_empty`)."""
    return kept_empty(buffer, slot, shape, like).zero_()


def new_grad(buffer, like: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``like``, from ``buffer`` (a GradBuffer) or fresh.

    CPU only: CUDA's caching allocator already reuses freed memory, and for other tensors too
    (a buffer held between steps would only take that memory away from the next forward)."""
    if buffer is None or like.device.type != "cpu":
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return buffer.get(like.shape, like.dtype, like.device)


class _Scratch(threading.local):
    storage = None


_scratch = _Scratch()


def scratch(numel: int, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised 1-D tensor of ``numel`` elements for a temporary that never leaves the
    caller (merged weights, per-group weight gradients inside MEO's autograd function).

    On the CPU it lives on one storage per thread that is kept and grown to the largest request,
    so the pages of these temporaries (up to tens of MB per call) fault once, not at every call:
    the same reason as :class:`GradBuffer`. Only one scratch tensor may be in use at a time. If
    the previous one is still referenced (a caller broke that rule), or off the CPU, a fresh
    tensor is returned instead, so a mistake costs speed, never correctness.
    """
    device = torch.device(device)
    if device.type != "cpu" or _use_count is None:
        return torch.empty(numel, dtype=dtype, device=device)
    nbytes = numel * dtype.itemsize
    st = _scratch.storage
    if st is not None and _use_count(st._cdata) > 1:  # still in use somewhere: leave it alone
        return torch.empty(numel, dtype=dtype, device=device)
    if st is None or st.nbytes() < nbytes:
        st = _scratch.storage = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
    return torch.empty(0, dtype=dtype).set_(st, 0, (numel,))


def scratch_bytes() -> int:
    """Bytes held by this thread's scratch storage (counted by the layer benchmark's peak)."""
    st = _scratch.storage
    return st.nbytes() if st is not None else 0


def release_scratch():
    _scratch.storage = None
