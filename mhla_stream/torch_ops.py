"""Chunk and decode (recurrent) forms of the MHLA operator in plain PyTorch (SPEC section 1).

The chunk form handles any start position (a call may begin mid-block) and carries an
``MHLAState`` in and out; it is differentiable when no state is updated in place, which is
how training uses it. The decode form is the one-token update of the same state. Every
function here takes the clamped fp32 mixing matrix (``mc`` = ``mixing.prepare_mixing``).

A state whose ring is stored in bf16 (``MHLAState.state_dtype``): each completed summary is
rounded once when it completes and every later use reads that rounded value (``rounded``);
all sums stay fp32.
"""
from __future__ import annotations

import torch

from .mixing import coefficient, far_coefficient, has_far
from .state import MHLAState


def rounded(summaries: torch.Tensor, state_dtype: torch.dtype) -> torch.Tensor:
    """Completed summaries as the ring stores them: rounded to ``state_dtype``, back in fp32."""
    return summaries if state_dtype == torch.float32 else summaries.to(state_dtype).float()


# --------------------------------------------------------------------------------------------
# Block boundary: P_{i} from the stored summaries (torch decode and numba decode close blocks here)
# --------------------------------------------------------------------------------------------
def ring_blocks(block: torch.Tensor, window: int) -> torch.Tensor:
    """Block index held by each ring slot when block ``block`` [B] is current: [B, W] (may be < 0)."""
    slots = torch.arange(window, device=block.device)
    last = block[:, None] - 1  # most recent completed block
    return last - torch.remainder(last - slots, window)


def mix_prefix(state: MHLAState, mc: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``P_block = sum_j M_ext[block, j] S_j`` from the ring and far sum: [B, H, K, V] fp32."""
    j = ring_blocks(block, state.window)
    coef = coefficient(mc, block[:, None], j, state.policy)  # [B, W], 0 for empty slots
    prefix = torch.einsum("bw,bhwkv->bhkv", coef, state.ring.float())  # a bf16 ring is widened to fp32
    if has_far(state.policy):
        prefix = prefix + far_coefficient(mc, block, state.policy)[:, None, None, None] * state.far
    return prefix


def close_blocks(state: MHLAState, mc: torch.Tensor, done: torch.Tensor) -> None:
    """For sequences ``done`` [B] bool whose current block just filled: store R as S_i, evict to the
    far sum, build the next P, clear R. ``pos`` must already count the block's last token."""
    if not bool(done.any()):
        return
    idx = done.nonzero().flatten()
    sub = state.select(idx)  # advanced indexing: copies, written back below
    block = sub.pos // state.block_size - 1  # the block that just closed
    slot = torch.remainder(block, state.window)
    rows = torch.arange(len(idx), device=state.device)
    if has_far(state.policy):
        evicted = (block - state.window >= 0).to(torch.float32)[:, None, None, None]
        sub.far += evicted * sub.ring[rows, :, slot].float()
    sub.ring[rows, :, slot] = sub.partial.to(sub.ring.dtype)  # rounds here (bf16 ring); mix_prefix reads it back
    sub.partial.zero_()
    sub.prefix.copy_(mix_prefix(sub, mc, block + 1))
    for n in ("ring", "far", "prefix", "partial"):
        getattr(state, n)[idx] = getattr(sub, n)  # every tensor but pos, which the caller moved


# --------------------------------------------------------------------------------------------
# Decode form: one token per sequence, each at its own position
# --------------------------------------------------------------------------------------------
def decode_step(q, k, v, mc, state: MHLAState, scale: float) -> torch.Tensor:
    """q, k [B, 1, H, K], v [B, 1, H, V] -> o [B, 1, H, V]; updates ``state`` in place."""
    q32, k32, v32 = q[:, 0].float(), k[:, 0].float(), v[:, 0].float()
    block = state.pos // state.block_size
    state.partial += k32[..., :, None] * v32[..., None, :]
    diag = coefficient(mc, block, block, state.policy)[:, None, None, None]
    o = torch.einsum("bhk,bhkv->bhv", q32, state.prefix + diag * state.partial) * scale
    state.pos += 1
    close_blocks(state, mc, state.pos % state.block_size == 0)
    return o[:, None].to(q.dtype)


# --------------------------------------------------------------------------------------------
# Chunk form: T tokens for sequences that all start at the same position
# --------------------------------------------------------------------------------------------
def chunk_forward(q, k, v, mc, scale: float, block_size: int, policy: str, start: int = 0,
                  state: MHLAState | None = None):
    """q, k [B, T, H, K], v [B, T, H, V], every sequence at absolute position ``start``.

    Returns ``(o [B, T, H, V], new)`` where ``new`` holds the updated state tensors
    (``ring``, ``far``, ``prefix``, ``partial``) or is None when ``state`` is None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, L = block_size, mc.shape[0]
    W = max(L - 1, 1)
    r, i0 = start % C, start // C
    nb = -(-(r + T) // C)          # blocks touched by this call
    nc = (start + T) // C - i0     # blocks completed by this call
    pad = (r, nb * C - r - T)

    def blocked(x):  # [B, T, H, D] -> [B, H, nb, C, D] fp32, zero-padded to block edges
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, *pad))
        return x.view(B, nb, C, H, -1).permute(0, 3, 1, 2, 4)

    qb, kb, vb = blocked(q), blocked(k), blocked(v)
    summaries = kb.transpose(-1, -2) @ vb                       # [B, H, nb, K, V]
    partial0 = state.partial if state is not None else None
    if partial0 is not None:
        summaries = torch.cat([summaries[:, :, :1] + partial0[:, :, None], summaries[:, :, 1:]], 2)
    if state is not None and state.state_dtype != torch.float32 and nc:
        # the blocks this call completes are stored rounded: every use below reads the rounded value
        summaries = torch.cat([rounded(summaries[:, :, :nc], state.state_dtype), summaries[:, :, nc:]], 2)

    # Completed blocks visible to this call, in block order: the ring's, then the new ones.
    held = min(i0, W) if state is not None else 0
    first = i0 - held
    if held:
        slots = torch.remainder(torch.arange(first, i0, device=q.device), W)
        visible = torch.cat([state.ring[:, :, slots].float(), summaries], 2)
    else:
        visible = summaries

    # P for blocks i0+1 .. i0+nc (the last one is the next call's current block):
    # P_i = sum_{j < i} M_ext[i, j] S_j over the visible blocks, plus the far sum evicted earlier.
    blocks_all = torch.arange(i0, i0 + nc + 1, device=q.device)
    prefixes = [state.prefix if state is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)]
    if nc:
        tgt = blocks_all[1:, None]                                   # [nc, 1]
        src = torch.arange(first, i0 + nb, device=q.device)[None]   # [1, nvis]
        coef = coefficient(mc, tgt, src, policy) * (src < tgt)       # [nc, nvis]
        mixed = torch.einsum("nj,bhjkv->bhnkv", coef, visible)       # [B, H, nc, K, V]
        if state is not None and has_far(policy):
            mixed = mixed + far_coefficient(mc, tgt[:, 0], policy)[:, None, None] * state.far[:, :, None]
        prefixes += list(mixed.unbind(2))
    prefix = torch.stack(prefixes[:nb], 2)                           # [B, H, nb, K, V]

    # Intra-block causal part, plus the old partial for the first block.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (qb @ kb.transpose(-1, -2)).masked_fill(~causal, 0)   # [B, H, nb, C, C]
    intra = scores @ vb                                            # [B, H, nb, C, V]
    if partial0 is not None:
        intra = torch.cat([intra[:, :, :1] + qb[:, :, :1] @ partial0[:, :, None], intra[:, :, 1:]], 2)
    diag = coefficient(mc, blocks_all[:nb], blocks_all[:nb], policy)  # [nb]
    out = (qb @ prefix + diag[:, None, None] * intra) * scale     # [B, H, nb, C, V]
    out = out.permute(0, 2, 3, 1, 4).reshape(B, nb * C, H, V)[:, r:r + T]

    if state is None:
        return out.to(q.dtype), None
    # New state: push completed blocks into the ring, evicting the oldest to the far sum.
    ring, far = state.ring, state.far
    if nc:
        end = i0 + nc                                              # blocks < end are complete
        keep_from = max(end - W, first)
        if has_far(policy) and keep_from > first:
            far = far + visible[:, :, : keep_from - first].sum(2)
        kept = torch.arange(keep_from, end, device=q.device)
        ring = ring.clone()
        ring[:, :, torch.remainder(kept, W)] = visible[:, :, keep_from - first: end - first].to(ring.dtype)
    partial = summaries[:, :, nc] if nc < nb else torch.zeros_like(state.partial)
    return out.to(q.dtype), {"ring": ring, "far": far, "prefix": prefixes[nc], "partial": partial}
