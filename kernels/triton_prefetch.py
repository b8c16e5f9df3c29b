"""Asks L2 for up to four weight tensors in one launch (MHLA_STREAM_PREFETCH=1, batched decode).

Batched decode runs its projections through cuBLAS, which cannot be told to fetch the next
product's weights early the way the batch-1 skinny kernels do (``PF_LINES`` there). So after a
layer's MHLA decode kernel, one launch of this kernel requests the rest of the layer's weights
(o, gate/up, down) and the next layer's q/k/v/g: the products that follow then read them from L2,
while HBM streams the rest. A hint only: nothing computed depends on it. The A/B measurement is
``.ci/prefetch_ab.py``.
"""
import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, prefetch_share

PROGRAMS = 4 if INTERPRET else 64  # enough to issue a layer's ~200k line requests in a few microseconds
LINES = 256


@triton.jit
def _prefetch_kernel(p0, n0, p1, n1, p2, n2, p3, n3, STRIDE: tl.constexpr, LINES: tl.constexpr):
    me, nprog = tl.program_id(0), tl.num_programs(0)
    prefetch_share(p0, n0, STRIDE, me, nprog, LINES)
    prefetch_share(p1, n1, STRIDE, me, nprog, LINES)
    prefetch_share(p2, n2, STRIDE, me, nprog, LINES)
    prefetch_share(p3, n3, STRIDE, me, nprog, LINES)


def prefetch_weights(tensors) -> None:
    """One launch that requests up to four contiguous tensors of one dtype into L2."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    if len(tensors) > 4 or any(t.dtype != tensors[0].dtype or not t.is_contiguous() for t in tensors):
        raise ValueError("prefetch_weights takes up to four contiguous tensors of one dtype")
    args = []
    for i in range(4):
        t = tensors[i] if i < len(tensors) else tensors[0]
        args += [t, t.numel() if i < len(tensors) else 0]
    _prefetch_kernel[(PROGRAMS,)](*args, STRIDE=max(128 // tensors[0].element_size(), 1), LINES=LINES)
