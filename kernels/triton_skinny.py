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
dtype is rounded to it here too, with one exception (LATE). One row (M = 1) multiplies and
row-sums [BN, BK] weight tiles.
More rows (2..64 a row block) use ``tl.dot`` with the weight as the left operand ("swap AB": its
rows fill the 64-row MMA tile, the batch rows are the narrow side), and split K over SPLIT
programs so that an output of 1024 columns still spreads over 128+ programs. Their partial sums
meet without a second launch: each program writes its fp32 partial to a workspace and takes a
ticket from its tile's counter; the program that draws the last ticket adds the partials in split
order (deterministic whichever program finished last), runs the epilogue, and resets the counter.
That program requests every partial and the residual at once (one L2 round trip: a loop over the
splits waited one round trip each, and the residual one more after them; H100, mhla-340m, the
fused step at 32 rows 1,082 -> 1,058 us, at 16 rows 869 -> 807, session 23).

LATE (more rows): the norm as a row scale after the product, RMSNorm(x) W^T = diag(1/rms) (x * w)
W^T. A prologue must read each whole row (32 rows of 1024: eight dependent L2 round trips a
program) before its first product; the late form sums squares over the columns each program
loads anyway and scales its sum, each split by its own group's 1/rms when the groups are heads.
It needs every split inside one norm group, or whole groups a split with group ends on tile
ends (or one group a row); otherwise the prologue runs. The difference to the unfused model:
x * w is rounded to the activation dtype instead of the normed x (the same size of error in
bf16; fp32 is unaffected). Not for fp16, whose range the unnormed x * w could leave.

Norm statistics (more rows; the model's fused step): a residual product can write its output's
square sums in 16-column slots (``stats_out``, ``norm_stats``), and a product can take its norm
from such statistics (``stats_in``) with the norm weight folded into its weight: the norm is then
only a scale of the fp32 sums after the loop (every split in one norm group, so each split scales
its own partial), so x enters the MMA as it is (the folded norms' per-element work cost 21 us a
layer at 32 rows, now 5: session 16).

Every program loads its first weight tile before waiting on the previous kernel (programmatic
dependent launch), and lets the next kernel launch at its first instruction (``PDL_EARLY``).
Launch shapes: the decode step's picks where there are some (``step_picks``, chosen in the step),
else tuned alone at the first launch (``skinny_shapes``).
"""
import functools

import torch
import triton
import triton.language as tl

from . import step_picks, triton_common
from .skinny_shapes import (_DOT, _FIXED_SHAPE, _GEMV, _KEY, _MAX_BN, _MAX_SPLIT, _fits_rows, _late_fits,  # noqa: F401
                            _one_split, _some_late_fits, _stats_fit_shape, _waves)
from .triton_common import INTERPRET, PDL, PDL_EARLY, graph_bench, pow2, round_to, splitk_workspace
from .triton_norm_stats import norm_stats, row_stats  # noqa: F401  (the statistics' buffer and first producer)

MAX_SPLIT: tl.constexpr = tl.constexpr(_MAX_SPLIT)
# the late norm (module doc) in the tensor-core form; False: the prologue everywhere (A/B runs)
LATE_NORM = True


@triton.jit
def _finish(acc, acc_up, y_ptr, res_ptr, so_ptr, M, N, pid_n, rm, rn, mm, mn, sr, sy, SWIGLU: tl.constexpr,
            RESIDUAL: tl.constexpr, STATS_OUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, res_early,
            RES_EARLY: tl.constexpr):
    """Epilogue on the full sums acc [BM, BN]: SwiGLU, residual, one rounding to the output dtype.
    STATS_OUT: the output rows' square sums of each 16 columns, for the next product's norm, in the
    slots of so [N / 16, M] (exact per slot, so any grouping of them reads what it needs)."""
    DT: tl.constexpr = y_ptr.dtype.element_ty
    y = round_to(acc, DT).to(tl.float32)
    if SWIGLU:
        y = round_to(y * tl.sigmoid(y) * round_to(acc_up, DT).to(tl.float32), DT).to(tl.float32)
    om = mm[:, None] & mn[None, :]
    if RES_EARLY:  # loaded right after the wait (one row), off the tail
        y += res_early
    elif RESIDUAL:
        y += tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=om, other=0.0).to(tl.float32)
    out = round_to(y, DT)
    tl.store(y_ptr + rm[:, None] * sy + rn[None, :], out, mask=om)
    if STATS_OUT:
        yo = tl.where(om, out.to(tl.float32), 0.0)
        vals = tl.trans(tl.sum(tl.reshape(yo * yo, [BM, BN // 16, 16]), axis=2))                # [BN / 16, BM]
        row = pid_n * (BN // 16) + tl.arange(0, BN // 16)                                        # [BN / 16]
        tl.store(so_ptr + row[:, None] * M + rm[None, :], vals, mask=(row * 16 < N)[:, None] & mm[None, :])


@triton.jit
def _operand(x_ptr, nw_ptr, g_ptr, rm, mm, rk, mk, sx, sg, GS, rstds, grp, NORM: tl.constexpr,
             GATE: tl.constexpr, LATE: tl.constexpr, NG: tl.constexpr, DT: tl.constexpr, F32_DOT: tl.constexpr,
             nw_early, NW_EARLY: tl.constexpr, x_early, g_early, XG_EARLY: tl.constexpr):
    """The x tile [BM, BK] as the product takes it (fp32 holding DT values), and its rows' square
    sums [BM] (used by the late norm). XG_EARLY: x's (and g's) tile loaded already (x_early, g_early)."""
    if XG_EARLY:
        x = x_early.to(tl.float32)
    else:
        x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
    sq = tl.sum(x * x, axis=1)
    if NORM:
        if NW_EARLY:  # the first tile's, loaded before the wait
            nw = nw_early
        else:
            nw = tl.load(nw_ptr + (rk % GS), mask=mk, other=0.0).to(tl.float32)                 # [BK]
        if LATE:  # x * w: 1/rms scales the product's sum
            x = x * nw[None, :]
        else:
            if NG == 1:
                rstd = rstds                                                                     # [BM, 1]
            else:  # each column's group
                sel = grp[None, None, :] == (rk // GS)[None, :, None]                            # [1, BK, NG]
                rstd = tl.sum(tl.where(sel, rstds[:, None, :], 0.0), axis=2)                    # [BM, BK]
            x = round_to(x * rstd * nw[None, :], DT).to(tl.float32)
    if GATE:
        if XG_EARLY:
            g = g_early.to(tl.float32)
        else:
            g = tl.load(g_ptr + rm[:, None] * sg + rk[None, :], mask=mm[:, None] & mk[None, :],
                        other=0.0).to(tl.float32)
        x = x * (g * tl.sigmoid(g))
        if not LATE:
            x = round_to(x, DT).to(tl.float32)
    if LATE and F32_DOT:  # one rounding of x * w (* silu(g)); a 16-bit dot's operand cast
        x = round_to(x, DT).to(tl.float32)  # rounds it the same way on the GPU, in one instruction
    return x, sq


@triton.jit
def _mma(acc, acc_up, w, wu, x, DOT: tl.constexpr, F32_DOT: tl.constexpr, SWIGLU: tl.constexpr):
    """acc += the tile's product: [BN, BM] (transposed) with tensor cores, else [BM, BN] (one row)."""
    if DOT:
        if F32_DOT:
            xt = tl.trans(x)                                                                     # [BK, BM]
            acc += tl.dot(w.to(tl.float32), xt, input_precision="ieee")
            if SWIGLU:
                acc_up += tl.dot(wu.to(tl.float32), xt, input_precision="ieee")
        else:
            xt = tl.trans(x.to(w.dtype))
            acc += tl.dot(w, xt)
            if SWIGLU:
                acc_up += tl.dot(wu, xt)
    else:  # one row (BM == 1): a 2-D multiply and a row sum, loads contiguous along K
        acc += tl.sum(w.to(tl.float32) * x, axis=1)[None, :]
        if SWIGLU:
            acc_up += tl.sum(wu.to(tl.float32) * x, axis=1)[None, :]
    return acc, acc_up


@triton.jit
def _fold(acc, acc_up, accg, accg_up, ss, end, eps, GS, SWIGLU: tl.constexpr):
    """The late norm inside a split that holds whole groups: at a group's ``end``, its sum [BN, BM]
    scaled by its rows' 1/rms joins acc, and the group's sums restart."""
    f = tl.where(end, tl.rsqrt(ss / GS + eps), 0.0)[None, :]                                    # [1, BM]
    acc += accg * f
    if SWIGLU:
        acc_up += accg_up * f
    keep = tl.where(end, 0.0, 1.0)
    return acc, acc_up, accg * keep, accg_up * keep, ss * keep


@triton.jit
def _stats_rstd(sums, grp, K, GS, eps, SI: tl.constexpr):
    """Each row's 1/rms a norm group [NG, BM] from x's square sums in 16-column slots [SI, BM]."""
    sl = tl.arange(0, SI)
    ingrp = ((sl * 16) // GS)[None, :, None] == grp[:, None, None]                              # [NG, SI, 1]
    return tl.rsqrt(tl.sum(tl.where(ingrp, sums[None, :, :], 0.0), axis=1) / GS + eps)          # [NG, BM]


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, nw_ptr, g_ptr, res_ptr, part_ptr, cnt_ptr, so_ptr, si_ptr,
                   M, N, K, GS, eps, sx, sg, sr, sy, STATS_OUT: tl.constexpr, STATS_IN: tl.constexpr, SI: tl.constexpr,
                   NORM: tl.constexpr, GATE: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                   DOT: tl.constexpr, F32_DOT: tl.constexpr, LATE: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr,
                   BGS: tl.constexpr, CH: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, SPLIT: tl.constexpr):
    if EARLY:  # the next kernel may start now and load its weights while this one runs
        tl.extra.cuda.gdc_launch_dependents()
    DT: tl.constexpr = y_ptr.dtype.element_ty
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    ck = tl.arange(0, BK)
    ks = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK                                                   # K columns a split
    k_lo = pid_s * ks
    k_hi = tl.minimum(k_lo + ks, K)
    # the first weight tile does not depend on the previous kernel: request it before waiting
    wmask0 = mn[:, None] & (k_lo + ck < K)[None, :]
    w0 = tl.load(w_ptr + rn[:, None] * K + k_lo + ck[None, :], mask=wmask0, other=0.0)         # [BN, BK]
    wu0 = w0
    if SWIGLU:
        wu0 = tl.load(w_ptr + (N + rn[:, None]) * K + k_lo + ck[None, :], mask=wmask0, other=0.0)
    # one row: the first tile's norm weight too (a parameter: no kernel of the step writes it), so
    # that after the wait only x's round trip precedes the product
    nw0 = tl.zeros([BK], dtype=tl.float32)
    if NORM and not DOT:
        nw0 = tl.load(nw_ptr + (k_lo + ck) % GS, mask=k_lo + ck < K, other=0.0).to(tl.float32)  # [BK]
    if PDL:
        tl.extra.cuda.gdc_wait()  # x, g and res come from the previous kernels
    res0 = tl.zeros([BM, BN], dtype=tl.float32)
    if RESIDUAL and not DOT:  # one row: the residual requested with x, not after the product
        res0 = tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=mm[:, None] & mn[None, :],
                       other=0.0).to(tl.float32)                                                 # [1, BN]
    grp = tl.arange(0, NG)
    rstds = tl.zeros([BM, NG], dtype=tl.float32)
    # one row with the norm prologue: the first tile's x (and g) requested with the row the norm
    # reads, not after its reduction (one L2 round trip instead of two before the product)
    XG_EARLY: tl.constexpr = NORM and not LATE and BM == 1
    x_early = tl.zeros([BM, BK], dtype=x_ptr.dtype.element_ty)
    g_early = x_early
    if XG_EARLY:
        rk = k_lo + ck
        x_early = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=mm[:, None] & (rk < K)[None, :], other=0.0)
        if GATE:
            g_early = tl.load(g_ptr + rm[:, None] * sg + rk[None, :], mask=mm[:, None] & (rk < K)[None, :], other=0.0)
    if NORM and not LATE and BM == 1:  # prologue, one row: every group's 1/rms from one load of the row
        # (a loop over the groups waits for one L2 round trip a group; the output projection's
        # gated head norm cost batch-1 decode 3.2 us a layer with it, H100, session 19)
        gi = tl.arange(0, NG)
        cg = tl.arange(0, BGS)
        xg = tl.load(x_ptr + pid_m * sx + gi[:, None] * GS + cg[None, :],
                     mask=(gi < K // GS)[:, None] & (cg < GS)[None, :], other=0.0).to(tl.float32)  # [NG, BGS]
        # (padding groups 0, not 1/rms of nothing: columns past K select them, and eps may be 0)
        rstds = tl.where(gi < K // GS, tl.rsqrt(tl.sum(xg * xg, axis=1) / GS + eps), 0.0)[None, :]  # [1, NG]
    elif NORM and not LATE:  # prologue: 1/rms of each of the NG groups of every row, CH columns at a time
        for gi in range(0, K // GS):
            sg2 = tl.zeros([BM], dtype=tl.float32)
            for c0 in range(0, BGS, CH):
                cg = c0 + tl.arange(0, CH)
                xg = tl.load(x_ptr + rm[:, None] * sx + gi * GS + cg[None, :], mask=mm[:, None] & (cg < GS)[None, :],
                             other=0.0).to(tl.float32)                                          # [BM, CH]
                sg2 += tl.sum(xg * xg, axis=1)
            r = tl.rsqrt(sg2 / GS + eps)                                                        # [BM]
            rstds = tl.where(grp[None, :] == gi, r[:, None], rstds)
    if DOT:  # transposed accumulators: the weight rows are the MMA's long side
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = acc
    # LATE: accg holds the current norm group's sums, ss its rows' square sums. A split holding
    # whole groups (or the whole row) folds each group into acc at its end; a split inside a
    # group hands its sums and ss to the tile's last program, which scales them.
    accg, accg_up = acc, acc
    ss = tl.zeros([BM], dtype=tl.float32)
    whole = (ks >= K) | (ks % GS == 0)
    # the first tile, peeled so that the loop's loads are unconditional (software-pipelined)
    rk = k_lo + ck
    x, sq = _operand(x_ptr, nw_ptr, g_ptr, rm, mm, rk, rk < K, sx, sg, GS, rstds, grp, NORM, GATE, LATE, NG, DT, F32_DOT,
                     nw0, NORM and not DOT, x_early, g_early, XG_EARLY)
    sums = tl.zeros([SI, BM], dtype=tl.float32)
    if STATS_IN:  # x's square sums in 16-column slots (its producer's), requested with x and reduced
        # only after the product: reduced first, they held x's load back one L2 round trip (the
        # reduction waits for them, and x's load was issued after it)
        sl = tl.arange(0, SI)
        sums = tl.load(si_ptr + sl[:, None] * M + rm[None, :], mask=(sl * 16 < K)[:, None] & mm[None, :],
                       other=0.0)                                                                # [SI, BM]
    # (with statistics each split lies in one group: its sums are scaled after the loop, which
    # stays a plain chain of products; a fold in it measured as slow as the norm it replaced)
    if LATE and not STATS_IN:
        accg, accg_up = _mma(accg, accg_up, w0, wu0, x, DOT, F32_DOT, SWIGLU)
        ss += sq
        end = whole & (k_lo < K) & (((k_lo + BK) % GS == 0) | (k_lo + BK >= k_hi))  # (an empty split: no group)
        acc, acc_up, accg, accg_up, ss = _fold(acc, acc_up, accg, accg_up, ss, end, eps, GS, SWIGLU)
    else:
        acc, acc_up = _mma(acc, acc_up, w0, wu0, x, DOT, F32_DOT, SWIGLU)
    for k0 in range(k_lo + BK, k_hi, BK):
        rk = k0 + ck
        mk = rk < K
        wmask = mn[:, None] & mk[None, :]
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0.0)              # [BN, BK]
        wu = w
        if SWIGLU:
            wu = tl.load(w_ptr + (N + rn[:, None]) * K + rk[None, :], mask=wmask, other=0.0)
        x, sq = _operand(x_ptr, nw_ptr, g_ptr, rm, mm, rk, mk, sx, sg, GS, rstds, grp, NORM, GATE, LATE, NG, DT, F32_DOT,
                         nw0, False, x_early, g_early, False)
        if LATE and not STATS_IN:
            accg, accg_up = _mma(accg, accg_up, w, wu, x, DOT, F32_DOT, SWIGLU)
            ss += sq
            end = whole & (((k0 + BK) % GS == 0) | (k0 + BK >= k_hi))
            acc, acc_up, accg, accg_up, ss = _fold(acc, acc_up, accg, accg_up, ss, end, eps, GS, SWIGLU)
        else:
            acc, acc_up = _mma(acc, acc_up, w, wu, x, DOT, F32_DOT, SWIGLU)
    if LATE and not STATS_IN:  # a split inside a group: its unscaled sums (accg is zero otherwise)
        acc += accg
        acc_up += accg_up
    if STATS_IN:  # every split lies in one group: its sums scaled by that group's 1/rms here, so that
        # the tile's last program only adds (an empty split's sums are 0, and so is its scale)
        rT = _stats_rstd(sums, grp, K, GS, eps, SI)                                              # [NG, BM]
        mine = (grp[:, None] == k_lo // GS) & (k_lo < K)  # (an empty split: no group, whose 1/rms may be inf)
        r0 = tl.sum(tl.where(mine, rT, 0.0), axis=0)                                            # [BM]
        acc, acc_up = acc * r0[None, :], acc_up * r0[None, :]                                   # (DOT: [BN, BM])
    if PDL and not EARLY:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start and fetch its weights
    if DOT:
        acc, acc_up = tl.trans(acc), tl.trans(acc_up)                                           # [BM, BN]
    if SPLIT == 1:  # (the late norm's one split holds whole groups: already scaled)
        _finish(acc, acc_up, y_ptr, res_ptr, so_ptr, M, N, pid_n, rm, rn, mm, mn, sr, sy, SWIGLU, RESIDUAL,
                STATS_OUT, BM, BN, res0, RESIDUAL and not DOT)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        tiles = tl.num_programs(0) * tl.num_programs(2)
        at = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]                          # [BM, BN]
        mine = part_ptr + (pid_s * tiles + tile) * 2 * BM * BN
        squares = part_ptr + SPLIT * tiles * 2 * BM * BN + tile * SPLIT * BM                   # [SPLIT, BM] of this tile
        tl.store(mine + at, acc)
        if SWIGLU:
            tl.store(mine + BM * BN + at, acc_up)
        if LATE and not STATS_IN:
            tl.store(squares + pid_s * BM + tl.arange(0, BM), ss)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:  # the tile's last program: the others' partials are visible now
            # (everything it reads is requested at once: the residual here, the partials in an
            # unrolled loop; a loop over the splits waited one L2 round trip a split)
            res_t = tl.zeros([BM, BN], dtype=tl.float32)
            if RESIDUAL:
                res_t = tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=mm[:, None] & mn[None, :],
                                other=0.0).to(tl.float32)                                        # [BM, BN]
            scaled = LATE and not STATS_IN  # (with statistics each split scaled its own sums)
            sp_i = tl.arange(0, MAX_SPLIT)
            scales = tl.full([MAX_SPLIT, BM], 1.0, dtype=tl.float32)
            if scaled:  # splits inside a group: 1/rms of each split's group, from the square sums of the
                # group's splits; splits of whole groups are scaled already
                have = (sp_i < SPLIT) & (sp_i * ks < K)  # an empty split has no group: 1/rms of nothing
                group = sp_i * ks // GS
                sqs = tl.load(squares + sp_i[:, None] * BM + tl.arange(0, BM)[None, :], mask=have[:, None],
                              other=0.0, cache_modifier=".cg")                                  # [MAX_SPLIT, BM]
                same = (group[:, None] == group[None, :]) & have[None, :]                       # [S, S]
                gss = tl.sum(tl.where(same[:, :, None], sqs[None, :, :], 0.0), axis=1)            # [S, BM]
                scales = tl.where(whole | ~have[:, None], 1.0, tl.rsqrt(gss / GS + eps))
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            acc_up = tl.zeros([BM, BN], dtype=tl.float32)
            for sp in tl.static_range(SPLIT):  # split order, not arrival order: a deterministic sum
                part = part_ptr + (sp * tiles + tile) * 2 * BM * BN
                p = tl.load(part + at, cache_modifier=".cg")
                if SWIGLU:
                    pu = tl.load(part + BM * BN + at, cache_modifier=".cg")
                if scaled:
                    r = tl.sum(tl.where(sp_i[:, None] == sp, scales, 0.0), axis=0)[:, None]     # [BM, 1]
                    p = p * r
                    if SWIGLU:
                        pu = pu * r
                acc += p
                if SWIGLU:
                    acc_up += pu
            _finish(acc, acc_up, y_ptr, res_ptr, so_ptr, M, N, pid_n, rm, rn, mm, mn, sr, sy, SWIGLU, RESIDUAL,
                    STATS_OUT, BM, BN, res_t, RESIDUAL)
            tl.store(cnt_ptr + tile, 0)  # the next launch counts from zero


_gemm = triton.autotune(configs=_DOT, key=_KEY, do_bench=graph_bench,
                        prune_configs_by={"early_config_prune": step_picks.pruner(_fits_rows, _waves)})(_skinny_kernel)


_gemv_sizes: set = set()  # the row sizes _gemv made a tuner for (tuned_configs)


@functools.lru_cache(maxsize=None)
def _gemv(kp: int):
    """The one-row tuner for rows of ``kp`` (a power of two) columns: the row-tile configurations
    plus whole-row ones, whose programs load their entire weight slice before waiting on the
    previous kernel (with the early trigger that load overlaps the previous kernel's run). A
    product with a pick chosen in the decode step (``step_picks``) takes it untimed."""
    _gemv_sizes.add(kp)
    whole = [triton.Config({"BN": bn, "BK": kp, "SPLIT": 1}, num_warps=w, num_stages=1)
             for bn in (1, 2, 4, 8) for w in (4, 8) if kp > 1024 and bn * kp <= 16384]
    return triton.autotune(configs=_GEMV + whole, key=_KEY, do_bench=graph_bench,
                           prune_configs_by={"early_config_prune": step_picks.pruner(_one_split)})(_skinny_kernel)


def forget_tuning() -> None:
    """Drop the tuners' choices, so the next launch of each shape prunes (and picks) again."""
    _gemm.cache.clear()
    for kp in _gemv_sizes:
        _gemv(kp).cache.clear()


def tuned_configs() -> dict[str, str]:
    """The launch shapes the tuners picked in this process, by tuner and key (mhla-bench records
    them: the batch-1 spread between processes of sessions 18-19 came from near-tied picks)."""
    tuners = [("rows", _gemm)] + [(f"one row, K {kp}", _gemv(kp)) for kp in _gemv_sizes]
    out = {f"{name}: {key}": str(cfg) for name, tuner in tuners for key, cfg in getattr(tuner, "cache", {}).items()}
    out.update({f"step pick: {key}": str(use[0]) for key, use in step_picks.used.items() if use[0]})
    return out


def skinny_linear(x, weight, *, norm_weight=None, group=None, eps=1e-6, gate=None, swiglu=False, residual=None,
                  split=None, stats_out=None, stats_in=None):
    """x [M, K] -> y [M, N] in x's dtype. ``weight`` [N, K] (or [2N, K] = [gate; up] with ``swiglu``).
    ``norm_weight`` [group] applies RMSNorm per group of ``group`` columns (default K) first;
    ``gate`` [M, K] multiplies by silu(gate) after it; ``residual`` [M, N] is added at the end.
    ``split``: fix the number of K splits of the tensor-core form (tests); default: tuned.
    More than one row only (the tensor-core form): ``stats_out`` (``norm_stats(M, N)``) receives
    y's square sums in 16-column slots (``norm_stats``). ``stats_in`` (x's, so filled by x's
    producer or ``row_stats``) applies RMSNorm per group of ``group`` columns with the norm weight
    already folded into ``weight``'s columns (``norm_weight`` stays None): y = sum over groups of
    1/rms(x_g) * x_g W_g^T, a scale of the fp32 sums, so x enters the product as it is."""
    M, K = x.shape
    N = weight.shape[0] // (2 if swiglu else 1)
    assert split is None or 1 <= split <= _MAX_SPLIT, "the workspace holds at most _MAX_SPLIT partials a tile"
    assert weight.shape[1] == K and weight.is_contiguous() and x.stride(-1) == 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    norm = norm_weight is not None
    gs = (group or K) if norm else K
    assert K % gs == 0, "the norm groups must tile the row"
    small = M == 1
    bm = 1 if small else min(pow2(M, 16), 64)
    mblocks = triton.cdiv(M, bm)
    ws = None if small else splitk_workspace(x.device, *_workspace_size(M, N))
    parts, counters = ws if ws is not None else (x, x)
    dummy = x
    launch, fixed = (_gemv(pow2(K)) if small else _gemm), {}
    if stats_in is not None:
        assert not norm and not small, "stats_in: the norm weight folded into the weight, from 2 rows"
        gs = group or K
        assert K % gs == 0 and (gs == K or gs % 16 == 0), \
            "stats_in: groups of a multiple of 16 columns that tile the row"
        assert x.dtype != torch.float16, "stats_in: not fp16 (the unnormed x could leave its range)"
        assert ws is not None, "stats_in: in a CUDA-graph capture, run one step outside it first (stats_ready)"
        assert stats_out is None or stats_out.data_ptr() != stats_in.data_ptr(), "stats_in and stats_out alias"
    late = (norm and not small and LATE_NORM and x.dtype != torch.float16) or stats_in is not None
    if INTERPRET or split is not None:  # no tuning; few programs, since the interpreter runs them one by one
        fixed_split = 1 if small else (split or _fixed_split(K, gs, stats_in is not None))
        launch, fixed = _skinny_kernel, dict(_FIXED_SHAPE, SPLIT=fixed_split)
    if not small and ws is None:  # in a CUDA-graph capture before any eager call of this size: no split
        launch, fixed = _skinny_kernel, {"BN": 64, "BK": 128, "SPLIT": 1}
    fits = _stats_fit_shape if stats_in is not None else _late_fits
    if late and fixed:  # a fixed shape must fit the norm groups (narrower tiles may: small test models)
        narrower = (32, 16) if stats_in is not None else ()  # (the late norm has the prologue to fall back on)
        bk = next((b for b in (fixed["BK"], *narrower) if b <= fixed["BK"] and fits(K, gs, b, fixed["SPLIT"])), None)
        late, fixed = bk is not None, dict(fixed, BK=bk or fixed["BK"])
    elif late:  # the tuner keeps only the shapes that fit
        late = _some_late_fits(K, gs, stats_in is not None)
    # (with statistics there is no prologue to fall back on: the caller checks ``stats_fit``)
    assert late or stats_in is None, "stats_in: no launch shape fits these norm groups (stats_fit)"
    for st, cols in ((stats_out, N), (stats_in, K)):
        assert st is None or (not small and st.shape == (triton.cdiv(cols, 16), M) and st.dtype == torch.float32
                              and st.is_contiguous()), "norm statistics: norm_stats(rows, columns), from 2 rows"
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), meta["SPLIT"], mblocks)  # noqa: E731
    # (through step_picks: a pick from a file that cannot compile or launch here falls back to tuning)
    step_picks.launching(launch, lambda: launch[grid](
                 x, weight, y, norm_weight if norm else dummy, gate if gate is not None else dummy,
                 residual if residual is not None else dummy, parts, counters,
                 stats_out if stats_out is not None else parts, stats_in if stats_in is not None else parts,
                 M, N, K, gs, eps,
                 x.stride(0), gate.stride(0) if gate is not None else 0,
                 residual.stride(0) if residual is not None else 0, y.stride(0),
                 STATS_OUT=stats_out is not None, STATS_IN=stats_in is not None, SI=pow2(triton.cdiv(K, 16), 1),
                 NORM=norm, GATE=gate is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
                 DOT=not small, F32_DOT=INTERPRET or x.dtype == torch.float32, LATE=late, BM=bm,
                 NG=pow2(K // gs, 1), BGS=pow2(gs, 1), CH=pow2(gs, 1) if small else min(pow2(gs, 1), 4096 // bm),
                 PDL=PDL, EARLY=PDL_EARLY, launch_pdl=PDL, **fixed))
    return y


def _workspace_size(M: int, N: int):
    """Split-K workspace for M rows of N outputs: per split and tile the fp32 partials of [BM, BN]
    (two with SwiGLU) and the late norm's square sums; a counter a tile (BN >= 16)."""
    bm = min(pow2(M, 16), 64)
    mblocks = triton.cdiv(M, bm)
    return _MAX_SPLIT * mblocks * (N + 2 * _MAX_BN) * 3 * bm, mblocks * triton.cdiv(N, 16)


def _fixed_split(K: int, gs: int, stats: bool) -> int:
    """The split count without tuning: 2, or with statistics over several groups one a group."""
    return min(K // gs, _MAX_SPLIT) if stats and gs < K else 2


def stats_ready(device, rows: int, columns: int) -> bool:
    """Whether products with statistics can launch now for ``rows`` rows of up to ``columns``
    outputs: not in a CUDA-graph capture that would have to grow the split-K workspace."""
    d = torch.device(device)
    if d.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return True
    have = triton_common._workspaces.get((d.type, d.index if d.index is not None else torch.cuda.current_device()))
    need = _workspace_size(rows, columns)
    return have is not None and have[0].numel() >= need[0] and have[1].numel() >= need[1]


def stats_fit(K: int, group: int) -> bool:
    """Whether the tensor-core form can scale sums by norm statistics for rows of K in ``group``s."""
    if group <= 0 or K % group or (group != K and group % 16):
        return False
    return K // group <= _MAX_SPLIT if INTERPRET else _some_late_fits(K, group, True)
