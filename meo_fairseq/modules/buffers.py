"""Reusable memory for the gradient of stacked expert weights.

An expert weight's gradient ([N, out, in], N times a dense one) is written whole at every
backward. A fresh allocation of that size comes straight from the OS and every page faults on
first touch: on the 2-core CPU here writing 151 MB (16 experts of 768 x 3072) takes 36 ms into
fresh memory and 9 ms into memory written before, and a training step writes it once per expert
linear. fairseq frees the gradients at every step (``zero_grad`` sets them to None), so the
memory of one step's gradient can serve the next one.

:class:`GradBuffer` keeps one storage and hands out a tensor on it when nobody else holds it any
more (the previous gradient was freed); otherwise it allocates as usual. The tensor handed out
aliases the storage without being a view, so autograd adopts it as ``.grad`` without a copy.
"""

import torch
from torch import Tensor

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class GradBuffer:
    """``get(shape, dtype, device)`` -> an uninitialised contiguous tensor, reusing freed memory."""

    def __init__(self):
        self._storage = None
        self._key = None

    def get(self, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (tuple(shape), dtype, torch.device(device))
        st = self._storage
        if st is not None and key == self._key and _use_count(st._cdata) == 1:  # only ours
            return torch.empty(0, dtype=dtype, device=device).set_(st, 0, key[0])
        t = torch.empty(shape, dtype=dtype, device=device)
        if _use_count is not None and (st is None or _use_count(st._cdata) == 1):
            self._storage, self._key = t.untyped_storage(), key  # (a busy one stays: it comes back)
        return t

    def clear(self):
        self._storage = self._key = None

    # never copied or pickled with a module: a copy starts empty
    def __deepcopy__(self, memo):
        return GradBuffer()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def new_grad(buffer, like: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``like``, from ``buffer`` (a GradBuffer) or fresh.

    CPU only: CUDA's caching allocator already reuses freed memory, and for other tensors too
    (a buffer held between steps would only take that memory away from the next forward)."""
    if buffer is None or like.device.type != "cpu":
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return buffer.get(like.shape, like.dtype, like.device)
