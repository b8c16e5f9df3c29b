"""The model's feature map for prefill: relu, then rotate-half RoPE, on q and k in one launch.

The fused projection writes ``[q | k | v | g]`` per token, so the first 2H head slices are the
H query heads and then the H key heads: one program per (sequence, head, token block) reads its
slice of that row in place and writes ``qk`` [B, T, 2H, K]. Heads vary fastest across programs so
the cos/sin rows of a token block are read from memory once and then hit in L2.
"""
import torch
import triton
import triton.language as tl

from .triton_common import pow2


@triton.jit
def _relu_rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, T, sx_b, sx_t, sy_b, sy_t, sc_b, sc_t,
                      NH: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK2: tl.constexpr):
    bn, pt = tl.program_id(0), tl.program_id(1)
    b, hh = bn // NH, bn % NH
    K2: tl.constexpr = K // 2
    t = pt * BT + tl.arange(0, BT)
    j = tl.arange(0, BK2)
    m = (t < T)[:, None] & (j < K2)[None, :]                                                    # [BT, BK2]
    src = x_ptr + b * sx_b + t[:, None] * sx_t + hh * K + j[None, :]
    x1 = tl.maximum(tl.load(src, mask=m, other=0.0).to(tl.float32), 0.0)
    x2 = tl.maximum(tl.load(src + K2, mask=m, other=0.0).to(tl.float32), 0.0)
    c = tl.load(cos_ptr + b * sc_b + t[:, None] * sc_t + j[None, :], mask=m, other=0.0)       # [BT, BK2] fp32
    s = tl.load(sin_ptr + b * sc_b + t[:, None] * sc_t + j[None, :], mask=m, other=0.0)
    dst = y_ptr + b * sy_b + t[:, None] * sy_t + hh * K + j[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(dst + K2, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=m)


def relu_rope_qk(proj, cos, sin, num_heads: int, head_dim: int):
    """proj [B, T, >= 2*H*K] (unit last stride) -> qk [B, T, 2H, K]: relu + RoPE of the first 2H heads.
    cos, sin: [B, T, 1, K/2] fp32 (``fused.rope_tables``)."""
    B, T = proj.shape[:2]
    NH, K = 2 * num_heads, head_dim
    assert proj.stride(-1) == 1 and K % 2 == 0
    cos, sin = cos.expand(B, T, 1, K // 2).contiguous(), sin.expand(B, T, 1, K // 2).contiguous()
    y = torch.empty(B, T, NH, K, device=proj.device, dtype=proj.dtype)
    BT = 32
    _relu_rope_kernel[(B * NH, triton.cdiv(T, BT))](
        proj, y, cos, sin, T, proj.stride(0), proj.stride(1), y.stride(0), y.stride(1), cos.stride(0), cos.stride(1),
        NH=NH, K=K, BT=BT, BK2=pow2(K // 2, 1))
    return y
