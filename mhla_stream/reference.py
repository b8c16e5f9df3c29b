"""The definition of SPEC section 1, as a masked quadratic form: the oracle for every test.

    o_t = s * sum_{u <= t} M_ext[b(t), b(u)] * (q_t . k_u) * v_u

O(T^2) memory and time; computed in float64 unless told otherwise. Not for production use.

With ``state_dtype`` bf16 it is the definition under the storage rule of a bf16 ring (see
``state.py``): each completed block summary S_j, formed in fp32 as every form forms it, is
rounded to bf16 once, and every later block reads that rounded value; the current block's own
tokens (the partial R) are not rounded. (A summary whose fp32 value lies within fp32 noise of a
bf16 rounding boundary may round the other way in another summation order: one bf16 ulp.)
"""
from __future__ import annotations

import torch

from .mixing import DEFAULT_POLICY, extend_mixing
from .state import resolve_state_dtype


def mhla_reference(q, k, v, mixing, *, block_size: int = 64, scale=None, policy: str = DEFAULT_POLICY,
                   start: int = 0, dtype=torch.float64, state_dtype=None) -> torch.Tensor:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; tokens sit at absolute positions start .. start+T-1.

    Returns [B, T, H, V] in ``dtype``.
    """
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    t = torch.arange(start, start + T, device=q.device)
    blocks = t // block_size
    m_ext = extend_mixing(mixing.to(q.device), int(blocks[-1]) + 1, policy).to(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    causal = t[:, None] >= t[None, :]
    if resolve_state_dtype(state_dtype) == torch.float32:
        weight = m_ext[blocks[:, None], blocks[None, :]] * causal  # [T, T]
        scores = torch.einsum("bthk,bshk->bhts", q, k) * weight * scale
        return torch.einsum("bhts,bshv->bthv", scores, v)
    # earlier blocks through their rounded summaries, the current block token by token
    n = int(blocks[-1]) + 1
    onehot = torch.nn.functional.one_hot(blocks, n).to(dtype)                          # [T, n]
    summaries = torch.einsum("tn,bthk,bthv->bhnkv", onehot.float(), k.float(), v.float())
    summaries = summaries.float().to(resolve_state_dtype(state_dtype)).to(dtype)      # as a form stores them
    earlier = torch.arange(n, device=q.device)
    prefix = torch.einsum("ij,bhjkv->bhikv", m_ext * (earlier[None, :] < earlier[:, None]), summaries)
    inter = torch.einsum("bthk,bhtkv->bthv", q, prefix[:, :, blocks])
    same = (blocks[:, None] == blocks[None, :]) & causal
    scores = torch.einsum("bthk,bshk->bhts", q, k) * same * m_ext[blocks, blocks][:, None]
    return (inter + torch.einsum("bhts,bshv->bthv", scores, v)) * scale
