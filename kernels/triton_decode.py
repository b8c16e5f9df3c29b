"""Decode: the per-token update and the block-boundary mixing, for a batch whose sequences
each sit at their own position. Launch order per step: ``decode`` -> ``close`` -> ``pos += 1``;
all on the device, no host synchronisation, so a step can be captured in a CUDA graph.

    R += k v^T ;  o = s * q (P + M_ext[i, i] R)                       (decode kernel)
    if block i just filled: far += evicted, ring[i % W] = R,
        P = sum_w M_ext[i+1, j_w] ring[w] + far_coef * far, R = 0   (close kernel)
"""
import torch
import triton
import triton.language as tl

from .triton_common import far_coef, pow2, window_coef


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, pos_ptr, m_ptr, L, C, scale,
                   sq_b, sq_h, sv_b, sv_h, so_b, so_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    ok_k = tl.arange(0, BK)
    ov = tl.program_id(1) * BV + tl.arange(0, BV)
    mk, mv = ok_k < K, ov < V
    q = tl.load(q_ptr + b * sq_b + h * sq_h + ok_k, mask=mk, other=0.0).to(tl.float32)       # [BK]
    k = tl.load(k_ptr + b * sq_b + h * sq_h + ok_k, mask=mk, other=0.0).to(tl.float32)       # [BK]
    v = tl.load(v_ptr + b * sv_b + h * sv_h + ov, mask=mv, other=0.0).to(tl.float32)         # [BV]
    tile = bh * K * V + ok_k[:, None] * V + ov[None, :]                                      # [BK, BV]
    mt = mk[:, None] & mv[None, :]
    r = tl.load(r_ptr + tile, mask=mt, other=0.0) + k[:, None] * v[None, :]                  # [BK, BV]
    p = tl.load(p_ptr + tile, mask=mt, other=0.0)                                            # [BK, BV]
    i = tl.load(pos_ptr + b) // C
    diag = window_coef(m_ptr, L, i, i)
    o = tl.sum(q[:, None] * (p + diag * r), axis=0) * scale                                 # [BV]
    tl.store(r_ptr + tile, r, mask=mt)
    tl.store(o_ptr + b * so_b + h * so_h + ov, o.to(o_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _close_kernel(r_ptr, p_ptr, ring_ptr, far_ptr, pos_ptr, m_ptr, L, C, W, H: tl.constexpr, KV: tl.constexpr,
                  FAR: tl.constexpr, BW: tl.constexpr, BCOL: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    after = tl.load(pos_ptr + b) + 1            # tokens seen once this step's token counts
    if after % C == 0:
        i = after // C - 1                      # the block that just filled
        nxt = i + 1
        cols = tl.program_id(1) * BCOL + tl.arange(0, BCOL)
        mc = cols < KV
        r = tl.load(r_ptr + bh * KV + cols, mask=mc, other=0.0)                                  # [BCOL]
        slot = i % W
        w = tl.arange(0, BW)
        ring_tile = ring_ptr + bh * W * KV + w[:, None] * KV + cols[None, :]                     # [BW, BCOL]
        mt = (w[:, None] < W) & mc[None, :]
        ring = tl.load(ring_tile, mask=mt, other=0.0)
        if FAR:
            evict = tl.sum(tl.where(w[:, None] == slot, ring, 0.0), axis=0)                     # [BCOL]
            far = tl.load(far_ptr + bh * KV + cols, mask=mc, other=0.0)
            far = tl.where(i - W >= 0, far + evict, far)
            tl.store(far_ptr + bh * KV + cols, far, mask=mc)
        ring = tl.where(w[:, None] == slot, r[None, :], ring)
        tl.store(ring_tile, ring, mask=mt & (w[:, None] == slot))
        j = (nxt - 1) - (((nxt - 1 - w) % W) + W) % W                                         # block in slot w
        coef = window_coef(m_ptr, L, nxt, j) * (w < W)                                         # [BW]
        p = tl.sum(coef[:, None] * ring, axis=0)
        if FAR:
            p += far_coef(m_ptr, L, nxt) * far
        tl.store(p_ptr + bh * KV + cols, p, mask=mc)
        tl.store(r_ptr + bh * KV + cols, tl.zeros_like(r), mask=mc)


def decode_step(q, k, v, mc, state, scale):
    """q, k [B, 1, H, K], v [B, 1, H, V] -> o [B, 1, H, V]; advances ``state`` by one token."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(v)
    BK, BV = pow2(K), min(pow2(V), 64)
    _decode_kernel[(B * H, triton.cdiv(V, BV))](
        q, k, v, o, state.partial, state.prefix, state.pos, mc, mc.shape[0], state.block_size, scale,
        q.stride(0), q.stride(2), v.stride(0), v.stride(2), o.stride(0), o.stride(2), H=H, K=K, V=V, BK=BK, BV=BV)
    close_if_full(mc, state)
    state.pos += 1
    return o


def close_if_full(mc, state):
    """Block-boundary mixing for the sequences whose current block fills with this step's token."""
    B, H, W, K, V = state.ring.shape
    BCOL = 128
    _close_kernel[(B * H, triton.cdiv(K * V, BCOL))](
        state.partial, state.prefix, state.ring, state.far, state.pos, mc, mc.shape[0], state.block_size, W,
        H=H, KV=K * V, FAR=state.far.numel() > 0, BW=pow2(W, 2), BCOL=BCOL)
