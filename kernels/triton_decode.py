"""Decode: one token per sequence, each sequence at its own position, in one launch per layer.

For a token at slot c = pos % C of block i of its sequence, per head:

    q, k <- relu + RoPE of the raw projections          (FEATURES; else q, k are used as given)
    A = open block = R (if it holds tokens) + sum_{buffered s} k_s v_s^T + k v^T
    o = s * q (P + M_ext[i, i] A)
    if block i just filled (c = C - 1):
        far += evicted slot (window+far), ring[i % W] = A,
        P = sum_w M_ext[i+1, j_w] ring[w] + far_coef * far,  R = 0

The open block has two forms (``state.py``). R form (TOKENS off, small batches, latency bound):
R = A is stored every token, after folding in any tokens a token-form step left in the buffers.
Token form (TOKENS, large batches, bound by state traffic): the token's k and v go to the
buffers at slot c and R is not written; q . A is formed as q R + sum_s (q . k_s) v_s + (q . k) v,
reading P and only the slots filled so far, about half the bytes of reading P and R and writing
R (H100, batch 128, per layer: 47.6 against 73.3 us, ``.ci/gpu_tokens_probe.py``); A itself
is summed only when the block closes.

A bf16 ring (``state_dtype``) is widened to fp32 on load; S_i is rounded when it is stored, and
the mixing reads that rounded value, as every other form does.

Two kinds of work share one launch. A token program (sequence, head, BV value columns) computes o
for a sequence whose block stays open and updates its open block. A block close reads the whole ring
(4 MB a head at the 340M shape) and is split into close items (a closing sequence, head, RC rows,
BVC columns: ``_close_item``; each row of P, the ring and far depends on that row alone), which
every program of the launch takes in turn once its token work is done (items pid, pid + grid, ...),
so one closing sequence no longer holds up a layer while the rest of the grid idles (H100, 340M
shape, batch 32 with one sequence closing: 25 against 65 us a layer; every sequence closing: 251
against 276; ``.ci/gpu_close_probe.py``, session 17). o of a closing head needs every row: each item
writes its rows' share to a workspace and takes a ticket, and the item that draws the last one sums
the shares in row order (deterministic) and resets the counter. Small batches get extra programs
(two an SM in all) that only take close items.

Everything else a program writes is its own: columns of R and of the value buffer, the key buffer's
slot c (program 0 of a head; no program of the launch reads slot c), an item's rows and columns of
P, R, ring and far (the token programs of a closing sequence read none of them), and the next
column of ``partial_end`` (program 0 of a sequence; the launch reads the other column), so the
block-boundary mixing needs no second launch. The kernel leaves ``pos`` alone: ``decode_step``
adds 1 after it, and the model's fused decode advances all layers' positions in one launch per
step. No host synchronisation anywhere, so a step can be captured in a CUDA graph.

The key dimension is handled as two halves (rows [0, K2) and [K2, K)) because rotate-half RoPE
pairs row j with row j + K/2.
"""
import functools

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, PDL, PDL_EARLY, far_coef, pow2, ring_block, round_bf16, round_to, window_coef


@triton.jit
def _features(x1, x2, c, s, FEATURES: tl.constexpr, DT: tl.constexpr):
    """relu, then rotate-half RoPE on the two halves; rounded to the activation dtype like the
    unfused model (which stores q and k in that dtype before the operator)."""
    if FEATURES:
        x1, x2 = tl.maximum(x1, 0.0), tl.maximum(x2, 0.0)
        x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
        x1, x2 = x1.to(DT).to(tl.float32), x2.to(DT).to(tl.float32)
    return x1, x2


@triton.jit
def _feature_rows(x_ptr, rows, K, K2, cos_ptr, sin_ptr, FEATURES: tl.constexpr, DT: tl.constexpr):
    """``_features`` of the rows ``rows`` of a raw [K] vector, any rows (a close program's chunk):
    each row's RoPE partner (row +- K2) is loaded alongside it."""
    m = rows < K
    x = tl.load(x_ptr + rows, mask=m, other=0.0).to(tl.float32)
    if FEATURES:
        first = rows < K2
        y = tl.load(x_ptr + tl.where(first, rows + K2, rows - K2), mask=m, other=0.0).to(tl.float32)
        pair = tl.where(first, rows, rows - K2)
        c = tl.load(cos_ptr + pair, mask=m, other=1.0)
        s = tl.load(sin_ptr + pair, mask=m, other=0.0)
        x, y = tl.maximum(x, 0.0), tl.maximum(y, 0.0)
        x = tl.where(first, x * c - y * s, x * c + y * s).to(DT).to(tl.float32)
    return x


@triton.jit
def _emit(o, col0, b, h, scale, o_ptr, so_b, so_h, g_ptr, sg_b, sg_h, st_ptr, B, GATED: tl.constexpr,
          V: tl.constexpr, BV: tl.constexpr):
    """Writes the fp32 sum o [BV] (columns col0 + [0, BV) of head h) as the kernel's output: scaled,
    rounded, and with GATED o * silu(g) and o's square sums in 16-column slots (``norm_stats``: the
    gated output norm's share; its 1/rms and weight are applied by the output projection)."""
    ov = col0 + tl.arange(0, BV)
    mv = ov < V
    OT: tl.constexpr = o_ptr.dtype.element_ty
    ob = round_to(o * scale, OT)  # (round_to: the interpreter's plain cast to bf16 truncates)       # [BV]
    if GATED:
        of = tl.where(mv, ob.to(tl.float32), 0.0)
        sums = tl.sum(tl.reshape(of * of, [BV // 16, 16]), axis=1)
        col = col0 + tl.arange(0, BV // 16) * 16
        tl.store(st_ptr + ((h * V + col) // 16) * B + b, sums, mask=col < V)
        g = tl.load(g_ptr + b * sg_b + h * sg_h + ov, mask=mv, other=0.0).to(tl.float32)
        ob = round_to(of * (g * tl.sigmoid(g)), OT)
    tl.store(o_ptr + b * so_b + h * so_h + ov, ob, mask=mv)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr, ring_ptr, far_ptr, pos_ptr,
                   m_ptr, cos_ptr, sin_ptr, g_ptr, st_ptr, ws_ptr, cnt_ptr, L, C, W, scale, sq_b, sq_h, sv_b, sv_h,
                   so_b, so_h, sc_b, sg_b, sg_h, B, GATED: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, FEATURES: tl.constexpr, FAR: tl.constexpr, ROUND: tl.constexpr,
                   PDL: tl.constexpr, EARLY: tl.constexpr, STATE_EARLY: tl.constexpr, TOKENS: tl.constexpr,
                   BK2: tl.constexpr, BV: tl.constexpr, SC: tl.constexpr, RC: tl.constexpr, BVC: tl.constexpr,
                   BVF: tl.constexpr, WG: tl.constexpr, BB: tl.constexpr):
    if EARLY:  # the next kernel may start now and load its weights while this one runs
        tl.extra.cuda.gdc_launch_dependents()
    NS: tl.constexpr = (K + RC - 1) // RC        # close items a head: NS row blocks of RC, NVC column blocks
    NVC: tl.constexpr = (V + BVC - 1) // BVC
    if PDL and not STATE_EARLY:
        tl.extra.cuda.gdc_wait()  # everything read here comes from earlier kernels
    pid = tl.program_id(0)
    DT: tl.constexpr = q_ptr.dtype.element_ty
    bi = tl.arange(0, BB)
    pv = tl.load(pos_ptr + bi, mask=bi < B, other=0)  # (issued first: the close check needs it last)  # [BB]
    if pid < B * H * ((V + BV - 1) // BV):  # (the programs past these are close workers only)
        _token(pid, q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr, pos_ptr, m_ptr, cos_ptr,
               sin_ptr, g_ptr, st_ptr, L, C, scale, sq_b, sq_h, sv_b, sv_h, so_b, so_h, sc_b, sg_b, sg_h, B, GATED,
               H, K, V, FEATURES, PDL, EARLY, STATE_EARLY, TOKENS, DT, BK2, BV, SC)
    # then every program is a close worker: no program waits for work, and a step with no close pays
    # only for one load of the positions
    _close(pid, tl.num_programs(0), bi, pv, q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr,
           ring_ptr, far_ptr, pos_ptr, m_ptr, cos_ptr, sin_ptr, g_ptr, st_ptr, ws_ptr, cnt_ptr, L, C, W, scale,
           sq_b, sq_h, sv_b, sv_h, so_b, so_h, sc_b, sg_b, sg_h, B, GATED, H, K, V, FEATURES, FAR, ROUND, PDL,
           STATE_EARLY, TOKENS, DT, NS, NVC, RC, BVC, BVF, WG, BB)


@triton.jit
def _token(pid, q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr, pos_ptr, m_ptr, cos_ptr, sin_ptr,
           g_ptr, st_ptr, L, C, scale, sq_b, sq_h, sv_b, sv_h, so_b, so_h, sc_b, sg_b, sg_h, B,
           GATED: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, FEATURES: tl.constexpr,
           PDL: tl.constexpr, EARLY: tl.constexpr, STATE_EARLY: tl.constexpr, TOKENS: tl.constexpr,
           DT: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr, SC: tl.constexpr):
    """A token program: one (sequence, head, BV value columns) of a sequence whose block stays open
    (a closing sequence's output comes from the close items; here only its bookkeeping)."""
    NV: tl.constexpr = (V + BV - 1) // BV
    bh, cb = pid // NV, pid % NV
    b, h = bh // H, bh % H
    pos = tl.load(pos_ptr + b)
    i = pos // C
    c = pos - i * C                                   # this token's slot in block i
    end = tl.load(pe_ptr + b * 2 + pos % 2)           # R holds block i up to here
    first = (h == 0) & (cb == 0)
    if c == C - 1:  # closing: the close items write o and the state; here the bookkeeping only
        if first:
            if PDL and STATE_EARLY:  # a write: after the previous kernels, like every other one
                tl.extra.cuda.gdc_wait()
            if TOKENS:
                tl.store(pe_ptr + b * 2 + (pos + 1) % 2, end)
            else:
                tl.store(pe_ptr + b * 2 + (pos + 1) % 2, pos + 1)
    else:
        K2: tl.constexpr = (K + 1) // 2
        j = tl.arange(0, BK2)
        m1, m2 = j < K2, j < K - K2                       # rows j and K2 + j of the two halves
        ov = cb * BV + tl.arange(0, BV)
        mv = ov < V
        t1 = j[:, None] * V + ov[None, :]                                                       # [BK2, BV]
        t2 = (K2 + j[:, None]) * V + ov[None, :]
        mt1, mt2 = m1[:, None] & mv[None, :], m2[:, None] & mv[None, :]
        head = bh * K * V
        kbh, vbh = kb_ptr + bh * C * K, vb_ptr + bh * C * V
        lo = tl.minimum(tl.maximum(end - i * C, 0), C)    # buffered slots: [lo, c)
        p1 = tl.load(p_ptr + head + t1, mask=mt1, other=0.0)                                # [BK2, BV]
        p2 = tl.load(p_ptr + head + t2, mask=mt2, other=0.0)
        if not TOKENS:  # R, read only while it holds tokens of block i
            live = tl.where(lo > 0, K, 0)
            r1 = tl.load(r_ptr + head + t1, mask=mt1 & (j < live)[:, None], other=0.0)
            r2 = tl.load(r_ptr + head + t2, mask=mt2 & (K2 + j < live)[:, None], other=0.0)
            # the R form folds in any tokens a token-form step left in the buffers (a stream whose batch
            # shrank; otherwise lo == c: no iteration), one slot at a time
            for s in range(lo, c):
                ks1 = tl.load(kbh + s * K + j, mask=m1, other=0.0)                                   # [BK2]
                ks2 = tl.load(kbh + s * K + K2 + j, mask=m2, other=0.0)
                vs = tl.load(vbh + s * V + ov, mask=mv, other=0.0)                                   # [BV]
                r1 += ks1[:, None] * vs[None, :]
                r2 += ks2[:, None] * vs[None, :]
        diag = window_coef(m_ptr, L, i, i)
        if PDL and STATE_EARLY:  # the state and the mixing coefficient are in flight: now q, k, v
            tl.extra.cuda.gdc_wait()
        qh, kh = q_ptr + b * sq_b + h * sq_h, k_ptr + b * sq_b + h * sq_h
        cs = tl.load(cos_ptr + b * sc_b + j, mask=m1, other=1.0)                     # [BK2]
        sn = tl.load(sin_ptr + b * sc_b + j, mask=m1, other=0.0)                     # [BK2]
        q1, q2 = _features(tl.load(qh + j, mask=m1, other=0.0).to(tl.float32),
                           tl.load(qh + K2 + j, mask=m2, other=0.0).to(tl.float32), cs, sn, FEATURES, DT)
        k1, k2 = _features(tl.load(kh + j, mask=m1, other=0.0).to(tl.float32),
                           tl.load(kh + K2 + j, mask=m2, other=0.0).to(tl.float32), cs, sn, FEATURES, DT)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + ov, mask=mv, other=0.0).to(tl.float32)        # [BV]
        # q . (P + diag A), A = R + the buffered tokens + k v^T
        if TOKENS:  # P, then R only if it holds tokens (a stream from the R form), and (q . k) v without
            # forming k v^T: fewer live registers (104 against 255 with spills before, sm_90)
            o = tl.sum(q1[:, None] * p1, axis=0) + tl.sum(q2[:, None] * p2, axis=0)                  # [BV]
            if lo > 0:
                r1 = tl.load(r_ptr + head + t1, mask=mt1, other=0.0)
                r2 = tl.load(r_ptr + head + t2, mask=mt2, other=0.0)
                o += diag * (tl.sum(q1[:, None] * r1, axis=0) + tl.sum(q2[:, None] * r2, axis=0))
            o += diag * (tl.sum(q1 * k1, axis=0) + tl.sum(q2 * k2, axis=0)) * v
        else:  # R = A is stored anyway: one reduction over its rows (latency bound: no extra one for q . k)
            r1 += k1[:, None] * v[None, :]
            r2 += k2[:, None] * v[None, :]
            o = tl.sum(q1[:, None] * (p1 + diag * r1), axis=0) + tl.sum(q2[:, None] * (p2 + diag * r2), axis=0)
        if TOKENS:  # + the buffered slots, a chunk of SC at a time: (q . k_s) v_s
            for s0 in range((lo // SC) * SC, c, SC):
                sl = s0 + tl.arange(0, SC)
                ok = (sl >= lo) & (sl < c)
                kb1 = tl.load(kbh + sl[:, None] * K + j[None, :], mask=ok[:, None] & m1[None, :],
                              other=0.0)                                                              # [SC, BK2]
                kb2 = tl.load(kbh + sl[:, None] * K + K2 + j[None, :], mask=ok[:, None] & m2[None, :], other=0.0)
                vc = tl.load(vbh + sl[:, None] * V + ov[None, :], mask=ok[:, None] & mv[None, :], other=0.0)  # [SC, BV]
                score = tl.sum(kb1 * q1[None, :], axis=1) + tl.sum(kb2 * q2[None, :], axis=1)               # [SC]
                o += diag * tl.sum(score[:, None] * vc, axis=0)
        _emit(o, cb * BV, b, h, scale, o_ptr, so_b, so_h, g_ptr, sg_b, sg_h, st_ptr, B, GATED, V, BV)
        if PDL and not EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        if TOKENS:  # the token joins the buffers; R is not written
            tl.store(vbh + c * V + ov, v, mask=mv)
            if cb == 0:
                tl.store(kbh + c * K + j, k1, mask=m1)
                tl.store(kbh + c * K + K2 + j, k2, mask=m2)
            if first:
                tl.store(pe_ptr + b * 2 + (pos + 1) % 2, end)
        else:  # R = A: R holds everything up to this token
            tl.store(r_ptr + head + t1, r1, mask=mt1)
            tl.store(r_ptr + head + t2, r2, mask=mt2)
            if first:
                tl.store(pe_ptr + b * 2 + (pos + 1) % 2, pos + 1)


@triton.jit
def _close(pid, NP, bi, pv, q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr, ring_ptr, far_ptr,
           pos_ptr, m_ptr, cos_ptr, sin_ptr, g_ptr, st_ptr, ws_ptr, cnt_ptr, L, C, W, scale, sq_b, sq_h, sv_b, sv_h,
           so_b, so_h, sc_b, sg_b, sg_h, B, GATED: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
           V: tl.constexpr, FEATURES: tl.constexpr, FAR: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr,
           STATE_EARLY: tl.constexpr, TOKENS: tl.constexpr, DT: tl.constexpr, NS: tl.constexpr,
           NVC: tl.constexpr, RC: tl.constexpr, BVC: tl.constexpr, BVF: tl.constexpr, WG: tl.constexpr,
           BB: tl.constexpr):
    """Program ``pid`` of NP as a close worker: the close items (a closing sequence, head, RC rows,
    BVC columns: ``_close_item``) of this launch, items pid, pid + NP, ... ``pv`` [BB]: every
    sequence's position (``bi`` < B). A step without a close costs nothing more here."""
    closing = ((pv % C) == C - 1) & (bi < B)
    nclose = tl.sum(closing.to(tl.int32), axis=0)
    if nclose > 0:
        if PDL and STATE_EARLY:
            tl.extra.cuda.gdc_wait()  # (q, k, v and the workspace: after the previous kernels)
        rank = tl.cumsum(closing.to(tl.int32), axis=0) - 1                                    # [BB]
        per_seq: tl.constexpr = H * NS * NVC
        for it in range(pid, nclose * per_seq, NP):
            nth, rest = it // per_seq, it % per_seq
            b = tl.sum(tl.where(closing & (rank == nth), bi, 0), axis=0)  # the nth closing sequence
            h, rest = rest // (NS * NVC), rest % (NS * NVC)
            _close_item(b, h, rest // NVC, rest % NVC, q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr,
                        pe_ptr, ring_ptr, far_ptr, pos_ptr, m_ptr, cos_ptr, sin_ptr, g_ptr, st_ptr, ws_ptr, cnt_ptr,
                        L, C, W, scale, sq_b, sq_h, sv_b, sv_h, so_b, so_h, sc_b, sg_b, sg_h, B, GATED, H, K, V,
                        FEATURES, FAR, ROUND, TOKENS, DT, NS, NVC, RC, BVC, BVF, WG)


@triton.jit
def _close_item(b, h, sp, cc, q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr, ring_ptr, far_ptr,
                pos_ptr, m_ptr, cos_ptr, sin_ptr, g_ptr, st_ptr, ws_ptr, cnt_ptr, L, C, W, scale, sq_b, sq_h, sv_b,
                sv_h, so_b, so_h, sc_b, sg_b, sg_h, B, GATED: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, FEATURES: tl.constexpr, FAR: tl.constexpr, ROUND: tl.constexpr,
                TOKENS: tl.constexpr, DT: tl.constexpr, NS: tl.constexpr, NVC: tl.constexpr, RC: tl.constexpr,
                BVC: tl.constexpr, BVF: tl.constexpr, WG: tl.constexpr):
    """A close item: rows [s RC, (s + 1) RC) and BVC value columns of one head of a sequence whose
    block i fills with this token (c = C - 1).

        A = R (if it holds tokens of block i) + sum_{buffered s} k_s v_s^T + k v^T   (= S_i)
        o's share: q[rows] . (P + M_ext[i, i] A)[rows]            -> workspace, summed by the last
        far += evicted slot (window+far), ring[i % W] = S_i
        P = sum_w M_ext[i+1, j_w] ring[w] + far_coef * far,  R = 0

    Each row's work is independent of the others', so a close spreads over NS * NVC items a head
    instead of running in one program per column block while the rest of the grid waits (a close
    reads the whole ring: 4 MB a head at the 340M shape). o needs all rows: each item writes its
    share, takes a ticket, and the item that draws the last one sums the shares in row order
    (deterministic), writes o and resets the counter."""
    bh = b * H + h
    pos = tl.load(pos_ptr + b)
    i = pos // C
    c = pos - i * C
    per_head: tl.constexpr = NS * NVC
    rows = sp * RC + tl.arange(0, RC)
    cols = cc * BVC + tl.arange(0, BVC)
    mr, mc = rows < K, cols < V
    t = rows[:, None] * V + cols[None, :]                                                   # [RC, BVC]
    mt = mr[:, None] & mc[None, :]
    head = bh * K * V
    kbh, vbh = kb_ptr + bh * C * K, vb_ptr + bh * C * V
    end = tl.load(pe_ptr + b * 2 + pos % 2)
    lo = tl.minimum(tl.maximum(end - i * C, 0), C)
    a = tl.load(r_ptr + head + t, mask=mt & (rows < tl.where(lo > 0, K, 0))[:, None], other=0.0)     # [RC, BVC]
    if TOKENS:  # the buffered tokens (the whole block), SG slots a product
        SG: tl.constexpr = 16
        for s0 in range((lo // SG) * SG, c, SG):
            sl = s0 + tl.arange(0, SG)
            ok = (sl >= lo) & (sl < c)
            kt = tl.load(kbh + rows[:, None] + sl[None, :] * K, mask=mr[:, None] & ok[None, :], other=0.0)  # [RC, SG]
            vs = tl.load(vbh + sl[:, None] * V + cols[None, :], mask=ok[:, None] & mc[None, :], other=0.0)  # [SG, BVC]
            a += tl.dot(kt, vs, input_precision="ieee")
    else:  # R holds the block, but for tokens a token-form launch left (rare): one slot at a time, so
        # that the R form's launches reserve no shared memory for a product
        for s in range(lo, c):
            ks = tl.load(kbh + s * K + rows, mask=mr, other=0.0)                                 # [RC]
            vs = tl.load(vbh + s * V + cols, mask=mc, other=0.0)                                 # [BVC]
            a += ks[:, None] * vs[None, :]
    q = _feature_rows(q_ptr + b * sq_b + h * sq_h, rows, K, (K + 1) // 2, cos_ptr + b * sc_b,
                      sin_ptr + b * sc_b, FEATURES, DT)                                       # [RC]
    k = _feature_rows(k_ptr + b * sq_b + h * sq_h, rows, K, (K + 1) // 2, cos_ptr + b * sc_b,
                      sin_ptr + b * sc_b, FEATURES, DT)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + cols, mask=mc, other=0.0).to(tl.float32)       # [BVC]
    a += k[:, None] * v[None, :]
    p = tl.load(p_ptr + head + t, mask=mt, other=0.0)
    share = tl.sum(q[:, None] * (p + window_coef(m_ptr, L, i, i) * a), axis=0)              # [BVC]
    slot, nxt = i % W, i + 1
    if ROUND:  # S_i as a bf16 ring stores it: the mixing below reads this value too
        a = round_bf16(a)
    ring = ring_ptr + bh * W * K * V
    if FAR:  # the slot's old block (i - W) leaves the window
        f = tl.load(far_ptr + head + t, mask=mt, other=0.0)
        f += tl.where(i >= W, 1.0, 0.0) * tl.load(ring + slot * K * V + t, mask=mt, other=0.0).to(tl.float32)
    acc = tl.zeros([RC, BVC], dtype=tl.float32)
    for w0 in range(0, W, WG):  # WG ring slots a load, each weighted by its block's coefficient
        w = w0 + tl.arange(0, WG)
        ok = (w < W) & (w != slot)
        tile = tl.load(ring + w[:, None, None] * K * V + t[None, :, :], mask=ok[:, None, None] & mt[None, :, :],
                       other=0.0).to(tl.float32)                                              # [WG, RC, BVC]
        coef = tl.where(ok, window_coef(m_ptr, L, nxt, ring_block(nxt - 1, w, W)), 0.0)       # [WG]
        acc += tl.sum(coef[:, None, None] * tile, axis=0)
    acc += window_coef(m_ptr, L, nxt, i) * a  # block i, now in slot i % W
    tl.store(ring + slot * K * V + t, a.to(ring_ptr.dtype.element_ty), mask=mt)
    if FAR:
        acc += far_coef(m_ptr, L, nxt) * f
        tl.store(far_ptr + head + t, f, mask=mt)
    tl.store(p_ptr + head + t, acc, mask=mt)
    tl.store(r_ptr + head + t, tl.zeros_like(acc), mask=mt)
    # o: this program's share of rows; the last of the head's programs sums them
    tl.store(ws_ptr + (bh * NS + sp) * V + cols, share, mask=mc)
    tl.debug_barrier()  # every thread's share is written before the ticket releases it
    ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
    if ticket == per_head - 1:
        ov = tl.arange(0, BVF)
        o = tl.zeros([BVF], dtype=tl.float32)
        for s2 in range(NS):  # row order, not arrival order: a deterministic sum
            o += tl.load(ws_ptr + (bh * NS + s2) * V + ov, mask=ov < V, other=0.0, cache_modifier=".cg")
        _emit(o, 0, b, h, scale, o_ptr, so_b, so_h, g_ptr, sg_b, sg_h, st_ptr, B, GATED, V, BVF)
        tl.atomic_xchg(cnt_ptr + bh, 0, sem="relaxed", scope="gpu")


# the token form of the open block from this batch on (H100, 340M shape, per layer, 32 tokens into a
# block: batch 8 7.5 against 7.3 us for the R form, batch 32 15.8 against 20.5, batch 128 47.6 against
# 73.3; batch 1 5.2 against 3.2: .ci/gpu_tokens_probe.py, session 14). From 16, not 32, since
# session 22 (the whole step, .ci/rows24_probe.py: fused batch 16 851 against 885 us, batch 24 1,048
# against 1,155, batched batch 24 1,133 against 1,305; batch 8 730 against 822 and batch 12 800
# against 837 with the token form from 8 or 12, so not there)
TOKENS_FROM = 16

_workspaces: dict = {}  # (device type, index) -> (fp32 shares of o, int32 counters)
_kept: list = []        # workspaces a CUDA-graph capture made: the graph keeps using them


def _close_workspace(device, shares: int, heads: int):
    """The close programs' workspace on ``device``: fp32 shares of o and one ticket counter a
    (sequence, head), zero between launches (the last program resets it). Shared by every decode
    launch on the device: launches on one stream are ordered, and a launch touches it only after
    waiting for the kernels before it. (Two decode launches running at once on two streams of one
    device would leave a counter off zero, and every later close of that head would leave o
    unwritten: the library decodes on one stream a device.) Grown on demand; inside a CUDA-graph capture a workspace
    too small is replaced by one made (and zeroed) in the capture, kept for the graph's lifetime."""
    key = (device.type, device.index)
    have = _workspaces.get(key)
    if have is not None and have[0].numel() >= shares and have[1].numel() >= heads:
        return have
    if have is not None:  # grow both: shapes whose ratio differs (two models) would replace it every call
        shares, heads = max(shares, have[0].numel()), max(heads, have[1].numel())
    made = (torch.empty(max(shares, 1), device=device, dtype=torch.float32),
            torch.zeros(max(heads, 1), device=device, dtype=torch.int32))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _kept.append(made)
        return made
    if have is not None:
        _kept.append(have)  # a captured graph may still point at it
    _workspaces[key] = made
    return made


def _close_shape(V: int, tokens: bool, block_v: int) -> tuple[int, int]:
    """Rows and columns of a close item: 16 x 32 in the token form and with 16-column token programs
    (64 columns would take the R form's launch from 128 to 154 registers: batch 1 1,727 against
    1,784 tokens/s), else 16 x 64 (H100, 340M shape, a close of every sequence: batch 32 251
    against 321 us a layer at 64 columns; batch 8 77 against 98 at 32, and 9,613 against 9,518
    tokens/s)."""
    return 16, min(pow2(V), 32 if tokens or block_v < 32 else 64)


@functools.lru_cache(maxsize=None)
def _min_programs(device) -> int:
    """Programs a launch has at least: two an SM, so that a close at small batches (64 token programs
    at batch 1) spreads over more programs than the token work needs (the extra ones read the
    positions and end when nothing closes). Not for the fused step's launches, which start early:
    their programs would sit resident, taking registers from the kernel still running. Under the
    interpreter: one extra, so tests see it."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def decode_into(o, q, k, v, raw_mixing, state, scale, rope=None, block_v=None, num_warps=None, state_early=False,
                tokens=None, gate=None, stats=None, close_shape=None, maxnreg=None):
    """Launch the decode kernel. q, k: [B, H, K] views (any batch/head strides, unit last stride);
    v: [B, H, V]; o: [B, H, V] output; ``raw_mixing``: the [L, L] parameter (clamped on load).
    ``rope`` = (cos, sin) [B, K/2] fp32 applies relu + RoPE to the raw q, k in the kernel (the
    model's fused and batched decode steps); None takes q, k as features already. ``block_v`` /
    ``num_warps``: the launch shape (default: by batch, below). ``state_early``: read the state (and
    the position) before waiting on the previous kernel. Only for a launch that no kernel still
    running can precede with a write to this state, its position or the mixing parameter: the
    model's fused step, where since the last ordinary kernel (which waits for everything before
    it: the embedding and the position update run as ordinary launches every step; the compiled
    norms no longer count, as they launch with programmatic dependent launch) only other layers'
    kernels ran. ``tokens``: the open block's form (module docstring; None:
    the token form from ``TOKENS_FROM`` sequences on); either form continues a state left by the other.
    ``gate`` [B, H, V] with ``stats`` (``norm_stats(B, H * V)``): o is written as o * silu(gate),
    with the square sums of o itself in ``stats`` (the fused step's gated output norm).
    ``close_shape`` = (rows, columns) of a close item (default: below); ``maxnreg``: a register cap."""
    if not all(getattr(state, n).is_contiguous() for n in state.TENSORS):
        # the kernel indexes a state's rows densely: a strided one (``select`` with a step) runs on a
        # dense copy, written back after (it updated the wrong rows before, as the prefill did)
        dense = state._map(lambda t: t.contiguous())
        # (not early: the copy just made is the previous kernel's output)
        decode_into(o, q, k, v, raw_mixing, dense, scale, rope, block_v, num_warps, tokens=tokens, gate=gate,
                    stats=stats, close_shape=close_shape, maxnreg=maxnreg)
        state.copy_(dense)
        return o
    B, H, K = q.shape
    V = v.shape[-1]
    assert q.stride() == k.stride() and q.stride(-1) == v.stride(-1) == o.stride(-1) == 1
    # without FEATURES the cos/sin loads are ignored: any fp32 buffer of K/2+ elements will do
    cos, sin = rope if rope is not None else (state.partial, state.partial)
    # batch 1 is latency bound: many small programs. Larger batches are bound by the state traffic:
    # wider column blocks move it faster (H100, 340M shape, per layer: batch 32 20.4 us at BV 32
    # against 25.2 at 16; batch 128 72.6 us at 64 against 124.8, 2.77 TB/s; .ci/gpu_decode_probe.py)
    tokens = B >= TOKENS_FROM if tokens is None else tokens
    BV = block_v or min(pow2(V), 64 if tokens else 16 if B < 8 else 32 if B < 64 else 64)
    assert BV & (BV - 1) == 0, "block_v must be a power of two"
    gated = gate is not None
    assert gated == (stats is not None), "gate and stats go together"
    if gated:
        assert V % 16 == 0 and BV >= 16, "gate/stats: V and the column block must be multiples of 16"
        assert gate.shape == v.shape and gate.stride(-1) == 1 and gate.dtype == o.dtype, \
            "gate: like v, unit last stride"
        assert o.dtype != torch.float16, "gate/stats: not fp16 (o * silu(g) before the norm could overflow)"
        assert stats.shape == (H * V // 16, B) and stats.dtype == torch.float32 and stats.is_contiguous(), \
            "stats: norm_stats(batch, H * V)"
    # the fused step's gated launch in the token form (16-32 rows) at 2 warps (H100, 340M shape,
    # captured step, session 24: 16 rows 790 against 798-817 us, 24 937 against 960, 32 989 against
    # 999-1,005; session 22: 32 rows 1,060 against 1,077); in the R form (8 rows) 2 warps were slower,
    # above 32 rows (the fused step only where MHLA_STREAM_FUSED_BATCH allows it) not measured
    num_warps = num_warps or (2 if gated and tokens and B <= 32 else 4)
    RC, BVC = close_shape or _close_shape(V, tokens, BV)
    assert RC & (RC - 1) == 0 and BVC & (BVC - 1) == 0, "close_shape: powers of two"
    NS, NVC = triton.cdiv(K, RC), triton.cdiv(V, BVC)
    ws, counters = _close_workspace(q.device, B * H * NS * V, B * H)
    nt = B * H * triton.cdiv(V, BV)  # token programs
    _decode_kernel[(nt + 1 if INTERPRET else nt if state_early else max(nt, _min_programs(q.device)),)](
        q, k, v, o, state.partial, state.prefix, state.open_keys, state.open_values, state.partial_end, state.ring,
        state.far, state.pos, raw_mixing, cos, sin, gate if gated else o, stats if gated else cos, ws, counters,
        raw_mixing.shape[0], state.block_size, state.window, scale, q.stride(0), q.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), cos.stride(0) if rope is not None else 0,
        gate.stride(0) if gated else 0, gate.stride(1) if gated else 0, B,
        GATED=gated, H=H, K=K, V=V, FEATURES=rope is not None, FAR=state.far.numel() > 0,
        ROUND=state.ring.dtype == torch.bfloat16, PDL=PDL, EARLY=PDL_EARLY, STATE_EARLY=state_early,
        TOKENS=tokens, BK2=pow2((K + 1) // 2), BV=BV, SC=16, RC=RC, BVC=BVC, BVF=pow2(V),
        WG=max(1, 2048 // (RC * BVC)), BB=pow2(B, 2),
        num_warps=num_warps, launch_pdl=PDL, **({"maxnreg": maxnreg} if maxnreg else {}))
    return o


def decode_step(q, k, v, raw_mixing, state, scale):
    """q, k [B, 1, H, K], v [B, 1, H, V] -> o [B, 1, H, V]; advances ``state`` by one token.
    ``raw_mixing``: the [L, L] parameter as it is (the kernel clamps on load)."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    o = torch.empty_like(v, memory_format=torch.contiguous_format)
    decode_into(o[:, 0], q[:, 0], k[:, 0], v[:, 0], raw_mixing, state, scale)
    state.pos += 1
    return o
