"""Elementwise pieces of the model, each one function so that on a CUDA device at inference it
can run as one fused kernel (``torch.compile``); on the CPU, and whenever gradients flow, the
plain eager code runs. ``MHLA_STREAM_COMPILE=0`` turns compilation off.

Fusing matters for prefill and for batched decode (batch 1 decode has its own five-launch path,
``MHLABlock.decode_step``; batched decode ``MHLABlock.decode_step_batched``). The execution plan
reports the choice (``compile_elementwise``).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .switches import switches


def rms_norm(x, weight, eps: float):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# RoPE angles must be exact at any position: the stream has no length limit, and an fp32
# ``pos * freq`` is off by radians past ~1e7 tokens. Each frequency f is the fp32 value the model
# was trained with, held in float64. A position p = hi * 2**20 + lo gives the angle
#     lo * f                    exact in float64 (20-bit lo times 24-bit f)
#   + hi * ((2**20 * f) mod 2pi)  the reduced constant to ~1e-16, so ~1e-9 rad off at p = 2**40,
# and float64 cos/sin then reduce the sum exactly. 2pi is split Cody-Waite style (a 30-bit head
# whose multiples by k < 2**23 are exact, and a float64 tail) so the reduction costs no accuracy.
_POS_SPLIT = 1 << 20
_TWO_PI_HEAD = 6.283185303211212158203125     # 2pi truncated to 30 significant bits (exact)
_TWO_PI_TAIL = 3.968374318722162e-09          # float64(2pi - head)


def rope_frequencies(dim: int, theta: float, device=None):
    """The model's inverse frequencies: computed in fp32 (as trained), returned in float64."""
    return (theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)).double()


def rope_angles(positions, dim: int, theta: float):
    """Angles [..., dim/2] in float64 for integer ``positions``, exact to ~1e-9 rad up to 2**40 and
    drifting only ~1e-16 rad per 2**20 tokens past it; the same function serves every path."""
    f = rope_frequencies(dim, theta, positions.device)
    scaled = f * _POS_SPLIT                                   # exact: a power of two
    k = torch.round(scaled / (_TWO_PI_HEAD + _TWO_PI_TAIL))
    reduced = (scaled - k * _TWO_PI_HEAD) - k * _TWO_PI_TAIL  # (2**20 f) mod 2pi, in [-pi, pi]
    pos = positions.to(torch.int64)
    hi = torch.div(pos, _POS_SPLIT, rounding_mode="floor").to(torch.float64)[..., None]
    lo = torch.remainder(pos, _POS_SPLIT).to(torch.float64)[..., None]
    return lo * f + hi * reduced


def rope_tables(positions, dim: int, theta: float):
    """cos, sin [B, T, 1, dim/2] fp32 for GPT-NeoX rotate-half RoPE at integer ``positions`` [B, T]."""
    ang = rope_angles(positions, dim, theta)
    return ang.cos().float()[:, :, None], ang.sin().float()[:, :, None]


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


def add_rms_norm(x, y, weight, eps: float):
    """The residual sum ``h = x + y`` and ``rms_norm(h)``, as the block computes them in turn: one
    kernel on CUDA (batched decode, where each elementwise launch costs about what its work does)."""
    h = x + y
    return h, rms_norm(h, weight, eps)


_COMPILED: dict = {}
# signatures whose compile failed: they run eager from then on (a failure is reported once)
_EAGER: set = set()
# dynamo compiles a function again for each new rank, dtype or constant it meets; its default
# limit (8) is reached by a process that serves several model shapes, and with fullgraph=True
# reaching it raises in the middle of a forward pass: these functions may take more (_run_compiled)
RECOMPILE_LIMIT = 64


def _wants_compile(x) -> bool:
    return x.is_cuda and not torch.is_grad_enabled() and switches().compile


def _signature(fn, x, args):
    return (fn, x.dim(), x.dtype, x.device) + tuple(
        (a.dim(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


def _is_compile_error(err: Exception) -> bool:
    # torch._dynamo is looked up only here, after a compile (see _compile)
    exc = torch._dynamo.exc
    return isinstance(err, (exc.TorchDynamoException, exc.FailOnRecompileLimitHit))


def _run_compiled(compiled, x, args):
    """The compiled call; past dynamo's own recompile limit, once more under ours (patching the
    config costs tens of microseconds, so only a call that needs a new graph pays it)."""
    try:
        return compiled(x, *args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(x, *args)


def _compile(fn, options):
    """torch.compile of ``fn`` with the inductor ``options`` this torch knows. Looked up here, at
    the first compile: importing torch._inductor (and dynamo with it) costs about a second, which
    every CPU user and every command's start-up would otherwise pay."""
    import torch._inductor.config as inductor_config

    def knows(key):  # dotted keys name a sub-config ("triton.enable_pdl")
        obj = inductor_config
        for part in key.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    # programmatic dependent launch (Hopper+; inductor checks the device): each kernel launches while
    # its predecessor drains and waits before its first dependent load. Batch 32 / 64 decode +0.9-1.8%
    # / +0.2-1.3% (H100, session 18: .ci/results/2026-11-25-h100/session18)
    options = {"triton.enable_pdl": switches().pdl, **options}
    known = {k: v for k, v in options.items() if knows(k)}
    return torch.compile(fn, dynamic=True, fullgraph=True, options=known or None)


def fast(fn, **options):
    """``fn`` or its compiled form: compiled only for CUDA tensors with gradients off. ``options``:
    inductor settings for this function alone. A signature whose compile fails (dynamo's
    recompile limit, an inductor error) runs the eager code instead, which computes the same
    function: a decode never stops on a compiler error."""
    def call(x, *args):
        if _wants_compile(x):
            # the signature is built only once some compile has failed (the decode's hot path)
            if not (_EAGER and _signature(fn, x, args) in _EAGER):
                compiled = _COMPILED.get(fn)
                if compiled is None:
                    compiled = _COMPILED[fn] = _compile(fn, options)
                try:
                    return _run_compiled(compiled, x, args)
                except Exception as err:
                    if not _is_compile_error(err):
                        raise
                    # an error of the call itself (dynamo raises it while tracing) raises here as it
                    # would uncompiled, and leaves the signature compiled for the valid calls after it
                    out = fn(x, *args)
                    sig = _signature(fn, x, args)
                    _EAGER.add(sig)
                    warnings.warn(f"mhla_stream: {fn.__name__} runs uncompiled for {sig[1:]} ({type(err).__name__})",
                                  RuntimeWarning, stacklevel=2)
                    return out
        return fn(x, *args)
    call.__name__ = fn.__name__
    return call


rms_norm_fast = fast(rms_norm)
rope_at_fast = fast(rope_at)
relu_rope_fast = fast(relu_rope)
gated_norm_fast = fast(gated_norm)
swiglu_fast = fast(swiglu)
# inductor keeps an intermediate in fp32 unless told to round it as eager does: h is rounded to the
# activation dtype before its norm, as in the block (and in the batch-1 fused decode)
add_rms_norm_fast = fast(add_rms_norm, emulate_precision_casts=True)
