"""Public Triton entry: ``triton_mhla`` (decode for one token per sequence, chunked prefill
otherwise) and the host-side bookkeeping of the state after a prefill."""
import os

import torch
import triton

from ..mixing import has_far
from .triton_chunk import _mix_kernel, _output_kernel, _summary_kernel
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
    NB = triton.cdiv(T + (C - 1 if state is not None else 0), C)                 # blocks touched, upper bound
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
        far_reachable = far and bool((pos // C + NB > L).any())
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
        _advance_state(state, S, P, seq.tolist(), far)
    return o


def _advance_state(state, S, P, seqs, far):
    """Push the completed blocks into the ring (evicting the oldest to the far sum), keep the new
    prefix and partial, move the positions. Host loop over sequences: prefill only."""
    C, W = state.block_size, state.window
    for b, (r, i0, n) in enumerate(seqs):
        if n == 0:
            continue
        nb, nc = -(-(r + n) // C), (r + n) // C
        if nc:
            end = i0 + nc
            held_first = max(0, i0 - W)
            keep_from = max(end - W, held_first)
            if far:
                old = torch.arange(held_first, min(i0, keep_from), device=S.device)
                if len(old):
                    state.far[b] += state.ring[b][:, old % W].sum(1)
                if keep_from > i0:
                    state.far[b] += S[b, :, : keep_from - i0].sum(1)
            new = torch.arange(max(keep_from, i0), end, device=S.device)
            state.ring[b][:, new % W] = S[b, :, new - i0]
            state.prefix[b] = P[b, :, nc]
        if nc < nb:
            state.partial[b] = S[b, :, nc]
        else:
            state.partial[b].zero_()
        state.pos[b] += n
