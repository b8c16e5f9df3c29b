"""The whole SwiGLU MLP of one decode row in one launch:

    acc += silu(RMSNorm(h) W_gate^T) * (RMSNorm(h) W_up^T) W_down^T      (acc holds h, in fp32)

At batch 1 each launch of the decode step costs its transfer plus about 1.5-2 us of start, wait
and drain (H100, sessions 13-20); the MLP as two products (gate/up, then down) pays that twice a
layer. Here each program takes BN columns of the intermediate row: it loads their gate and up
rows and the matching BN columns of W_down before waiting on the previous kernel, computes its
slice of the SwiGLU activation from the normed row, multiplies it into W_down's columns, and adds
that partial output row into ``acc`` with fp32 atomics. No second launch and no workspace; the
partial sums meet in L2.

``acc`` must hold the residual h (in fp32) when the launch starts: the output projection writes
it there (``skinny_linear``'s ``acc_out``), and the next layer reads it rounded to the activation
dtype (``skinny_linear`` rounds an fp32 x it is given for a lower-precision output). Numerics
against the two products: the same roundings of the normed row and of the SwiGLU activation;
the down product's sum is not rounded on its own before the residual joins it, and the order of
the partial sums follows the programs' arrival (fp32; one rounding to bf16 at the reader).

One row only (the tensor-core form from two rows keeps its two products). Launch shapes: the
decode step's picks where there are some (``step_picks``, key '... swiglu down ...'), else tuned
alone at the first launch, with ``acc`` restored after each timed configuration.
"""
import torch
import triton
import triton.language as tl

from ..switches import switches
from . import step_picks
from .triton_common import INTERPRET, PDL, PDL_EARLY, graph_bench, pow2, round_to


# MHLA_STREAM_FUSED_MLP=0: the batch-1 decode step runs the MLP as two products (A/B runs)
ENABLED = switches().fused_mlp


@triton.jit
def _mlp_row_kernel(x_ptr, nw_ptr, w_ptr, wd_ptr, acc_ptr, N, K, GS, eps, NORM: tl.constexpr,
                    SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, DOWN: tl.constexpr, PDL: tl.constexpr,
                    EARLY: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    # x [K] (h, the activation dtype), w [2N, K] = [W_gate; W_up], wd [K, N] (W_down as nn.Linear
    # holds it), acc [K] fp32. (NORM, SWIGLU, RESIDUAL, DOWN, GS, SPLIT: the step picks' key fields.)
    if EARLY:  # the next kernel may start now and load its weights while this one runs
        tl.extra.cuda.gdc_launch_dependents()
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)                                                            # [BN] intermediate columns
    ck = tl.arange(0, BK)                                                                       # [BK] the whole row
    mn, mk = rn < N, ck < K
    # every weight this program needs, requested before the wait: none depends on the previous kernel
    wmask = mn[:, None] & mk[None, :]
    wg = tl.load(w_ptr + rn[:, None] * K + ck[None, :], mask=wmask, other=0.0)                 # [BN, BK]
    wu = tl.load(w_ptr + (N + rn[:, None]) * K + ck[None, :], mask=wmask, other=0.0)           # [BN, BK]
    wd = tl.load(wd_ptr + ck[:, None] * N + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)  # [BK, BN]
    nw = tl.load(nw_ptr + ck, mask=mk, other=0.0).to(tl.float32)                               # [BK]
    if PDL:
        tl.extra.cuda.gdc_wait()  # h comes from the output projection
    x = tl.load(x_ptr + ck, mask=mk, other=0.0).to(tl.float32)                                 # [BK]
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    xn = round_to(x * rstd * nw, DT).to(tl.float32)                                            # RMSNorm(h), rounded
    gate = round_to(tl.sum(wg.to(tl.float32) * xn[None, :], axis=1), DT).to(tl.float32)      # [BN]
    up = round_to(tl.sum(wu.to(tl.float32) * xn[None, :], axis=1), DT).to(tl.float32)        # [BN]
    a = round_to(gate * tl.sigmoid(gate) * up, DT).to(tl.float32)                             # [BN] SwiGLU, rounded
    part = tl.sum(wd.to(tl.float32) * a[None, :], axis=1)                                      # [BK] this slice's share
    tl.atomic_add(acc_ptr + ck, part, mask=mk, sem="relaxed")


# whole-row shapes (the row's weights in registers before the wait); the step picks narrow them
_CONFIGS = [triton.Config({"BN": bn, "SPLIT": 1}, num_warps=w, num_stages=1)
            for bn in (2, 4, 8) for w in (4, 8)]


def _fits(cfg, named_args, kwargs) -> bool:
    return cfg.kwargs["SPLIT"] == 1 and cfg.kwargs["BK"] >= named_args["K"]


def _pruned(configs, named_args, **kwargs):
    """The configurations at the padded row length, narrowed to the step pick if there is one."""
    bk = pow2(named_args["K"])
    configs = [triton.Config(dict(c.kwargs, BK=bk), num_warps=c.num_warps, num_stages=c.num_stages,
                             maxnreg=c.maxnreg) for c in configs]
    return step_picks.pruner(_fits)(configs, named_args, **kwargs)


_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K"], do_bench=graph_bench, restore_value=["acc_ptr"],
                         prune_configs_by={"early_config_prune": _pruned})(_mlp_row_kernel)


def mlp_row_into(acc: torch.Tensor, h: torch.Tensor, gate_up: torch.Tensor, norm_weight: torch.Tensor,
                 down: torch.Tensor, eps: float) -> None:
    """acc [1, K] fp32 (holding h) += SwiGLU(RMSNorm(h)) W_down^T. h [1, K] in the weights' dtype;
    gate_up [2N, K] = [W_gate; W_up]; down [K, N]; norm_weight [K]."""
    K = h.shape[-1]
    N = gate_up.shape[0] // 2
    assert h.shape == (1, K) and h.stride(-1) == 1 and acc.shape == (1, K) and acc.dtype == torch.float32
    assert acc.is_contiguous() and gate_up.shape == (2 * N, K) and gate_up.is_contiguous()
    assert down.shape == (K, N) and down.is_contiguous() and norm_weight.shape == (K,)
    args = (h, norm_weight, gate_up, down, acc, N, K, K, eps)
    flags = dict(NORM=True, SWIGLU=True, RESIDUAL=True, DOWN=True, PDL=PDL, EARLY=PDL_EARLY)
    if INTERPRET:  # one shape, few programs: the interpreter runs them one by one
        _mlp_row_kernel[(triton.cdiv(N, 16),)](*args, **flags, BN=16, BK=pow2(K), SPLIT=1)
        return
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    step_picks.launching(_tuned, lambda: _tuned[grid](*args, **flags, launch_pdl=PDL))


def forget_tuning() -> None:
    _tuned.cache.clear()


def tuned_keys() -> dict:
    """{product key: the shape the tuner holds} (the step tuner's starting point)."""
    out = {}
    for k, cfg in _tuned.cache.items():
        n, kk, dtype = k[0], k[1], k[2]
        key = step_picks.product_key(n, kk, kk, True, False, True, True, dtype, down=True)
        out[key] = step_picks.as_pick(cfg)
    return out
