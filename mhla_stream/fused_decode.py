"""One decode token through a block in five launches (CUDA, inference; Triton kernels).

    qkvg = RMSNorm(x) W_qkvg^T                         skinny product, norm in its prologue
    o    = MHLA decode(relu+RoPE(q), relu+RoPE(k), v)  state update and block close in one kernel
    h    = x + (RMSNorm_V(o) * silu(g)) W_o^T          gated output norm in the prologue, residual
    a    = silu(RMSNorm(h) W_gate^T) * (RMSNorm(h) W_up^T)
    out  = h + a W_down^T

against about 17 launches of the unfused path (cuBLAS small-M products plus separate norm,
feature-map, residual, close and position kernels). Positions are left to the caller, which
advances every layer's state in one launch (``advance_positions``). Numerics follow the unfused
model: the same values are rounded to the activation dtype; only summation order differs.
"""
from __future__ import annotations

import os

import torch


def wanted(model, x, states, lengths, backend: str) -> bool:
    """Use the fused decode for this call? ``model.fused_decode``: None = automatic (CUDA, batch 1,
    no gradients, Triton importable), True = always (tests under TRITON_INTERPRET), False = never."""
    if states is None or lengths is not None or x.shape[1] != 1 or backend not in ("auto", "triton"):
        return False
    choice = getattr(model, "fused_decode", None)
    if choice is not None:
        return bool(choice)
    if not x.is_cuda or torch.is_grad_enabled() or os.environ.get("MHLA_STREAM_FUSED_DECODE", "1") == "0":
        return False
    from .kernels import triton_available
    # batch 1 only: at batch 8 and 32 cuBLAS's products beat the tl.dot form here (H100, 2026-11-22)
    return triton_available() and x.shape[0] == 1


def block_step(block, x, cos, sin, state):
    """x [B, 1, D] -> [B, 1, D] for one ``MHLABlock``; ``state`` advanced except its position."""
    from .kernels.triton_decode import decode_into
    from .kernels.triton_skinny import skinny_linear

    attn, mlp = block.attn, block.mlp
    B = x.shape[0]
    H, K, V = attn.num_heads, attn.head_k_dim, attn.head_v_dim
    x2 = x.reshape(B, -1)
    qkvg = skinny_linear(x2, attn._fused.weight(attn.q_proj, attn.k_proj, attn.v_proj, attn.g_proj),
                         norm_weight=block.attn_norm.weight, eps=block.attn_norm.eps)
    hk, hv = H * K, H * V
    q = qkvg[:, :hk].view(B, H, K)
    k = qkvg[:, hk:2 * hk].view(B, H, K)
    v = qkvg[:, 2 * hk:2 * hk + hv].view(B, H, V)
    g = qkvg[:, 2 * hk + hv:]
    o = torch.empty(B, H, V, device=x.device, dtype=x.dtype)
    decode_into(o, q, k, v, attn.mixing_matrix, state, K ** -0.5, rope=(cos, sin))
    gn = attn.g_norm_swish_gate
    h = skinny_linear(o.view(B, hv), attn.o_proj.weight, norm_weight=gn.weight, group=V, eps=gn.eps, gate=g,
                      residual=x2)
    a = skinny_linear(h, mlp._fused.weight(mlp.gate_proj, mlp.up_proj), norm_weight=block.mlp_norm.weight,
                      eps=block.mlp_norm.eps, swiglu=True)
    return skinny_linear(a, mlp.down_proj.weight, residual=h).view(B, 1, -1)


def advance_positions(states) -> None:
    """Every layer's position += 1, as one multi-tensor launch."""
    torch._foreach_add_([s.pos for s in states], 1)
