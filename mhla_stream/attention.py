"""Public entry point of the operator: ``mhla_attention`` (SPEC section 4).

Validates its arguments, creates or checks the streaming state, and dispatches to a backend:
``torch`` (chunk/decode forms in ``torch_ops``), ``triton`` (CUDA kernels) or ``numba`` (CPU).
"""
from __future__ import annotations

import torch

from . import torch_ops
from .kernels import numba_available, triton_available
from .mixing import DEFAULT_POLICY, check_policy, has_far, prepare_mixing
from .plan import BACKENDS, resolve_backend
from .state import MHLAState, dtype_name, resolve_state_dtype

# optional compiled backends, imported only where their package is installed
triton_chunk_prefill = triton_chunk_trainable = triton_decode_step = numba_decode = None
if triton_available():
    from .kernels.triton_chunk import chunk_prefill as triton_chunk_prefill
    from .kernels.triton_chunk_bwd import chunk_trainable as triton_chunk_trainable
    from .kernels.triton_decode import decode_step as triton_decode_step
if numba_available():
    from .kernels.numba_decode import numba_decode

__all__ = ["mhla_attention", "torch_mhla", "resolve_backend", "BACKENDS"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_inputs(q, k, v, lengths):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D] (4 dims), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[1] == 0:
        raise ValueError("q, k, v have T = 0 tokens; pass at least one")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (q.shape[0],) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape [B] = [{q.shape[0]}]")
        # their values need a host read, which a CUDA-graph capture forbids: a captured caller (the
        # server's batched admission) guarantees them itself
        capturing = lengths.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and (bool((lengths < 0).any()) or bool((lengths > q.shape[1]).any())):
            raise ValueError(f"lengths must lie in [0, T={q.shape[1]}], got {lengths.tolist()}")


def mhla_attention(q, k, v, mixing, *, block_size: int = 64, scale=None, state: MHLAState | None = None,
                   return_state: bool = False, backend: str = "auto", policy: str | None = None,
                   lengths: torch.Tensor | None = None, state_dtype=None):
    """Causal MHLA: ``o_t = s * sum_{u<=t} M[b(t), b(u)] (q_t . k_u) v_u`` (SPEC section 1).

    q, k: [B, T, H, K]; v: [B, T, H, V]; mixing: [L, L] (raw or prepared; clamped and masked here).
    ``state``: an ``MHLAState`` to continue from (updated in place); with ``return_state`` a new one
    is created when none is given. ``lengths`` [B]: valid tokens per sequence (right padding), only
    those update the state. ``policy`` applies past the trained blocks (default: the state's, else
    ``DEFAULT_POLICY``). ``state_dtype``: storage dtype of the completed summaries of a new state
    (None = fp32, or bf16; a given state keeps its own). Returns ``o`` [B, T, H, V] in the input
    dtype, or ``(o, state)``.
    """
    _check_inputs(q, k, v, lengths)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    chosen = resolve_backend(backend, q.device)
    mixing = mixing_for(chosen, mixing, q.device)  # raw for Triton (clamped in-kernel), else clamped
    L = mixing.shape[0]
    scale = K ** -0.5 if scale is None else float(scale)
    if state is not None:
        if not isinstance(state, MHLAState):
            raise TypeError(f"state must be an MHLAState, got {type(state).__name__}")
        state.check_compatible(B, H, K, V, block_size, L)
        if policy is not None and check_policy(policy) != state.policy:
            raise ValueError(f"policy {policy!r} differs from the state's {state.policy!r}")
        if state.device != q.device:
            raise ValueError(f"state is on {state.device} but the inputs are on {q.device}")
        if state_dtype is not None and resolve_state_dtype(state_dtype) != state.state_dtype:
            raise ValueError(f"state_dtype {dtype_name(resolve_state_dtype(state_dtype))} differs from the state's "
                             f"{dtype_name(state.state_dtype)}")
    elif return_state:
        state = MHLAState.empty(B, H, K, V, block_size=block_size, num_blocks=L,
                                policy=check_policy(policy or DEFAULT_POLICY), device=q.device,
                                state_dtype=state_dtype)
    elif state_dtype is not None:
        resolve_state_dtype(state_dtype)  # checked, though a call without a state stores no summaries
    policy = state.policy if state is not None else check_policy(policy or DEFAULT_POLICY)

    # the form: a stateful call of one token per sequence is a decode step (recurrent form), any
    # other call the chunk form; numba has only the decode form (its prefill is torch's chunk form).
    # A stateless Triton call that needs gradients (training) runs the Triton forward + backward;
    # calls with a state (updated in place) keep their inference paths.
    decode = state is not None and T == 1 and lengths is None
    buffered = chosen == "triton" and decode  # the Triton decode kernel keeps the open block's tokens
    if state is not None and not buffered:
        state.settle_()  # every other form reads the open block as R
    if chosen == "triton" and state is None and _needs_grad(q, k, v, mixing):
        o = triton_chunk_trainable(q, k, v, mixing, scale, block_size, policy, lengths)
    elif chosen == "triton" and decode:
        o = triton_decode_step(q, k, v, mixing, state, scale)
    elif chosen == "triton":
        o = triton_chunk_prefill(q, k, v, mixing, scale, block_size, has_far(policy), state, lengths)
    elif chosen == "numba" and decode:
        o = numba_decode(q, k, v, mixing, scale=scale, block_size=block_size, state=state)
    else:
        o = torch_mhla(q, k, v, mixing, scale, block_size, policy, state, lengths)
    if state is not None and not buffered:
        state.mark_settled_()
    if chosen == "triton" and state is not None and _needs_grad(q, k, v, mixing):
        o = _NoGradientThroughState.apply(o, q, k, v, mixing)
    return (o, state) if return_state else o


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


class _NoGradientThroughState(torch.autograd.Function):
    """The output of a Triton call with a state, made while gradients are on. Those kernels are
    forward-only: without this, ``o`` would carry no graph and a loss through it would silently
    leave q, k, v and M without their gradient. The forward is untouched; a backward raises."""

    @staticmethod
    def forward(ctx, o, *inputs):
        return o.view_as(o)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backend 'triton' has no gradients for calls with a state (those kernels are "
                           "forward-only); call without a state to train, or run stateful calls under torch.no_grad()")


def mixing_for(backend: str, mixing, device):
    """The Triton kernels clamp on load, so they take the raw [L, L] parameter as it is (no extra
    launches per call); every other form takes the clamped fp32 matrix (``prepare_mixing``)."""
    if backend == "triton" and isinstance(mixing, torch.Tensor) and mixing.is_floating_point() \
            and mixing.device == device and mixing.dim() >= 2:
        raw = mixing.reshape(mixing.shape[0], -1)
        if raw.shape[0] == raw.shape[1]:
            return raw.contiguous()
    return prepare_mixing(mixing).to(device)


def torch_mhla(q, k, v, clamped, scale, block_size, policy, state, lengths):
    """The torch forms: chunk (with or without a state) or one-token decode. ``clamped`` is the
    prepared fp32 mixing matrix."""
    mc = clamped
    B, T = q.shape[:2]
    if state is None:
        return torch_ops.chunk_forward(q, k, v, mc, scale, block_size, policy)[0]
    if T == 1 and lengths is None:
        return torch_ops.decode_step(q, k, v, mc, state, scale)
    starts = state.pos.tolist()
    counts = [T] * B if lengths is None else lengths.tolist()
    if len(set(starts)) == 1 and len(set(counts)) == 1:
        groups = [(slice(0, B), starts[0], counts[0])]
    else:  # sequences at different positions or lengths: one call each
        groups = [(slice(b, b + 1), starts[b], counts[b]) for b in range(B)]
    outs = []
    for rows, start, n in groups:
        o = q.new_zeros(q[rows].shape[:3] + (v.shape[-1],))
        if n:
            sub = state.select(rows)
            o_valid, new = torch_ops.chunk_forward(q[rows, :n], k[rows, :n], v[rows, :n], mc, scale,
                                                  block_size, policy, start, sub)
            o[:, :n] = o_valid
            for name, t in new.items():
                getattr(sub, name).copy_(t)
            sub.pos += n
        outs.append(o)
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]
