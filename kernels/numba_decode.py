"""CPU decode form with numba: the per-token update fused in one parallel loop over (sequence,
head). There is no numba prefill: on the CPU the torch chunk form is BLAS-bound already (the
dispatch in ``attention.py`` sends it there). Block closing reuses ``torch_ops.close_blocks``
(once every C tokens)."""
import threading

import numba
import numpy as np
import torch

from .. import torch_ops


@numba.njit(parallel=True, cache=True)
def _decode(q, k, v, r, p, blocks, m, scale, o):
    """q, k [B, H, K]; v [B, H, V]; r, p [B, H, K, V] (r updated in place); o [B, H, V] out."""
    B, H, K = q.shape
    V = v.shape[2]
    L = m.shape[0]
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        i = min(blocks[b], L - 1)
        diag = m[i, i]
        acc = np.zeros(V, dtype=np.float32)
        for x in range(K):
            kx, qx = k[b, h, x], q[b, h, x]
            for y in range(V):
                r[b, h, x, y] += kx * v[b, h, y]
                acc[y] += qx * (p[b, h, x, y] + diag * r[b, h, x, y])
        for y in range(V):
            o[b, h, y] = acc[y] * scale


# numba's default ``workqueue`` threading layer aborts the whole process when two threads launch
# parallel kernels at once (two streams decoding on one model). The omp/tbb layers would cope,
# but omp is not fork safe and tbb is often absent, so launches are serialised instead: the
# kernel already uses every core, so two at once would gain nothing.
_LAUNCH_LOCK = threading.Lock()


def numba_decode(q, k, v, clamped, *, scale, block_size, state):
    """One token per sequence (q, k [B, 1, H, K], v [B, 1, H, V]); ``clamped``: the prepared fp32
    mixing matrix. Advances ``state`` by one token, closing the blocks that fill."""
    mc = clamped
    f32 = lambda x: x[:, 0].float().contiguous().numpy()  # noqa: E731
    out = np.empty((q.shape[0], q.shape[2], v.shape[-1]), dtype=np.float32)
    blocks = (state.pos // block_size).numpy()
    args = (f32(q), f32(k), f32(v), state.partial.numpy(), state.prefix.numpy(), blocks,
            mc.contiguous().numpy(), np.float32(scale), out)
    with _LAUNCH_LOCK:
        _decode(*args)
    state.pos += 1
    torch_ops.close_blocks(state, mc, state.pos % block_size == 0)
    return torch.from_numpy(out)[:, None].to(q.dtype)
