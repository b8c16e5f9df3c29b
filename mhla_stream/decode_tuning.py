"""Choose the one-row products' launch shapes by timing the captured batch-1 decode step.

Each product is tuned alone at its first launch (``triton_skinny._gemv``), which cannot see how
the products share the SMs in the step (``kernels/one_row_picks``). This tunes them together: a
coordinate descent from the current shapes, each product in turn trying every whole-slice shape
(the row's weights loaded before the wait on the previous kernel) with the others held at the
best so far, timed as CUDA-graph replays of the whole step; later passes retry each product's
four fastest. About a minute on an H100 for mhla-340m. ``python -m mhla_stream.cli.tune_decode``
saves the result for later processes.
"""
from __future__ import annotations

import time

import torch

from .cache import MHLACache
from .graphs import GraphDecoder
from .kernels import one_row_picks, triton_skinny
from .kernels.triton_common import pow2


def candidates(key: str) -> list[tuple]:
    """The whole-slice launch shapes for a product key ('N.. K.. G.. [folds] dtype'): rows a program
    BN, the padded row as BK, 2-8 warps, with or without a 128-register cap (more programs an SM)."""
    K = int(key.split()[1][1:])
    kp = pow2(K)
    rows = 2 if "swiglu" in key.split() else 1  # SwiGLU loads the gate and the up row
    return [(bn, kp, w, 1, mr) for bn in (1, 2, 4, 8, 16) for w in (2, 4, 8) for mr in (None, 128)
            if bn * kp * rows <= 32768 and not (mr and w == 8 and bn <= 2)]


def step_us(model, steps: int = 200, reps: int = 3) -> float:
    """Median over ``reps`` of the mean time of ``steps`` replays of a fresh batch-1 decode graph."""
    cache = MHLACache(model.new_state(1, device=model.device))
    dec = GraphDecoder(model, cache, plan=model.make_plan(1, cuda_graphs=True))
    dec.step(torch.full((1, 1), 3, dtype=torch.long, device=model.device))
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            dec.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / steps * 1e6)
    return sorted(times)[len(times) // 2]


def _current(key: str):
    """The shape the one-row tuner holds for ``key`` now, as a pick tuple (None if not launched)."""
    for kp in triton_skinny._gemv_sizes:
        for tkey, cfg in triton_skinny._gemv(kp).cache.items():
            if one_row_picks.product_key(tkey[1], tkey[2], tkey[3], *tkey[4:8], tkey[10]) == key:
                return (cfg.kwargs["BN"], cfg.kwargs["BK"], cfg.num_warps, cfg.num_stages, cfg.maxnreg)
    return None


def tune_one_row(model, passes: int = 2, log=print, limit: int | None = None) -> dict:
    """Coordinate descent over the one-row products of ``model``'s batch-1 decode step (CUDA, bf16
    or fp32, the fused step). Returns {"picks": {key: pick}, "start_us", "best_us", "trials"}; the
    process keeps the picks in force until ``forget``. Nothing is written to disk here. ``limit``:
    try only each product's first ``limit`` candidates (tests)."""
    if model.device.type != "cuda":
        raise RuntimeError("tuning the decode step needs the model on a CUDA device")
    plan = model.make_plan(1, cuda_graphs=True)
    if not getattr(plan, "fused_decode", False):
        raise RuntimeError(f"the batch-1 plan does not use the fused decode step ({plan.describe()}): "
                           "nothing to tune (MHLA_STREAM_FUSED_DECODE=0?)")
    forget()
    one_row_picks.used.clear()
    start = step_us(model)
    keys = sorted(one_row_picks.used)
    picks = {k: _current(k) for k in keys}
    if not keys or None in picks.values():
        raise RuntimeError("the decode step launched no one-row products to tune")
    one_row_picks._forced.update(picks)
    trials = [{"picks": dict(picks), "us": start}]
    log(f"start: {start:.1f} us a step ({1e6 / start:,.0f} tokens/s), {len(keys)} products")
    cands = {k: candidates(k)[:limit] for k in keys}
    try:
        for p in range(passes):
            for key in keys:
                timed = {}
                for cand in cands[key]:
                    one_row_picks._forced[key] = cand
                    triton_skinny.forget_one_row_tuning()
                    try:
                        timed[cand] = step_us(model)
                    except Exception as e:  # a shape this GPU cannot compile or launch: skipped
                        log(f"  {key} {cand}: skipped ({type(e).__name__}: {str(e)[:120]})")
                        continue
                    trials.append({"picks": dict(one_row_picks._forced), "us": timed[cand]})
                best = min(timed, key=timed.get)
                one_row_picks._forced[key] = best
                cands[key] = sorted(timed, key=timed.get)[:4]
                log(f"pass {p + 1}, {key}: {best} {timed[best]:.1f} us")
        triton_skinny.forget_one_row_tuning()
        best_us = step_us(model)
        picks = dict(one_row_picks._forced)
    except BaseException:
        forget()
        raise
    log(f"picked: {best_us:.1f} us a step ({1e6 / best_us:,.0f} tokens/s) against {start:.1f} at the start")
    return {"picks": picks, "start_us": start, "best_us": best_us, "trials": trials}


def forget() -> None:
    """Back to the picks files (or tuning alone): drop forced picks and the tuners' choices."""
    one_row_picks._forced.clear()
    triton_skinny.forget_one_row_tuning()
