"""The definition of SPEC section 1, as a masked quadratic form: the oracle for every test.

    o_t = s * sum_{u <= t} M_ext[b(t), b(u)] * (q_t . k_u) * v_u

O(T^2) memory and time; computed in float64 unless told otherwise. Not for production use.
"""
from __future__ import annotations

import torch

from .mixing import DEFAULT_POLICY, extend_mixing


def mhla_reference(q, k, v, mixing, *, block_size: int = 64, scale=None, policy: str = DEFAULT_POLICY,
                   start: int = 0, dtype=torch.float64) -> torch.Tensor:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; tokens sit at absolute positions start .. start+T-1.

    Returns [B, T, H, V] in ``dtype``.
    """
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    t = torch.arange(start, start + T, device=q.device)
    blocks = t // block_size
    m_ext = extend_mixing(mixing.to(q.device), int(blocks[-1]) + 1, policy).to(dtype)
    weight = m_ext[blocks[:, None], blocks[None, :]] * (t[:, None] >= t[None, :])  # [T, T]
    scores = torch.einsum("bthk,bshk->bhts", q.to(dtype), k.to(dtype)) * weight * scale
    return torch.einsum("bhts,bshv->bthv", scores, v.to(dtype))
