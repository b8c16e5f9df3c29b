"""``ExecutionPlan``: which code path runs, decided in one place and carried per call.

A plan is made by ``make_plan`` from the device, the dtype, the batch and the environment
(read once per process, ``switches()``). ``StreamingMHLA`` makes one per stream; the model
makes a default one per (device, dtype, batch) for plain ``forward``/``generate()`` calls.
A plan is never written onto a shared model, so two streams on one model may run different
backends or policies side by side. ``print(plan.describe())`` shows every decision; the
environment switches are listed in ``switches.py``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import torch

from .kernels import numba_available, pdl_supported, triton_available
from .mixing import check_policy
from .state import dtype_name, resolve_state_dtype
from .switches import FUSED_BATCH, FUSED_BATCH_PICKED, switches

BACKENDS = ("auto", "torch", "triton", "numba")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The operator backend for tensors on ``device``: "auto" picks Triton on CUDA and numba on
    the CPU (each falling back to torch when not importable); a named one must be usable here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        return "numba" if numba_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' is not available here: triton is not importable")
    if backend == "numba" and not numba_available():
        raise RuntimeError("backend 'numba' is not available here: numba is not importable")
    if backend == "triton" and device.type != "cuda" and not switches().interpret:
        raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
    if backend == "numba" and device.type != "cpu":
        raise RuntimeError(f"backend 'numba' runs on CPU tensors, got {device}")
    return backend


@dataclass(frozen=True)
class ExecutionPlan:
    """Every execution decision for one stream (or one model default). Fields:

    prefill_backend / decode_backend   operator backend for calls of several tokens / one token
    fused_decode        one-token steps run ``MHLABlock.decode_step`` (five Triton launches a layer)
    batched_decode      one-token steps without fused_decode run ``MHLABlock.decode_step_batched``
                        (cuBLAS products, features in the decode kernel, residual + norm fused,
                        positions moved once a step): CUDA, wherever the decode is not fused
    fused_projections   q/k/v/g and gate/up as one product each (CUDA inference)
    triton_features     relu + RoPE of q and k in one Triton launch during prefill
    compile_elementwise torch.compile of norms, RoPE tables and SwiGLU (CUDA inference)
    cuda_graphs         StreamingMHLA replays captured decode steps and full prefill chunks
    pdl                 decode kernels overlap through programmatic dependent launch
    policy              mixing policy for new states (None: the model's)
    train_backend       operator backend while training: "triton" (Triton forward + backward, on
                        CUDA or with an explicit backend="triton") or "torch" (the differentiable
                        chunk form: make_plan(backend="torch") or MHLA_STREAM_TRITON_TRAIN=0)
    state_dtype         storage dtype of the completed block summaries (the ring) in new states
    """
    device: str
    dtype: str
    batch: int
    prefill_backend: str
    decode_backend: str
    fused_decode: bool
    fused_projections: bool
    triton_features: bool
    compile_elementwise: bool
    cuda_graphs: bool
    pdl: bool
    policy: str | None
    train_backend: str = "torch"
    state_dtype: str = "float32"
    batched_decode: bool = False

    def backend_for(self, tokens: int, stateful: bool) -> str:
        """The operator backend for one call: the decode backend for one token with a state."""
        return self.decode_backend if (stateful and tokens == 1) else self.prefill_backend

    def with_gradients(self, training: bool) -> "ExecutionPlan":
        """The plan for a call with gradients enabled: no fused or compiled inference paths, and
        while training the training backend (Triton forward + backward, or the torch form)."""
        backends = dict(prefill_backend=self.train_backend, decode_backend=self.train_backend) if training else {}
        return replace(self, fused_decode=False, batched_decode=False,
                       fused_projections=False, triton_features=False, compile_elementwise=False, **backends)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@functools.lru_cache(maxsize=256)  # deterministic (the environment is read once): the model asks per call
def make_plan(device, dtype=torch.float32, batch: int = 1, *, backend: str = "auto", policy: str | None = None,
              cuda_graphs: bool = True, fused_decode: bool | None = None, state_dtype=None,
              batched_decode: bool | None = None, rows_picked: bool = False) -> ExecutionPlan:
    """The one place where execution paths are chosen.

    ``backend``: "auto" or a named operator backend (an unavailable one is an error here, at
    creation, rather than at the first call). ``fused_decode``: None decides (CUDA, batches up
    to MHLA_STREAM_FUSED_BATCH, Triton, MHLA_STREAM_FUSED_DECODE not 0); True forces it (tests under TRITON_INTERPRET).
    ``rows_picked``: the step picks name the model's fused-step products for this batch's row block
    (``MHLAForCausalLM.make_plan`` asks them): then the fused step runs up to FUSED_BATCH_PICKED.
    ``state_dtype``: the ring's storage dtype for the states made with this plan (None = fp32).
    ``batched_decode``: None decides (CUDA, Triton, no fused decode, MHLA_STREAM_FUSED_DECODE not
    0); True forces it where the operator is Triton and the decode is not fused (CPU tests).
    """
    device = torch.device(device)
    if policy is not None:
        check_policy(policy)
    ring_dtype = dtype_name(resolve_state_dtype(state_dtype))
    chosen = resolve_backend(backend, device)
    env = switches()
    cuda = device.type == "cuda"
    triton_path = chosen == "triton" and backend in ("auto", "triton")
    if fused_decode is None:
        # up to MHLA_STREAM_FUSED_BATCH sequences (default: switches.FUSED_BATCH, or FUSED_BATCH_PICKED
        # where the step picks cover the row block: tuned alone, the products lose at 32; measured)
        limit = FUSED_BATCH_PICKED if rows_picked and not env.fused_batch_set else env.fused_batch
        fused_decode = cuda and triton_path and env.fused_decode and batch <= limit
    else:  # forced (tests run it on the CPU under TRITON_INTERPRET); only where the operator is Triton
        fused_decode = bool(fused_decode) and triton_path
    if batched_decode is None:
        batched_decode = cuda and triton_path and env.fused_decode and not fused_decode
    else:
        batched_decode = bool(batched_decode) and triton_path and not fused_decode
    return ExecutionPlan(
        device=str(device), dtype=str(dtype).replace("torch.", ""), batch=batch,
        prefill_backend="torch" if chosen == "numba" else chosen,  # numba has a decode form only
        decode_backend=chosen, fused_decode=fused_decode, fused_projections=cuda,
        triton_features=cuda and triton_available() and env.fused_decode,
        compile_elementwise=cuda and env.compile, cuda_graphs=cuda and cuda_graphs and backend in ("auto", "triton"),
        pdl=cuda and triton_path and pdl_supported(), policy=policy, state_dtype=ring_dtype,
        train_backend="triton" if chosen == "triton" and env.triton_train else "torch",
        batched_decode=batched_decode)


def one_row_step(plan: ExecutionPlan, states, lengths, x) -> bool:
    """Whether ``MHLAModel.forward`` runs the one-row fused decode step (batch 1, one token)."""
    return plan.fused_decode and states is not None and lengths is None and tuple(x.shape[:2]) == (1, 1)


def fused_row_keys(config, dtype, rows: int) -> list[str]:
    """The step-pick keys of the fused step's four products a layer for a row block of ``rows``
    (from 16; the norms as statistics: ``MHLABlock.decode_step``)."""
    return list(_row_keys(_widths(config), dtype, rows) or ())


def _widths(config) -> tuple:
    return (config.hidden_size, config.num_heads, config.head_k_dim, config.head_v_dim, config.intermediate_size)


@functools.lru_cache(maxsize=64)
def _row_keys(widths: tuple, dtype, rows: int) -> tuple | None:
    """``fused_row_keys`` (cached: asked at each plan), None where the norms cannot be statistics
    at these widths (``MHLABlock._scales_fit``: the fused step launches other products)."""
    if not triton_available():
        return None
    from .kernels.step_picks import product_key
    from .kernels.triton_skinny import stats_fit
    D, H, K, V, inter = widths
    if not (V % 16 == 0 and stats_fit(D, D) and stats_fit(H * V, V)):
        return None

    def key(N, Kin, GS, norm, swiglu, residual):
        return product_key(N, Kin, GS, False, False, swiglu, residual, dtype, rows, late=norm, stats=norm)
    return (key(2 * H * K + 2 * H * V, D, D, True, False, False), key(D, H * V, V, True, False, True),
            key(inter, D, D, True, True, False), key(D, inter, inter, False, False, True))


def rows_picked(config, device, dtype, batch: int) -> bool:
    """Whether the step picks name every fused-step product of this model for ``batch``'s row block
    (CUDA, batches past FUSED_BATCH up to FUSED_BATCH_PICKED): only then does the fused step run
    there by default (``make_plan``'s ``rows_picked``). Host-side lookups (a few us), no sync."""
    if not FUSED_BATCH < batch <= FUSED_BATCH_PICKED or dtype == torch.float16 or torch.device(device).type != "cuda":
        return False
    keys = _row_keys(_widths(config), dtype, min(max(16, 1 << (batch - 1).bit_length()), 64))  # (the row block)
    if keys is None:
        return False
    from .kernels import step_picks
    have = step_picks.picks_for(torch.cuda.get_device_name(device)) if step_picks.enabled() else {}
    return all(k in have or k in step_picks._forced for k in keys)
