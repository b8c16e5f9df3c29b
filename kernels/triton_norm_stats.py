"""Norm statistics for the skinny products (``triton_skinny``'s ``stats_out`` / ``stats_in``): the
buffer a product fills with its output's square sums in 16-column slots, and ``row_stats``, which
computes them for an x no product wrote (the fused decode step's first layer: the embeddings)."""
import torch
import triton
import triton.language as tl

from .triton_common import PDL, PDL_EARLY, pow2


def norm_stats(rows: int, columns: int, device) -> torch.Tensor:
    """The buffer a product's ``stats_out`` fills for ``rows`` outputs of ``columns``: fp32
    [columns / 16, rows]: slot s holds the square sum of columns [16 s, 16 s + 16), so a norm group
    of a multiple of 16 columns (or the whole row) sums its own slots."""
    return torch.empty(triton.cdiv(columns, 16), rows, device=device, dtype=torch.float32)


@triton.jit
def _row_stats_kernel(x_ptr, out_ptr, M, K, sx, CS: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    """One row a program: out[s, m] = sum of x[m, 16 s : 16 s + 16]^2 in fp32, CS slots at a time."""
    if PDL:
        if EARLY:  # the first product may start now and request its weights (it waits for these sums)
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output (the embeddings' gather)
    m = tl.program_id(0).to(tl.int64)  # (64-bit offsets: rows may lie 2**31 elements apart)
    for s0 in range(0, tl.cdiv(K, 16), CS):
        slot = s0 + tl.arange(0, CS)
        col = slot[:, None] * 16 + tl.arange(0, 16)[None, :]                                 # [CS, 16]
        x = tl.load(x_ptr + m * sx + col, mask=col < K, other=0.0).to(tl.float32)
        tl.store(out_ptr + slot.to(tl.int64) * M + m, tl.sum(x * x, axis=1), mask=slot * 16 < K)  # [CS]
    if PDL and not EARLY:
        tl.extra.cuda.gdc_launch_dependents()


def row_stats(x: torch.Tensor) -> torch.Tensor:
    """``norm_stats`` of x [M, K] computed here (for an x no product wrote: the embeddings), in one
    launch (five torch kernels before, each waiting on the last: the fused step at 32 rows
    985.7-987.1 -> 974.7-976.4 us, H100, session 24)."""
    if x.stride(-1) != 1:  # the kernel reads each row's columns contiguously
        x = x.contiguous()
    M, K = x.shape
    out = norm_stats(M, K, x.device)
    if M and K:
        _row_stats_kernel[(M,)](x, out, M, K, x.stride(0), CS=min(pow2(triton.cdiv(K, 16), 1), 64), PDL=PDL,
                                EARLY=PDL_EARLY, launch_pdl=PDL)
    return out
