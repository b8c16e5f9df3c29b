"""Elementwise pieces of the model, each one function so that on a CUDA device at inference it
can run as one fused kernel (``torch.compile``); on the CPU, and whenever gradients flow, the
plain eager code runs. ``MHLA_STREAM_COMPILE=0`` turns compilation off.

Fusing matters for prefill and for batched decode (batch 1 decode has its own five-launch path,
``MHLABlock.decode_step``). The execution plan reports the choice (``compile_elementwise``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .switches import switches


def rms_norm(x, weight, eps: float):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rope_tables(positions, dim: int, theta: float):
    """cos, sin [B, T, 1, dim/2] for GPT-NeoX rotate-half RoPE at integer ``positions`` [B, T]."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    ang = positions.to(torch.float32)[..., None] * inv_freq
    return ang.cos()[:, :, None], ang.sin()[:, :, None]


def rope_at(start, T: int, dim: int, theta: float):
    """RoPE tables for the T positions after each sequence's ``start`` [B, 1] (one fused kernel on CUDA)."""
    return rope_tables(start + torch.arange(T, device=start.device), dim, theta)


def relu_rope(x, cos, sin):
    """relu feature map, then rotate-half RoPE over the whole head dim. x [B, T, H, D]."""
    x1, x2 = F.relu(x.float()).chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def gated_norm(o, weight, g, eps: float):
    """Per-head ``rmsnorm(o) * w * silu(g)``."""
    return (rms_norm(o, weight, eps).float() * F.silu(g.float())).to(o.dtype)


def swiglu(gate, up):
    return F.silu(gate) * up


_COMPILED: dict = {}


def fast(fn):
    """``fn`` or its compiled form: compiled only for CUDA tensors with gradients off."""
    def call(x, *args):
        if x.is_cuda and not torch.is_grad_enabled() and switches().compile:
            compiled = _COMPILED.get(fn)
            if compiled is None:
                compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
            return compiled(x, *args)
        return fn(x, *args)
    call.__name__ = fn.__name__
    return call


rms_norm_fast = fast(rms_norm)
rope_at_fast = fast(rope_at)
relu_rope_fast = fast(relu_rope)
gated_norm_fast = fast(gated_norm)
swiglu_fast = fast(swiglu)
