"""Chunkwise prefill in three passes, for a batch whose sequences start at their own positions
(mid-block allowed) and have their own lengths. Local block ``m`` of sequence ``b`` is absolute
block ``i0_b + m`` and holds its call tokens ``[m*C - r_b, (m+1)*C - r_b) & [0, n_b)``.

  1. summaries:  S_m = sum_{u in block m} k_u v_u^T   (+ the carried partial R for m = 0)
  2. mixing:     P_m = sum_{j < i} M_ext[i, j] S_j    for m = 1 .. nc_b, a banded GEMM over the
                 in-call summaries plus the carried ring, plus the far sum (window+far)
  3. output:     o_t = s * (q_t P_m + M_ext[i, i] * (causal (q k^T) v + q_t R [m = 0]))

A state whose ring is stored in bf16 (``ROUND``): pass 1 rounds the summaries of the blocks a
call completes as it writes them (the open block, the next partial R, stays fp32), so the mixing,
the far sums and the ring all read the rounded value, as every other form does; the ring is
widened to fp32 on load.

P in the input dtype (16-bit inputs, ``prefix_dtype``): the output pass feeds P to its
tensor-core product in the input dtype anyway, so pass 2 stores P already rounded (to nearest
even, as the cast in pass 3 would): the same outputs, half of P's write and read traffic. The
state's prefix must stay exact fp32, so with a state pass 2 also writes the fp32 P of block
``nc`` (the open block after the call) into a small [B, H, K, V] buffer that the advance copies;
fp32 inputs keep fp32 P and the advance reads P itself. The training backward recomputes P.

S in bf16 (the "lean" layout, ``summary_dtype``): a stateless call with 16-bit inputs (training,
stateless prefill) has no reader that needs S exact, so pass 1 rounds it on store (fp32
accumulate): half of S's write and of the mix pass's read. With a state S stays fp32 (the ring,
far sum and partial come from it). The training backward recomputes S and P in fp32: its
gradients are those of the unrounded forward, within the bf16 tolerance of this one's.

Accumulation is fp32; fp32 inputs use IEEE dots, 16-bit inputs use tensor cores (tf32 for the
fp32 operands). ``F32_DOT`` upcasts dot operands: set under TRITON_INTERPRET, whose bf16 dot is
wrong in triton 3.9.
"""
import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRET, TUNE, band_coef, ext_coef, far_coef, graph_bench, pow2, ring_block, round_bf16,
                            round_to, window_coef)

# Launch configurations, tuned per (K, V) on the GPU; one fixed choice under the interpreter.
# Only pure-output kernels are tuned (tuning re-runs them).
if not TUNE:  # the interpreter, or MHLA_STREAM_TUNE=0
    _CONFIGS = [triton.Config({}, num_warps=4)]
else:
    _CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
# SIZE (a power of two >= the blocks touched) makes short and long prefills tune separately
_tuned = triton.autotune(configs=_CONFIGS, key=["K", "V", "BT", "VPROG", "SIZE"], do_bench=graph_bench)

# The mix pass's tiles (BI target blocks x BCOL columns of S) are tuned too, per layout (``TILES``):
# larger BI reads less halo (the W older blocks, in chunks of 32: x1.5 at 64, x1.25 at 128) but forms
# a BI x (BI + 32) coefficient tile per BCOL columns; larger BCOL shares that tile over more columns
# but holds a larger fp32 accumulator. "base" keeps the tile before (64 x 128).
def _mix_config(bi, bcol, warps, stages=1):
    return triton.Config({"BI": bi, "BCOL": bcol}, num_warps=warps, num_stages=stages)


# Short calls (``SHORT``: at most SHORT_SIZE blocks, so one tile of BI = 16 targets holds them all) take
# tiles of their own: 16 target rows (tl.dot's least) and wide column spans, since a 128-token prompt
# has 2 live target rows, and a 64-row tile spends its coefficient gathers, dots and fp32 accumulator
# on 62 dead ones (H100, 2026-11-23: the pass was 3.75 of 7.9 ms of kernel time in the forward of 8
# such prompts, with 8,192 programs of 64 x 128).
if INTERPRET:  # one tile per layout and walk (no timing on the CPU): lean's 128-block tile for long calls
    _MIX_CONFIGS = [_mix_config(64, 128, 4), _mix_config(128, 64, 4), _mix_config(16, 64, 4)]
elif not TUNE:  # MHLA_STREAM_TUNE=0: the tile the H100 chose for both layouts at 32k, and one short one
    _MIX_CONFIGS = [_mix_config(64, 128, 4), _mix_config(16, 256, 4)]
else:
    _MIX_CONFIGS = [_mix_config(64, 128, w, s) for w in (4, 8) for s in (1, 2, 3)] + \
        [_mix_config(64, 256, 8), _mix_config(128, 128, 8), _mix_config(128, 64, 4), _mix_config(128, 64, 8, 2)] + \
        [_mix_config(16, 256, 4), _mix_config(16, 512, 4), _mix_config(16, 512, 8), _mix_config(16, 1024, 8)]
# lean tries fewer of the 64 x 128 configurations (each one compiles: the GPU tests' time)
_LEAN_SKIPS = {(64, 128, 8, 3), (64, 128, 4, 3)}
SHORT_BI = 16


def _mix_tiles_of_layout(configs, named_args, **kwargs):
    shape = lambda c: (c.kwargs["BI"], c.kwargs["BCOL"], c.num_warps, c.num_stages)  # noqa: E731
    if kwargs["SHORT"]:  # either layout: the short tiles
        return [c for c in configs if shape(c)[0] == SHORT_BI]
    configs = [c for c in configs if shape(c)[0] != SHORT_BI]
    if kwargs["TILES"] == "base":
        return [c for c in configs if shape(c)[:2] == (64, 128)]
    if INTERPRET:
        return [c for c in configs if shape(c)[0] == 128]
    return [c for c in configs if shape(c) not in _LEAN_SKIPS] or configs


# SHORT in the key, though the server's calls derive it from SIZE: a walk forced by SHORT_SIZE (the tests)
# would otherwise reuse the other walk's cached tile at the same SIZE (the autotuner's cache skips the prune)
_tuned_mix = triton.autotune(configs=_MIX_CONFIGS, key=["KV", "W", "TILES", "SIZE", "SHORT"], do_bench=graph_bench,
                             prune_configs_by={"early_config_prune": _mix_tiles_of_layout})


@triton.jit
def _seq_info(seq_ptr, b):
    # per sequence: r (offset in its first block), i0 (absolute first block), n (tokens this call)
    return tl.load(seq_ptr + b * 3), tl.load(seq_ptr + b * 3 + 1), tl.load(seq_ptr + b * 3 + 2)


@triton.jit
def _block_rows(seq_ptr, b, m, C, BT: tl.constexpr):
    """Call-token rows of local block ``m`` of sequence ``b``: indices [BT], their mask, the
    sequence's first absolute block, and whether the block holds any token of this call."""
    r0, i0, n = _seq_info(seq_ptr, b)
    c = tl.arange(0, BT)
    t = m * C - r0 + c
    return t, (t >= 0) & (t < n) & (c < C), i0, m * C - r0 < n


@_tuned
@triton.jit
def _summary_kernel(k_ptr, v_ptr, s_ptr, r_ptr, seq_ptr, NB, SIZE, C, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_STATE: tl.constexpr, ROUND: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VPROG: tl.constexpr, PREC: tl.constexpr,
                    F32_DOT: tl.constexpr):
    """S_m of one (block, sequence, head) for VPROG value columns, walked BV at a time: k is read
    once per program. S is stored in its buffer's dtype (bf16 for stateless 16-bit calls)."""
    m, bh, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    t, mt, i0, live = _block_rows(seq_ptr, b, m, C, BT)                                      # [BT] call tokens
    if live:
        ok_k = tl.arange(0, BK)
        kt = tl.load(k_ptr + b * sk_b + t[:, None] * sk_t + h * sk_h + ok_k[None, :],
                     mask=mt[:, None] & (ok_k[None, :] < K), other=0.0)                        # [BT, BK]
        if F32_DOT:
            kt = kt.to(tl.float32)
        r0, _, n = _seq_info(seq_ptr, b)
        for v0 in range(pv * VPROG, pv * VPROG + VPROG, BV):
            ov = v0 + tl.arange(0, BV)
            vt = tl.load(v_ptr + b * sv_b + t[:, None] * sv_t + h * sv_h + ov[None, :],
                         mask=mt[:, None] & (ov[None, :] < V), other=0.0)                      # [BT, BV]
            if F32_DOT:
                vt = vt.to(tl.float32)
            s = tl.dot(tl.trans(kt), vt, input_precision=PREC)                                # [BK, BV] fp32
            tile = ok_k[:, None] * V + ov[None, :]
            mtile = (ok_k[:, None] < K) & (ov[None, :] < V)
            if HAS_STATE:
                if m == 0:
                    s += tl.load(r_ptr + bh * K * V + tile, mask=mtile, other=0.0)
            if ROUND:  # a block this call completes is stored rounded (bf16 ring): every reader sees that value
                if m < (r0 + n) // C:
                    s = round_bf16(s)
            tl.store(s_ptr + (bh * NB + m) * K * V + tile, round_to(s, s_ptr.dtype.element_ty), mask=mtile)


@triton.jit
def _mix_sources(acc, s_ptr, m_ptr, bh, j0, first, tgt, ti, i0, nc, cols, mc, L, NB,
                 KV: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr, SPLIT16: tl.constexpr,
                 F32_DOT: tl.constexpr):
    """acc += M_ext[targets, BJ in-call sources from local block j0] @ S[sources] (sources before
    block 0 or not completed read as 0). SPLIT16 (bf16 S, tensor cores): the fp32 coefficients as
    a bf16 pair (hi + lo: about 16 significant bits against tf32's 11), two bf16 dots on S as stored,
    instead of widening the S tile to fp32 for one tf32 dot."""
    src = j0 + tl.arange(0, BJ)                                                                  # [BJ] local
    if i0 + first >= L:  # every target past the trained blocks: the coefficient of the distance alone
        coef = band_coef(m_ptr, L, ti[:, None] - (i0 + src[None, :]), 1)
    else:
        coef = window_coef(m_ptr, L, ti[:, None], i0 + src[None, :]) * (src[None, :] < tgt[:, None])
    st = tl.load(s_ptr + (bh * NB + src[:, None]) * KV + cols[None, :],
                 mask=((src >= 0) & (src < nc))[:, None] & mc[None, :], other=0.0)             # [BJ, BCOL]
    if SPLIT16:
        hi = coef.to(tl.bfloat16)
        lo = (coef - hi.to(tl.float32)).to(tl.bfloat16)
        if F32_DOT:  # the interpreter's bf16 dot is wrong: the same pair, widened
            acc += tl.dot(hi.to(tl.float32), st.to(tl.float32), input_precision="ieee")
            acc += tl.dot(lo.to(tl.float32), st.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(hi, st)
            acc += tl.dot(lo, st)
    else:
        acc += tl.dot(coef, st.to(tl.float32), input_precision=PREC)
    return acc


@_tuned_mix
@triton.jit
def _mix_kernel(s_ptr, cum_ptr, p_ptr, pn_ptr, ring_ptr, far_ptr, m_ptr, seq_ptr, L, C, NB, SIZE,
                H: tl.constexpr, KV: tl.constexpr, W: tl.constexpr, HAS_STATE: tl.constexpr, FAR: tl.constexpr,
                TILES: tl.constexpr, LEAN: tl.constexpr, SHORT: tl.constexpr, SPLIT16: tl.constexpr, BI: tl.constexpr,
                BJ: tl.constexpr,
                BW: tl.constexpr, BCOL: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """P of BI target blocks for BCOL columns of one (sequence, head). Lean: a tile's W + BI - 1
    sources in a fixed count of BJ chunks, unrolled, so that their loads are issued together rather
    than one after another (H100, 2026-11-23: with SPLIT16 the pass went from 0.30 to 0.15 ms at 32k)."""
    pi, bh, pc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = bh // H
    r0, i0, n = _seq_info(seq_ptr, b)
    nc = (r0 + n) // C                                   # blocks completed by this call
    first = pi * BI + 1                                  # first target (local) block of this program
    if first <= nc:
        cols = pc * BCOL + tl.arange(0, BCOL)
        mc = cols < KV
        tgt = first + tl.arange(0, BI)                                                          # [BI] local
        # absolute; -1 for targets past the call's last completed block, so that no coefficient of
        # theirs is gathered (a short prompt's one tile is mostly such rows: 2 live of 64 at 128 tokens)
        ti = tl.where(tgt <= nc, i0 + tgt, -1)
        acc = tl.zeros((BI, BCOL), dtype=tl.float32)
        # in-call summaries inside the window of any target in the tile. Lean: unrolled without branches,
        # so that the chunks' loads issue together. SHORT calls (a few blocks: the server's prompts and
        # pieces) walk only the chunks up to their last completed block: their tile is mostly past it,
        # and each unrolled chunk is a chain of dependent loads whether its lanes are live or not
        if LEAN and (not SHORT) and ((W + BI - 2) // BJ + 1 <= 8):
            for jj in tl.static_range((W + BI - 2) // BJ + 1):
                acc = _mix_sources(acc, s_ptr, m_ptr, bh, first - W + jj * BJ, first, tgt, ti, i0, nc, cols,
                                   mc, L, NB, KV, BJ, PREC, SPLIT16, F32_DOT)
        else:  # up to the last completed source
            for j0 in range(tl.maximum(first - W, 0), tl.minimum(first + BI - 1, nc), BJ):
                acc = _mix_sources(acc, s_ptr, m_ptr, bh, j0, first, tgt, ti, i0, nc, cols, mc, L, NB, KV, BJ,
                                   PREC, SPLIT16, F32_DOT)
        if HAS_STATE:
            # targets that still see carried blocks, when there are any: a fresh sequence (i0 = 0, the
            # server's admissions) reads no ring at all, and a young one only its filled slots (H100,
            # 2026-11-23: this pass for 8 fresh 128-token prompts went from 10.8 to 8.8 ms without the read)
            if ((first <= W) | FAR) & (i0 > 0):
                w = tl.arange(0, BW)
                j = ring_block(i0 - 1, w, W)                                   # block in slot w (< 0: empty)
                live = (w < W) & (j >= 0)                                                        # [BW]
                coef = ext_coef(m_ptr, L, ti[:, None], j[None, :], FAR) * live[None, :]          # [BI, BW]
                rt = tl.load(ring_ptr + (bh * W + w[:, None]) * KV + cols[None, :],
                             mask=live[:, None] & mc[None, :], other=0.0).to(tl.float32)         # [BW, BCOL]
                acc += tl.dot(coef, rt, input_precision=PREC)
        if FAR:  # blocks older than the window: their running sum, weighted M[L-1, 0] / count
            fc = far_coef(m_ptr, L, ti)                                                      # [BI]
            upto = ti - L - i0                                                               # last in-call far block
            # only targets this call completes: a tile reaches past them (tgt up to first + BI - 1)
            # and their upto could point past the NB blocks of cum
            far = tl.load(cum_ptr + (bh * NB + tl.maximum(upto, 0)[:, None]) * KV + cols[None, :],
                          mask=((upto >= 0) & (tgt <= nc))[:, None] & mc[None, :], other=0.0)
            if HAS_STATE:
                far += tl.load(far_ptr + bh * KV + cols, mask=mc, other=0.0)[None, :]
            acc += fc[:, None] * far
        tl.store(p_ptr + (bh * NB + tgt[:, None]) * KV + cols[None, :], round_to(acc, p_ptr.dtype.element_ty),
                 mask=(tgt[:, None] <= nc) & (tgt[:, None] < NB) & mc[None, :])
        if HAS_STATE:
            if p_ptr.dtype.element_ty != tl.float32:  # P rounded: the state's prefix (block nc) kept in fp32
                row = tgt[:, None] * 0 + cols[None, :]                                       # [BI, BCOL]
                tl.store(pn_ptr + bh * KV + row, acc, mask=(tgt[:, None] == nc) & mc[None, :])


@_tuned
@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, o_ptr, p_ptr, p0_ptr, r_ptr, m_ptr, seq_ptr, L, C, NB, SIZE, scale,
                   sq_b, sq_t, sq_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, HAS_STATE: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VPROG: tl.constexpr, PREC: tl.constexpr,
                   F32_DOT: tl.constexpr):
    """Outputs of one (block, sequence, head) for VPROG value columns, walked BV at a time: q, k
    and the causal scores are loaded / formed once per program, not once per BV columns."""
    m, bh, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    t, mt, i0, live = _block_rows(seq_ptr, b, m, C, BT)                                      # [BT] call tokens
    if live:
        c = tl.arange(0, BT)
        ok_k = tl.arange(0, BK)
        mk = ok_k < K
        qt = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h * sq_h + ok_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        kt = tl.load(k_ptr + b * sq_b + t[:, None] * sq_t + h * sq_h + ok_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        if F32_DOT:
            qt, kt = qt.to(tl.float32), kt.to(tl.float32)
        scores = tl.dot(qt, tl.trans(kt), input_precision=PREC)                                 # [BT, BT] fp32
        # in the dtype of v once, before the walk (the fp32 scores are not kept across it: registers)
        scores = tl.where(c[:, None] >= c[None, :], scores, 0.0).to(tl.float32 if F32_DOT else v_ptr.dtype.element_ty)
        i = i0 + m
        diag = window_coef(m_ptr, L, i, i)
        for v0 in range(pv * VPROG, pv * VPROG + VPROG, BV):
            ov = v0 + tl.arange(0, BV)
            mv = ov < V
            vt = tl.load(v_ptr + b * sv_b + t[:, None] * sv_t + h * sv_h + ov[None, :], mask=mt[:, None] & mv[None, :],
                         other=0.0)
            if F32_DOT:
                vt = vt.to(tl.float32)
            tile = ok_k[:, None] * V + ov[None, :]
            mtile = mk[:, None] & mv[None, :]
            intra = tl.dot(scores, vt, input_precision=PREC)                                     # [BT, BV]
            # pt [BK, BV] in P's dtype in every branch (one type for the compiler): the carried fp32
            # prefix (m = 0) is rounded to it as pass 2 rounded the stored P
            if m == 0:
                if HAS_STATE:
                    pt = round_to(tl.load(p0_ptr + bh * K * V + tile, mask=mtile, other=0.0), p_ptr.dtype.element_ty)
                    intra += tl.dot(qt.to(tl.float32), tl.load(r_ptr + bh * K * V + tile, mask=mtile, other=0.0),
                                    input_precision=PREC)
                else:
                    pt = tl.zeros((BK, BV), dtype=p_ptr.dtype.element_ty)
            else:
                pt = tl.load(p_ptr + (bh * NB + m) * K * V + tile, mask=mtile, other=0.0)
            if PREC == "ieee":
                inter = tl.dot(qt.to(tl.float32), pt, input_precision=PREC)
            else:  # 16-bit inputs: the prefix enters the tensor-core product in the input dtype (a no-op when P
                # is stored in it; under F32_DOT qt is fp32 and the rounded prefix is widened back, exactly)
                inter = tl.dot(qt, round_to(pt, q_ptr.dtype.element_ty).to(qt.dtype))
            o = (inter + diag * intra) * scale
            tl.store(o_ptr + b * so_b + t[:, None] * so_t + h * so_h + ov[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=mt[:, None] & mv[None, :])


# --------------------------------------------------------------------------------------------
# Launchers: the prefill, and the state advance after it
# --------------------------------------------------------------------------------------------
def prefix_dtype(dtype):
    """How pass 2 stores P for inputs of ``dtype``: 16-bit inputs in their own dtype (pass 3 rounds
    P to it before its product anyway), fp32 inputs in fp32."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


# The forward's layout (``set_variant``; bench_op times both in one run):
#   "lean": S in bf16 for stateless 16-bit calls (``summary_dtype``), V walked inside the
#       programs of passes 1 and 3 once there are enough (block, head) programs to fill the GPU (q and
#       k read once, not once per 64 value columns), the mix tile tuned among several (_MIX_CONFIGS);
#   "base": the layout before: fp32 S, one program per 64 value columns, mix tiles of 64 x 128.
# "lean" is the default: 1.28-1.34x faster than "base" at 32k-128k tokens (H100, bf16, 2026-11-23, README).
# Both give the same outputs for fp32 inputs and with a state up to the order of the mix pass's fp32
# sums; "lean" rounds S for 16-bit stateless calls.
VARIANTS = ("lean", "base")
_variant = "lean"
# Calls of at most this many blocks (a power of two >= the blocks touched) take the mix pass's short
# walk (SHORT): a 128-token prompt's mix pass was 1.2 of its 3.0 ms forward on the H100; the walk alone
# took it to 0.52 ms at one prompt and from 8.8 to 3.75 ms at eight (2026-11-23), the short tiles then.
# 16 blocks: the server's prompts and pieces (up to ~1k tokens); training's 2,048-token rows (32
# blocks) and long prefills keep the unrolled walk their figures were measured with
SHORT_SIZE = 16


def set_variant(name: str) -> None:
    global _variant
    if name not in VARIANTS:
        raise ValueError(f"unknown forward variant {name!r}; expected one of {', '.join(VARIANTS)}")
    _variant = name


def variant() -> str:
    return _variant


def summary_dtype(dtype, has_state: bool, lean: bool = True):
    """How pass 1 stores S: bf16 for 16-bit inputs without a state (fp32 accumulate, one rounding on
    store), else fp32, since the state's ring, far sum and partial take their values from S (a bf16
    ring rounds them itself, ``ROUND``). bf16 also for fp16 inputs, since S has no fp16 range bound
    (sums of C products); measured against the oracle (interpreter, K = 16..64): bf16 inputs 3.4e-3
    either way, fp16 inputs 5e-4 instead of 2e-4 (tolerances 1e-2 and 2e-3)."""
    if lean and not has_state and dtype in (torch.bfloat16, torch.float16):
        return torch.bfloat16
    return torch.float32


# (block, sequence, head) programs from which passes 1 and 3 walk all of V: 2 x 132 SMs. Under the
# interpreter always, so that the walk is what the tests exercise (they patch it to try the split).
_WIDE_PROGRAMS = 0 if INTERPRET else 264


def _columns_per_program(V, BV, programs, lean):
    """Value columns one program of passes 1 and 3 covers: all of V (walked BV at a time) once the
    (block, sequence, head) programs alone fill the GPU, else BV (more programs for short calls)."""
    if lean and programs >= _WIDE_PROGRAMS:
        return triton.cdiv(V, BV) * BV
    return BV


@triton.jit
def _sequence_kernel(pos_ptr, n_ptr, seq_ptr, B, T, C, HAS_POS: tl.constexpr, HAS_N: tl.constexpr, BB: tl.constexpr):
    b = tl.arange(0, BB)                                                                      # [BB]
    mb = b < B
    pos = tl.load(pos_ptr + b, mask=mb, other=0) if HAS_POS else tl.zeros((BB,), dtype=tl.int64)
    n = tl.load(n_ptr + b, mask=mb, other=0) if HAS_N else tl.full((BB,), T, dtype=tl.int64)
    tl.store(seq_ptr + b * 3, (pos % C).to(tl.int32), mask=mb)
    tl.store(seq_ptr + b * 3 + 1, (pos // C).to(tl.int32), mask=mb)
    tl.store(seq_ptr + b * 3 + 2, n.to(tl.int32), mask=mb)


def sequence_table(pos, lengths, B, T, C, device):
    """[B, 3] int32 (r, i0, n) of every sequence: its offset in its first block, its first block, its
    tokens this call; ``pos`` None: 0, ``lengths`` None: T. One launch, not the five of the torch ops
    (H100, 2026-11-23: a short prompt's forward spent ~8% of its kernel time building this table)."""
    seq = torch.empty(B, 3, dtype=torch.int32, device=device)
    # the kernel reads element b at offset b: a strided [B] view (a column of a table) must be made dense
    lengths = lengths.to(device).contiguous() if lengths is not None else None
    pos = pos.contiguous() if pos is not None else None
    _sequence_kernel[(1,)](pos if pos is not None else seq, lengths if lengths is not None else seq, seq, B, T, C,
                           HAS_POS=pos is not None, HAS_N=lengths is not None, BB=max(triton.next_power_of_2(B), 2))
    return seq


def chunk_prefill(q, k, v, raw_mixing, scale, C, far: bool, state=None, lengths=None):
    """The three passes above, then the state advance (``mhla_attention`` validated the inputs).
    ``raw_mixing``: the [L, L] parameter as it is (the kernels clamp on load); ``far``: the
    policy keeps a far sum (window+far)."""
    if state is not None and not all(getattr(state, n).is_contiguous() for n in state.TENSORS):
        # the kernels index a state's rows densely: a strided one (``select`` with a step) runs on a dense
        # copy, written back after (it advanced the wrong rows and read the wrong prefixes before)
        dense = state._map(lambda t: t.contiguous())
        o = chunk_prefill(q, k, v, raw_mixing, scale, C, far, dense, lengths)
        state.copy_(dense)
        return o
    mc = raw_mixing
    B, T, H, K = q.shape
    V = v.shape[-1]
    L, dev = mc.shape[0], q.device
    W = max(L - 1, 1)
    lean = _variant == "lean"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    seq = sequence_table(state.pos if state is not None else None, lengths, B, T, C, dev)  # [B, 3]: r, i0, n
    # blocks touched (upper bound); with a state, one more for the prefix of the block after the call
    NB = triton.cdiv(T + (C if state is not None else 0), C)
    size = triton.next_power_of_2(NB)  # tuning bucket
    has_state = state is not None
    S = torch.empty(B, H, NB, K, V, device=dev, dtype=summary_dtype(q.dtype, has_state, lean))
    p_dtype = prefix_dtype(q.dtype)
    # one block: no P is read (pass 3 at m = 0 only); S viewed in P's dtype gives the kernels' pointer type
    P = torch.empty(B, H, NB, K, V, device=dev, dtype=p_dtype) if NB > 1 else S.view(p_dtype)
    # the state's next prefix in fp32, when P is rounded (16-bit inputs with a state)
    next_prefix = torch.empty(B, H, K, V, device=dev, dtype=torch.float32) if has_state and p_dtype != S.dtype else S
    o = torch.empty(B, T, H, V, device=dev, dtype=q.dtype)
    if lengths is not None:
        o.zero_()                                                                  # padded rows stay 0
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    f32_dot = INTERPRET
    # BV: the value columns of one dot; the interpreter's lean walk takes 16 so that small test shapes
    # (V = 32) walk more than one step
    BT, BK, BV = pow2(C), pow2(K), (16 if lean and INTERPRET else min(pow2(V), 64))
    vprog = _columns_per_program(V, BV, NB * B * H, lean)
    ring = state.ring if has_state else S
    far_sum = state.far if (has_state and far) else S
    r_old = state.partial if has_state else S
    p_old = state.prefix if has_state else S

    _summary_kernel[(NB, B * H, triton.cdiv(V, vprog))](
        k, v, S, r_old, seq, NB, size, C, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H=H, K=K, V=V, HAS_STATE=has_state, ROUND=has_state and state.state_dtype == torch.bfloat16,
        BT=BT, BK=BK, BV=BV, VPROG=vprog, PREC=prec, F32_DOT=f32_dot)
    if NB > 1:
        # far blocks exist only once some target is L blocks past the start: skip the scan otherwise
        # (with a state, no check; without one every sequence starts at 0: no device sync either)
        far = far and (has_state or NB > L)
        cum = torch.cumsum(S, 2, dtype=torch.float32) if far else S  # fp32 running sums of bf16 S too
        # the tile (BI, BCOL) is tuned among the layout's (_MIX_CONFIGS), or the short walk's; short calls
        # walk their sources 16 at a time (at most SHORT_SIZE of them)
        short = size <= SHORT_SIZE
        grid = lambda meta: (triton.cdiv(NB, meta["BI"]), B * H, triton.cdiv(K * V, meta["BCOL"]))  # noqa: E731
        _mix_kernel[grid](
            S, cum, P, next_prefix, ring, far_sum, mc, seq, L, C, NB, size, H=H, KV=K * V, W=W, HAS_STATE=has_state,
            FAR=far, TILES=_variant, LEAN=lean, SHORT=short,
            SPLIT16=lean and prec == "tf32" and S.dtype == torch.bfloat16, BJ=16 if short else 32, BW=pow2(W, 16),
            PREC=prec,
            F32_DOT=f32_dot)
        del cum
    _output_kernel[(NB, B * H, triton.cdiv(V, vprog))](
        q, k, v, o, P, p_old, r_old, mc, seq, L, C, NB, size, scale, q.stride(0), q.stride(1), q.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H=H, K=K, V=V, HAS_STATE=has_state, BT=BT, BK=BK, BV=BV, VPROG=vprog, PREC=prec, F32_DOT=f32_dot)
    if has_state:
        advance_state(state, S, P, next_prefix, seq, far)
    return o


@triton.jit
def _advance_kernel(s_ptr, p_ptr, pn_ptr, ring_ptr, far_ptr, r_ptr, p0_ptr, pos_ptr, seq_ptr, C, W, NB,
                    H: tl.constexpr, KV: tl.constexpr, FAR: tl.constexpr, BCOL: tl.constexpr):
    """After a prefill: push the blocks this call completed into the ring (under window+far, the
    blocks leaving the window go into the far sum first), keep the new prefix and partial, move
    the position. Each program owns some columns of one (sequence, head); no host round trip."""
    bh, pc = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    r0, i0, n = _seq_info(seq_ptr, b)
    if n > 0:
        cols = pc * BCOL + tl.arange(0, BCOL)
        mc = cols < KV
        nb, nc = (r0 + n + C - 1) // C, (r0 + n) // C       # blocks touched / completed by the call
        end = i0 + nc                                        # the current block afterwards
        sums = s_ptr + bh * NB * KV + cols                   # local block m at + m * KV
        if nc > 0:
            if FAR:  # blocks [max(i0 - W, 0), end - W) leave the window: old ring slots or new summaries
                far = tl.load(far_ptr + bh * KV + cols, mask=mc, other=0.0)                        # [BCOL]
                for j in range(tl.maximum(i0 - W, 0), end - W):
                    if j < i0:
                        far += tl.load(ring_ptr + (bh * W + j % W) * KV + cols, mask=mc, other=0.0).to(tl.float32)
                    else:
                        far += tl.load(sums + (j - i0) * KV, mask=mc, other=0.0)
                tl.store(far_ptr + bh * KV + cols, far, mask=mc)
            # the slots whose newest block is one this call completed: blocks [max(i0, end - W), end), not a
            # check of all W slots (a short prompt completes 2 of 31)
            for j in range(tl.maximum(i0, end - W), end):
                summary = tl.load(sums + (j - i0) * KV, mask=mc)  # rounded already (ROUND): exact in the ring
                tl.store(ring_ptr + (bh * W + j % W) * KV + cols, summary.to(ring_ptr.dtype.element_ty), mask=mc)
            if p_ptr.dtype.element_ty == tl.float32:
                prefix = tl.load(p_ptr + (bh * NB + nc) * KV + cols, mask=mc)
            else:  # P was stored rounded: the mix kernel kept block nc's fp32 prefix apart
                prefix = tl.load(pn_ptr + bh * KV + cols, mask=mc)
            tl.store(p0_ptr + bh * KV + cols, prefix, mask=mc)
        partial = tl.load(sums + nc * KV, mask=mc, other=0.0)    # block nc: open, or not touched
        tl.store(r_ptr + bh * KV + cols, tl.where(nc < nb, partial, 0.0), mask=mc)
        if (h == 0) & (pc == 0):
            tl.store(pos_ptr + b, tl.load(pos_ptr + b) + n)


def advance_state(state, S, P, next_prefix, seq, far):
    """``P`` in fp32: the new prefix is read from it; rounded: from ``next_prefix`` [B, H, K, V] fp32."""
    B, H, W, K, V = state.ring.shape
    BCOL = 512
    _advance_kernel[(B * H, triton.cdiv(K * V, BCOL))](
        S, P, next_prefix, state.ring, state.far, state.partial, state.prefix, state.pos, seq, state.block_size, W,
        S.shape[2], H=H, KV=K * V, FAR=far, BCOL=BCOL)
