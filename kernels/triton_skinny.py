"""Skinny matrix products for decode: ``y[M, N] = f(x)[M, K] @ W[N, K]^T`` with M (the batch) small.

At decode such a product is bound by reading W once, and cuBLAS's small-M kernels reach about
half the memory bandwidth on an H100; the elementwise work around each projection also costs a
launch of its own. These kernels read W in wide row tiles and fold that work in:

    NORM      prologue: RMSNorm of x per group of GS columns (GS = K: the layer norm; GS = V:
              the per-head output norm), times the norm weight
    GATE      prologue: ... times silu(g)               (the attention's gated output norm)
    SWIGLU    W = [W_gate; W_up] (2N rows): y = silu(x W_gate^T) * (x W_up^T)
    RESIDUAL  epilogue: y = res + x W^T

Rounding follows the unfused model: each value that the eager code stores in the activation
dtype is rounded to it here too. M <= 2 uses broadcast products (BM = 1 or 2 rows, any BN);
larger M uses ``tl.dot`` tiles of 16+ rows.
"""
import os

import torch
import triton
import triton.language as tl

from .triton_common import pow2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KEY = ["BM", "N", "K", "GS", "NORM", "GATE", "SWIGLU", "RESIDUAL"]
if _INTERPRET:
    _GEMV = _DOT = [triton.Config({"BN": 64}, num_warps=4)]  # few programs: the interpreter runs them one by one
else:
    _GEMV = [triton.Config({"BN": bn}, num_warps=w, num_stages=s) for bn in (4, 8, 16) for w in (4, 8) for s in (1, 3)]
    _DOT = [triton.Config({"BN": bn}, num_warps=4, num_stages=s) for bn in (16, 32, 64) for s in (2, 3)]


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, nw_ptr, g_ptr, res_ptr, M, N, K, GS, STEP, eps, sx, sg, sr, sy,
                   NORM: tl.constexpr, GATE: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                   DOT: tl.constexpr, F32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    DT: tl.constexpr = y_ptr.dtype.element_ty
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    ck = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, STEP):  # STEP = GS under NORM (one norm group per step), else BK
        rk = k0 + ck
        mk = (ck < STEP) & (rk < K)
        x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        x = x.to(tl.float32)                                                                     # [BM, BK]
        if NORM:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / GS + eps)                                   # [BM]
            nw = tl.load(nw_ptr + ck, mask=ck < GS, other=0.0).to(tl.float32)                   # [BK]
            x = (x * rstd[:, None] * nw[None, :]).to(DT).to(tl.float32)
        if GATE:
            g = tl.load(g_ptr + rm[:, None] * sg + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            g = g.to(tl.float32)
            x = (x * (g * tl.sigmoid(g))).to(DT).to(tl.float32)
        wmask = mn[:, None] & mk[None, :]
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0.0)              # [BN, BK]
        if SWIGLU:
            wu = tl.load(w_ptr + (N + rn[:, None]) * K + rk[None, :], mask=wmask, other=0.0)   # [BN, BK]
        if DOT:
            if F32_DOT:
                acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
                if SWIGLU:
                    acc_up += tl.dot(x, tl.trans(wu.to(tl.float32)), input_precision="ieee")
            else:
                xd = x.to(w.dtype)
                acc += tl.dot(xd, tl.trans(w))
                if SWIGLU:
                    acc_up += tl.dot(xd, tl.trans(wu))
        else:
            acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)                  # [BM, BN]
            if SWIGLU:
                acc_up += tl.sum(x[:, None, :] * wu.to(tl.float32)[None, :, :], axis=2)
    y = acc.to(DT).to(tl.float32)
    if SWIGLU:
        y = y * tl.sigmoid(y) * acc_up.to(DT).to(tl.float32)
    om = mm[:, None] & mn[None, :]
    if RESIDUAL:
        y += tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * sy + rn[None, :], y.to(DT), mask=om)


_gemv = triton.autotune(configs=_GEMV, key=_KEY)(_skinny_kernel)
_gemm = triton.autotune(configs=_DOT, key=_KEY)(_skinny_kernel)


def skinny_linear(x, weight, *, norm_weight=None, group=None, eps=1e-6, gate=None, swiglu=False, residual=None):
    """x [M, K] -> y [M, N] in x's dtype. ``weight`` [N, K] (or [2N, K] = [gate; up] with ``swiglu``).
    ``norm_weight`` [group] applies RMSNorm per group of ``group`` columns (default K) first;
    ``gate`` [M, K] multiplies by silu(gate) after it; ``residual`` [M, N] is added at the end."""
    M, K = x.shape
    N = weight.shape[0] // (2 if swiglu else 1)
    assert weight.shape[1] == K and weight.is_contiguous() and x.stride(-1) == 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    norm = norm_weight is not None
    gs = (group or K) if norm else K
    bk = pow2(gs) if norm else 256
    small = M <= 2
    bm = pow2(M, 1) if small else pow2(M, 16)
    bm = min(bm, 64)
    dummy = x
    launch = _gemv if small else _gemm
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), triton.cdiv(M, bm))  # noqa: E731
    launch[grid](x, weight, y, norm_weight if norm else dummy, gate if gate is not None else dummy,
                 residual if residual is not None else dummy, M, N, K, gs, gs if norm else bk, eps,
                 x.stride(0), gate.stride(0) if gate is not None else 0,
                 residual.stride(0) if residual is not None else 0, y.stride(0),
                 NORM=norm, GATE=gate is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
                 DOT=not small, F32_DOT=_INTERPRET or x.dtype == torch.float32, BM=bm, BK=bk)
    return y
