"""Pieces shared by the Triton kernels: the mixing coefficient (SPEC section 2) and tile sizes."""
import triton
import triton.language as tl


@triton.jit
def window_coef(m_ptr, L, i, j):
    """``M_ext[i, j]`` of the ``window`` part (0 for j > i, j < 0 or i - j >= L beyond the trained
    blocks). ``i`` and ``j`` are integer tensors that broadcast; the far part is added separately."""
    d = i - j
    beyond = i >= L
    row = tl.minimum(i, L - 1)
    col = tl.where(beyond, L - 1 - d, j)
    ok = (d >= 0) & (j >= 0) & (col >= 0)
    col = tl.minimum(tl.maximum(col, 0), L - 1)
    # the raw parameter is read: clamp here (tril holds by construction, since col <= row)
    m = tl.load(m_ptr + tl.maximum(row, 0) * L + col, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, tl.minimum(tl.maximum(m, 1e-5), 1.0), 0.0)


@triton.jit
def far_coef(m_ptr, L, i):
    """Weight of the *sum* of the blocks older than the window for query block ``i`` (window+far)."""
    count = (i - L + 1).to(tl.float32)
    edge = tl.minimum(tl.maximum(tl.load(m_ptr + (L - 1) * L).to(tl.float32), 1e-5), 1.0)
    return tl.where(count > 0, edge / tl.maximum(count, 1.0), 0.0)


@triton.jit
def ext_coef(m_ptr, L, i, j, FAR: tl.constexpr):
    """Full ``M_ext[i, j]``: the window part plus, under window+far, the per-block share of the far mean."""
    c = window_coef(m_ptr, L, i, j)
    if FAR:
        c += tl.where((j >= 0) & (i - j >= L), far_coef(m_ptr, L, i), 0.0)
    return c


def graph_bench(fn, quantiles=None):
    """The autotuners' timer: CUDA-graph replays, so that a slow host's launch overhead (100+ us
    a launch seen on the GPU machine) does not drown the difference between configurations."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=20, quantiles=quantiles)


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))
