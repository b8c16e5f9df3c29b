"""The causal mixing matrix and its extension past the trained blocks (SPEC sections 1-2).

Every form of the operator (oracle, torch chunk, decode, Triton, numba) asks this module for
the coefficient ``M_ext[i, j]`` that query block ``i`` gives to summary ``j``, so the policies
are defined exactly once.

Policies for blocks ``i >= L`` (``L`` = trained blocks):

* ``window``:     ``M_ext[i, j] = M[L-1, L-1-(i-j)]`` for ``i - j < L``, else 0.
* ``window+far``: as ``window``; blocks with ``i - j >= L`` share one running *mean* summary
  weighted ``M[L-1, 0]``, i.e. each gets ``M[L-1, 0] / (i - L + 1)``.

Within the first ``L`` blocks both are exactly ``clamp(M, 1e-5, 1).tril()``.
"""
from __future__ import annotations

import torch

POLICIES = ("window", "window+far")
DEFAULT_POLICY = "window"  # measured: equal loss to window+far on long held-out books, smaller state
CLAMP_MIN, CLAMP_MAX = 1e-5, 1.0


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown mixing policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return policy


def has_far(policy: str) -> bool:
    return policy == "window+far"


def prepare_mixing(mixing: torch.Tensor) -> torch.Tensor:
    """Raw parameter ([L, L], or the reference's [L, L, 1, 1, 1, 1]) -> clamped causal fp32 [L, L].

    Idempotent, so callers may pass a raw or an already prepared matrix.
    """
    if not isinstance(mixing, torch.Tensor):
        raise TypeError(f"mixing must be a torch.Tensor, got {type(mixing).__name__}")
    if mixing.dim() >= 2 and all(s == 1 for s in mixing.shape[2:]):
        mixing = mixing.reshape(mixing.shape[0], mixing.shape[1])
    if mixing.dim() != 2 or mixing.shape[0] != mixing.shape[1] or mixing.shape[0] < 1:
        raise ValueError(f"mixing must be a square [L, L] matrix (or [L, L, 1, 1, 1, 1]), got shape {tuple(mixing.shape)}")
    if not mixing.is_floating_point():
        raise TypeError(f"mixing must be floating point, got {mixing.dtype}")
    return mixing.float().clamp(CLAMP_MIN, CLAMP_MAX).tril()


def init_mixing(num_blocks: int) -> torch.Tensor:
    """The reference initialisation: ``tril(ones) / (row + 1)`` (each row a causal mean)."""
    rows = torch.arange(1, num_blocks + 1, dtype=torch.float32)[:, None]
    return torch.ones(num_blocks, num_blocks).tril() / rows


def coefficient(mc: torch.Tensor, i: torch.Tensor, j: torch.Tensor, policy: str) -> torch.Tensor:
    """``M_ext[i, j]`` for integer tensors ``i``, ``j`` (broadcast); 0 where ``j > i`` or ``j < 0``."""
    L = mc.shape[0]
    i, j = torch.broadcast_tensors(torch.as_tensor(i, device=mc.device), torch.as_tensor(j, device=mc.device))
    d = i - j
    beyond = i >= L
    row = i.clamp(max=L - 1)
    col = torch.where(beyond, L - 1 - d, j)
    valid = (d >= 0) & (j >= 0) & (col >= 0)
    val = mc[row.clamp(min=0), col.clamp(min=0, max=L - 1)] * valid
    if has_far(policy):
        far = beyond & (d >= L) & (j >= 0)
        count = (i - L + 1).clamp(min=1).to(mc.dtype)
        val = torch.where(far, mc[L - 1, 0] / count, val)
    return val


def extend_mixing(mixing: torch.Tensor, num_blocks: int, policy: str = DEFAULT_POLICY) -> torch.Tensor:
    """The dense ``[N, N]`` matrix ``M_ext`` for the first ``N`` blocks (oracle and tests)."""
    check_policy(policy)
    mc = prepare_mixing(mixing)
    idx = torch.arange(num_blocks, device=mc.device)
    return coefficient(mc, idx[:, None], idx[None, :], policy)


def far_coefficient(mc: torch.Tensor, block: torch.Tensor, policy: str) -> torch.Tensor:
    """Weight of the *sum* of evicted summaries for query block ``block`` (0 under ``window``).

    ``block - L + 1`` blocks are older than the window; their mean gets ``M[L-1, 0]``.
    """
    L = mc.shape[0]
    if not has_far(policy):
        return torch.zeros_like(block, dtype=mc.dtype)
    count = (block - L + 1).to(mc.dtype)
    return torch.where(count > 0, mc[L - 1, 0] / count.clamp(min=1), torch.zeros_like(count))
