"""Public Triton entry: ``triton_mhla`` (decode for one token per sequence, chunked prefill
otherwise) and the host-side bookkeeping of the state after a prefill."""
import os

import torch
import triton
import triton.language as tl

from ..mixing import has_far
from .triton_chunk import _mix_kernel, _output_kernel, _seq_info, _summary_kernel
from .triton_common import pow2
from .triton_decode import decode_step


def triton_mhla(q, k, v, mc, *, scale, block_size, policy, state=None, lengths=None):
    """Same contract as ``mhla_attention`` (inputs validated there); ``mc`` is the prepared matrix."""
    if state is not None and q.shape[1] == 1 and lengths is None:
        return decode_step(q, k, v, mc, state, scale)
    return chunk_prefill(q, k, v, mc, scale, block_size, policy, state, lengths)


def chunk_prefill(q, k, v, mc, scale, C, policy, state, lengths):
    B, T, H, K = q.shape
    V = v.shape[-1]
    L, dev = mc.shape[0], q.device
    W = max(L - 1, 1)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    n = lengths.to(dev) if lengths is not None else torch.full((B,), T, device=dev, dtype=torch.long)
    pos = state.pos if state is not None else torch.zeros(B, dtype=torch.long, device=dev)
    seq = torch.stack([pos % C, pos // C, n], 1).to(torch.int32).contiguous()     # [B, 3]: r, i0, n
    # blocks touched (upper bound); with a state, one more for the prefix of the block after the call
    NB = triton.cdiv(T + (C if state is not None else 0), C)
    far = has_far(policy)
    size = triton.next_power_of_2(NB)  # tuning bucket
    S = torch.empty(B, H, NB, K, V, device=dev, dtype=torch.float32)
    P = torch.empty_like(S) if NB > 1 else S
    o = torch.empty(B, T, H, V, device=dev, dtype=q.dtype)
    if lengths is not None:
        o.zero_()                                                                  # padded rows stay 0
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    f32_dot = os.environ.get("TRITON_INTERPRET", "0") == "1"
    BT, BK, BV = pow2(C), pow2(K), min(pow2(V), 64)
    has_state = state is not None
    ring = state.ring if has_state else S
    far_sum = state.far if (has_state and far) else S
    r_old = state.partial if has_state else S
    p_old = state.prefix if has_state else S

    _summary_kernel[(NB, B * H, triton.cdiv(V, BV))](
        k, v, S, r_old, seq, NB, size, C, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H=H, K=K, V=V, HAS_STATE=has_state, BT=BT, BK=BK, BV=BV, PREC=prec, F32_DOT=f32_dot)
    if NB > 1:
        # far blocks exist only once some target is L blocks past the start: skip the scan otherwise
        # (with a state, no check: it would synchronise, and a captured prefill must not)
        far_reachable = far and (has_state or bool((pos // C + NB > L).any()))
        cum = torch.cumsum(S, 2) if far_reachable else S
        far = far and (far_reachable or has_state)
        BI, BJ, BCOL = 64, 32, 128
        _mix_kernel[(triton.cdiv(NB, BI), B * H, triton.cdiv(K * V, BCOL))](
            S, cum, P, ring, far_sum, mc, seq, L, C, W, NB, size, H=H, KV=K * V, HAS_STATE=has_state, FAR=far,
            BI=BI, BJ=BJ, BW=pow2(W, 16), BCOL=BCOL, PREC=prec)
        del cum
    _output_kernel[(NB, B * H, triton.cdiv(V, BV))](
        q, k, v, o, P, p_old, r_old, mc, seq, L, C, NB, size, scale, q.stride(0), q.stride(1), q.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H=H, K=K, V=V, HAS_STATE=has_state, BT=BT, BK=BK, BV=BV, PREC=prec, F32_DOT=f32_dot)
    if has_state:
        advance_state(state, S, P, seq, far)
    return o


@triton.jit
def _advance_kernel(s_ptr, p_ptr, ring_ptr, far_ptr, r_ptr, p0_ptr, pos_ptr, seq_ptr, C, W, NB,
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
                        far += tl.load(ring_ptr + (bh * W + j % W) * KV + cols, mask=mc, other=0.0)
                    else:
                        far += tl.load(sums + (j - i0) * KV, mask=mc, other=0.0)
                tl.store(far_ptr + bh * KV + cols, far, mask=mc)
            for w in range(0, W):
                jw = (end - 1) - (((end - 1 - w) % W) + W) % W   # newest block for slot w
                if jw >= i0:
                    tl.store(ring_ptr + (bh * W + w) * KV + cols, tl.load(sums + (jw - i0) * KV, mask=mc), mask=mc)
            tl.store(p0_ptr + bh * KV + cols, tl.load(p_ptr + (bh * NB + nc) * KV + cols, mask=mc), mask=mc)
        partial = tl.load(sums + nc * KV, mask=mc, other=0.0)    # block nc: open, or not touched
        tl.store(r_ptr + bh * KV + cols, tl.where(nc < nb, partial, 0.0), mask=mc)
        if (h == 0) & (pc == 0):
            tl.store(pos_ptr + b, tl.load(pos_ptr + b) + n)


def advance_state(state, S, P, seq, far):
    B, H, W, K, V = state.ring.shape
    BCOL = 512
    _advance_kernel[(B * H, triton.cdiv(K * V, BCOL))](
        S, P, state.ring, state.far, state.partial, state.prefix, state.pos, seq, state.block_size, W, S.shape[2],
        H=H, KV=K * V, FAR=far, BCOL=BCOL)
