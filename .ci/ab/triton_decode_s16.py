"""Decode: one token per sequence, each sequence at its own position, in one launch per layer.

Per (sequence, head, column block of V) program, for a token at slot c = pos % C of block i:

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

Everything a program writes is its own columns of R, P, ring, far and the value buffer, the key
buffer's slot c (program 0 of a head; no program of the launch reads slot c) and the next
column of ``partial_end`` (program 0 of a sequence; the launch reads the other column), so the
block-boundary mixing needs no second launch. The kernel leaves ``pos`` alone: ``decode_step``
adds 1 after it, and the model's fused decode advances all layers' positions in one launch per
step. No host synchronisation anywhere, so a step can be captured in a CUDA graph.

The key dimension is handled as two halves (rows [0, K2) and [K2, K)) because rotate-half RoPE
pairs row j with row j + K/2.
"""
import torch
import triton
import triton.language as tl

from mhla_stream.kernels.triton_common import PDL, PDL_EARLY, far_coef, pow2, ring_block, round_bf16, round_to, window_coef


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
def _decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr, ring_ptr, far_ptr, pos_ptr,
                   m_ptr, cos_ptr, sin_ptr, g_ptr, st_ptr, L, C, W, scale, sq_b, sq_h, sv_b, sv_h, so_b, so_h, sc_b,
                   sg_b, sg_h, B, GATED: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   FEATURES: tl.constexpr, FAR: tl.constexpr,
                   ROUND: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, STATE_EARLY: tl.constexpr,
                   TOKENS: tl.constexpr, BK2: tl.constexpr, BV: tl.constexpr, SC: tl.constexpr):
    if EARLY:  # the next kernel may start now and load its weights while this one runs
        tl.extra.cuda.gdc_launch_dependents()
    if PDL and not STATE_EARLY:
        tl.extra.cuda.gdc_wait()  # everything read here comes from earlier kernels
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    K2: tl.constexpr = (K + 1) // 2
    j = tl.arange(0, BK2)
    m1, m2 = j < K2, j < K - K2                       # rows j and K2 + j of the two halves
    ov = tl.program_id(1) * BV + tl.arange(0, BV)
    mv = ov < V
    DT: tl.constexpr = q_ptr.dtype.element_ty
    t1 = j[:, None] * V + ov[None, :]                                                       # [BK2, BV]
    t2 = (K2 + j[:, None]) * V + ov[None, :]
    mt1, mt2 = m1[:, None] & mv[None, :], m2[:, None] & mv[None, :]
    head = bh * K * V
    kbh, vbh = kb_ptr + bh * C * K, vb_ptr + bh * C * V
    pos = tl.load(pos_ptr + b)
    i = pos // C
    c = pos - i * C                                   # this token's slot in block i
    end = tl.load(pe_ptr + b * 2 + pos % 2)           # R holds block i up to here
    lo = tl.minimum(tl.maximum(end - i * C, 0), C)    # buffered slots: [lo, c)
    rows = tl.where(lo > 0, K, 0)                     # R is read only while it holds tokens of block i
    mr1, mr2 = (j < rows)[:, None] & mt1, (K2 + j < rows)[:, None] & mt2
    r1 = tl.load(r_ptr + head + t1, mask=mr1, other=0.0)                                    # [BK2, BV]
    r2 = tl.load(r_ptr + head + t2, mask=mr2, other=0.0)
    p1 = tl.load(p_ptr + head + t1, mask=mt1, other=0.0)
    p2 = tl.load(p_ptr + head + t2, mask=mt2, other=0.0)
    closing = c == C - 1
    if (not TOKENS) or closing:
        # A needs the buffered tokens themselves: the token form once a block, the R form after
        # token-form steps (a stream whose batch shrank; otherwise lo == c: no iteration). One slot
        # at a time: a tensor-core product here measured slower (its shared memory, reserved for
        # every launch, lowers occupancy: batch 128 43,540 against 47,500 tokens/s, session 14)
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
    r1 += k1[:, None] * v[None, :]
    r2 += k2[:, None] * v[None, :]
    o = tl.sum(q1[:, None] * (p1 + diag * r1), axis=0) + tl.sum(q2[:, None] * (p2 + diag * r2), axis=0)  # [BV]
    if TOKENS and not closing:  # + the buffered slots, a chunk of SC at a time: (q . k_s) v_s
        for s0 in range((lo // SC) * SC, c, SC):
            sl = s0 + tl.arange(0, SC)
            ok = (sl >= lo) & (sl < c)
            kb1 = tl.load(kbh + sl[:, None] * K + j[None, :], mask=ok[:, None] & m1[None, :], other=0.0)  # [SC, BK2]
            kb2 = tl.load(kbh + sl[:, None] * K + K2 + j[None, :], mask=ok[:, None] & m2[None, :], other=0.0)
            vc = tl.load(vbh + sl[:, None] * V + ov[None, :], mask=ok[:, None] & mv[None, :], other=0.0)  # [SC, BV]
            score = tl.sum(kb1 * q1[None, :], axis=1) + tl.sum(kb2 * q2[None, :], axis=1)               # [SC]
            o += diag * tl.sum(score[:, None] * vc, axis=0)
    OT: tl.constexpr = o_ptr.dtype.element_ty
    ob = round_to(o * scale, OT)  # (round_to: the interpreter's plain cast to bf16 truncates)       # [BV]
    if GATED:  # the gated output norm's share here: o * silu(g), and o's square sums (its 1/rms and
        # weight are applied by the output projection, ``skinny_linear``'s stats_in)
        of = tl.where(mv, ob.to(tl.float32), 0.0)
        sums = tl.sum(tl.reshape(of * of, [BV // 16, 16]), axis=1)  # ``norm_stats`` slots: 16 columns each
        col = tl.program_id(1) * BV + tl.arange(0, BV // 16) * 16
        tl.store(st_ptr + ((h * V + col) // 16) * B + b, sums, mask=col < V)
        g = tl.load(g_ptr + b * sg_b + h * sg_h + ov, mask=mv, other=0.0).to(tl.float32)
        ob = round_to(of * (g * tl.sigmoid(g)), OT)
    tl.store(o_ptr + b * so_b + h * so_h + ov, ob, mask=mv)
    if PDL and not EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    first = (h == 0) & (tl.program_id(1) == 0)
    if TOKENS:
        tl.store(vbh + c * V + ov, v, mask=mv)          # the token joins the buffers; R is not written
        if tl.program_id(1) == 0:
            tl.store(kbh + c * K + j, k1, mask=m1)
            tl.store(kbh + c * K + K2 + j, k2, mask=m2)
        if first:
            tl.store(pe_ptr + b * 2 + (pos + 1) % 2, end)
    elif first:
        tl.store(pe_ptr + b * 2 + (pos + 1) % 2, pos + 1)  # R holds everything up to this token

    if closing:  # block i is full (r1, r2 hold A = S_i): store it in the ring and mix the prefix of block i + 1
        slot, nxt = i % W, i + 1
        if FAR:
            f1 = tl.load(far_ptr + head + t1, mask=mt1, other=0.0)
            f2 = tl.load(far_ptr + head + t2, mask=mt2, other=0.0)
        acc1 = tl.zeros([BK2, BV], dtype=tl.float32)
        acc2 = tl.zeros([BK2, BV], dtype=tl.float32)
        for w in range(0, W):
            ring = ring_ptr + (bh * W + w) * K * V
            cur1 = tl.load(ring + t1, mask=mt1, other=0.0).to(tl.float32)                   # [BK2, BV]
            cur2 = tl.load(ring + t2, mask=mt2, other=0.0).to(tl.float32)
            if w == slot:
                if FAR:  # the slot's old block (i - W) leaves the window
                    keep = tl.where(i >= W, 1.0, 0.0)
                    f1 += keep * cur1
                    f2 += keep * cur2
                s1, s2 = r1, r2
                if ROUND:  # S_i as a bf16 ring stores it: the mixing below reads this value too
                    s1, s2 = round_bf16(r1), round_bf16(r2)
                tl.store(ring + t1, s1.to(ring_ptr.dtype.element_ty), mask=mt1)
                tl.store(ring + t2, s2.to(ring_ptr.dtype.element_ty), mask=mt2)
                cur1, cur2 = s1, s2
            jw = ring_block(nxt - 1, w, W)                             # block now in slot w
            coef = window_coef(m_ptr, L, nxt, jw)
            acc1 += coef * cur1
            acc2 += coef * cur2
        if FAR:
            fc = far_coef(m_ptr, L, nxt)
            acc1 += fc * f1
            acc2 += fc * f2
            tl.store(far_ptr + head + t1, f1, mask=mt1)
            tl.store(far_ptr + head + t2, f2, mask=mt2)
        tl.store(p_ptr + head + t1, acc1, mask=mt1)
        tl.store(p_ptr + head + t2, acc2, mask=mt2)
        r1, r2 = tl.zeros_like(r1), tl.zeros_like(r2)
    if TOKENS:  # R's tokens went into S_i at the close; otherwise R is left as it is
        zrows = tl.where(closing, rows, 0)
        tl.store(r_ptr + head + t1, r1, mask=(j < zrows)[:, None] & mt1)
        tl.store(r_ptr + head + t2, r2, mask=(K2 + j < zrows)[:, None] & mt2)
    else:
        tl.store(r_ptr + head + t1, r1, mask=mt1)
        tl.store(r_ptr + head + t2, r2, mask=mt2)


# the token form of the open block from this batch on (H100, 340M shape, per layer, 32 tokens into a
# block: batch 8 7.5 against 7.3 us for the R form, batch 32 15.8 against 20.5, batch 128 47.6 against
# 73.3; batch 1 5.2 against 3.2: .ci/gpu_tokens_probe.py, session 14)
TOKENS_FROM = 32


def decode_into(o, q, k, v, raw_mixing, state, scale, rope=None, block_v=None, num_warps=4, state_early=False,
                tokens=None, gate=None, stats=None):
    """Launch the decode kernel. q, k: [B, H, K] views (any batch/head strides, unit last stride);
    v: [B, H, V]; o: [B, H, V] output; ``raw_mixing``: the [L, L] parameter (clamped on load).
    ``rope`` = (cos, sin) [B, K/2] fp32 applies relu + RoPE to the raw q, k in the kernel (the
    model's fused and batched decode steps); None takes q, k as features already. ``block_v`` /
    ``num_warps``: the launch shape (default: by batch, below). ``state_early``: read the state (and
    the position) before waiting on the previous kernel. Only for a launch that no kernel still
    running can precede with a write to this state, its position or the mixing parameter: the
    model's fused step, where since the last ordinary kernel (which waits for everything before
    it) only other layers' kernels ran. ``tokens``: the open block's form (module docstring; None:
    the token form from ``TOKENS_FROM`` sequences on); either form continues a state left by the other.
    ``gate`` [B, H, V] with ``stats`` (``norm_stats(B, H * V)``): o is written as o * silu(gate),
    with the square sums of o itself in ``stats`` (the fused step's gated output norm)."""
    if not all(getattr(state, n).is_contiguous() for n in state.TENSORS):
        # the kernel indexes a state's rows densely: a strided one (``select`` with a step) runs on a
        # dense copy, written back after (it updated the wrong rows before, as the prefill did)
        dense = state._map(lambda t: t.contiguous())
        # (not early: the copy just made is the previous kernel's output)
        decode_into(o, q, k, v, raw_mixing, dense, scale, rope, block_v, num_warps, tokens=tokens, gate=gate,
                    stats=stats)
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
    _decode_kernel[(B * H, triton.cdiv(V, BV))](
        q, k, v, o, state.partial, state.prefix, state.open_keys, state.open_values, state.partial_end, state.ring,
        state.far, state.pos, raw_mixing, cos, sin, gate if gated else o, stats if gated else cos,
        raw_mixing.shape[0], state.block_size, state.window, scale, q.stride(0), q.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), cos.stride(0) if rope is not None else 0,
        gate.stride(0) if gated else 0, gate.stride(1) if gated else 0, B,
        GATED=gated, H=H, K=K, V=V, FEATURES=rope is not None, FAR=state.far.numel() > 0,
        ROUND=state.ring.dtype == torch.bfloat16, PDL=PDL, EARLY=PDL_EARLY, STATE_EARLY=state_early,
        TOKENS=tokens, BK2=pow2((K + 1) // 2), BV=BV, SC=16,
        num_warps=num_warps, launch_pdl=PDL)
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
