"""Skinny matrix products for decode: ``y[M, N] = f(x)[M, K] @ W[N, K]^T`` with M (the batch) small.

At decode such a product is bound by reading W once, and at batch 1 the elementwise work
around each projection (norms, gates, residuals) would cost a launch of its own, about as long
as the product itself. These kernels read W in row tiles, at cuBLAS's bandwidth on the 340M
shapes (README), and fold that work in:

    NORM      prologue: RMSNorm of x per group of GS columns (GS = K: the layer norm; GS = V:
              the per-head output norm), times the norm weight
    GATE      prologue: ... times silu(g)               (the attention's gated output norm)
    SWIGLU    W = [W_gate; W_up] (2N rows): y = silu(x W_gate^T) * (x W_up^T)
    RESIDUAL  epilogue: y = res + x W^T

Rounding follows the unfused model: each value that the eager code stores in the activation
dtype is rounded to it here too. One row (M = 1) multiplies and row-sums [BN, BK] weight tiles;
more rows use ``tl.dot`` tiles of 16+ rows.
"""
import functools

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, PDL, PDL_EARLY, graph_bench, pow2

_KEY = ["BM", "N", "K", "GS", "NORM", "GATE", "SWIGLU", "RESIDUAL"]
# few configurations: each costs a compile at the first decode step of a new model shape
_GEMV = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=3)
         for bn in (2, 4, 8, 16) for bk, w in ((512, 4), (1024, 8))]
_DOT = [triton.Config({"BN": bn, "BK": bk}, num_warps=4, num_stages=3) for bn in (16, 32, 64) for bk in (128, 256)]


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, nw_ptr, g_ptr, res_ptr, M, N, K, GS, eps, sx, sg, sr, sy,
                   NORM: tl.constexpr, GATE: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                   DOT: tl.constexpr, F32_DOT: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr, BGS: tl.constexpr,
                   PDL: tl.constexpr, EARLY: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    if EARLY:  # the next kernel may start now and load its weights while this one runs
        tl.extra.cuda.gdc_launch_dependents()
    DT: tl.constexpr = y_ptr.dtype.element_ty
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    ck = tl.arange(0, BK)
    # the first weight tile does not depend on the previous kernel: request it before waiting
    wmask0 = mn[:, None] & (ck < K)[None, :]
    w0 = tl.load(w_ptr + rn[:, None] * K + ck[None, :], mask=wmask0, other=0.0)                 # [BN, BK]
    if SWIGLU:
        wu0 = tl.load(w_ptr + (N + rn[:, None]) * K + ck[None, :], mask=wmask0, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # x, g and res come from the previous kernels
    grp = tl.arange(0, NG)
    if NORM:  # prologue: 1/rms of each of the NG groups of every row (x is small and stays in cache)
        rstds = tl.zeros([BM, NG], dtype=tl.float32)
        cg = tl.arange(0, BGS)
        for gi in range(0, K // GS):
            xg = tl.load(x_ptr + rm[:, None] * sx + gi * GS + cg[None, :], mask=mm[:, None] & (cg < GS)[None, :],
                         other=0.0).to(tl.float32)                                              # [BM, BGS]
            r = tl.rsqrt(tl.sum(xg * xg, axis=1) / GS + eps)                                    # [BM]
            rstds = tl.where(grp[None, :] == gi, r[:, None], rstds)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + ck
        mk = rk < K
        x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        x = x.to(tl.float32)                                                                     # [BM, BK]
        if NORM:
            if NG == 1:
                rstd = rstds                                                                     # [BM, 1]
            else:  # each column's group
                sel = grp[None, None, :] == (rk // GS)[None, :, None]                            # [1, BK, NG]
                rstd = tl.sum(tl.where(sel, rstds[:, None, :], 0.0), axis=2)                    # [BM, BK]
            nw = tl.load(nw_ptr + (rk % GS), mask=mk, other=0.0).to(tl.float32)                 # [BK]
            x = (x * rstd * nw[None, :]).to(DT).to(tl.float32)
        if GATE:
            g = tl.load(g_ptr + rm[:, None] * sg + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            g = g.to(tl.float32)
            x = (x * (g * tl.sigmoid(g))).to(DT).to(tl.float32)
        if k0 == 0:
            w = w0
            if SWIGLU:
                wu = wu0
        else:
            wmask = mn[:, None] & mk[None, :]
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0.0)          # [BN, BK]
            if SWIGLU:
                wu = tl.load(w_ptr + (N + rn[:, None]) * K + rk[None, :], mask=wmask, other=0.0)
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
        else:  # one row (BM == 1): a 2-D multiply and a row sum, loads contiguous along K
            acc += tl.sum(w.to(tl.float32) * x, axis=1)[None, :]
            if SWIGLU:
                acc_up += tl.sum(wu.to(tl.float32) * x, axis=1)[None, :]
    if PDL and not EARLY:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start and fetch its weights
    y = acc.to(DT).to(tl.float32)
    if SWIGLU:
        y = y * tl.sigmoid(y) * acc_up.to(DT).to(tl.float32)
    om = mm[:, None] & mn[None, :]
    if RESIDUAL:
        y += tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * sy + rn[None, :], y.to(DT), mask=om)


_gemm = triton.autotune(configs=_DOT, key=_KEY, do_bench=graph_bench)(_skinny_kernel)


@functools.lru_cache(maxsize=None)
def _gemv(kp: int):
    """The one-row tuner for rows of ``kp`` (a power of two) columns: the row-tile configurations
    plus whole-row ones, whose programs load their entire weight slice before waiting on the
    previous kernel (with the early trigger that load overlaps the previous kernel's run)."""
    whole = [triton.Config({"BN": bn, "BK": kp}, num_warps=w, num_stages=1)
             for bn in (1, 2, 4, 8) for w in (4, 8) if kp > 1024 and bn * kp <= 16384]
    return triton.autotune(configs=_GEMV + whole, key=_KEY, do_bench=graph_bench)(_skinny_kernel)


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
    assert K % gs == 0, "the norm groups must tile the row"
    small = M == 1
    bm = 1 if small else min(pow2(M, 16), 64)
    dummy = x
    launch, fixed = (_gemv(pow2(K)) if small else _gemm), {}
    if INTERPRET:  # no tuning; few programs, since the interpreter runs them one by one
        launch, fixed = _skinny_kernel, {"BN": 64, "BK": 64}
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), triton.cdiv(M, bm))  # noqa: E731
    launch[grid](x, weight, y, norm_weight if norm else dummy, gate if gate is not None else dummy,
                 residual if residual is not None else dummy, M, N, K, gs, eps,
                 x.stride(0), gate.stride(0) if gate is not None else 0,
                 residual.stride(0) if residual is not None else 0, y.stride(0),
                 NORM=norm, GATE=gate is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
                 DOT=not small, F32_DOT=INTERPRET or x.dtype == torch.float32, BM=bm,
                 NG=pow2(K // gs, 1), BGS=pow2(gs, 1), PDL=PDL, EARLY=PDL_EARLY, launch_pdl=PDL, **fixed)
    return y
