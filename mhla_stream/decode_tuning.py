"""Choose the fused decode step's product launch shapes by timing the captured step.

Each skinny product is tuned alone at its first launch (``triton_skinny``), which cannot see how
the products share the SMs in the step (``kernels/step_picks``). This tunes them together: a
coordinate descent from the current shapes, each product in turn trying its candidate shapes
with the others held at the best so far, timed as CUDA-graph replays of the whole step; later
passes retry each product's four fastest. Candidates: at one row every whole-slice shape (the
row's weights loaded before the wait on the previous kernel), from two rows the tensor-core
form's tuned configurations at 4 and 8 warps. A few minutes on an H100 for mhla-340m at batch 1
and 8 (batches 2-16 share the row block of 16). ``python -m mhla_stream.cli.tune_decode`` saves
the result for later processes.
"""
from __future__ import annotations

import time

import torch

from .cache import MHLACache
from .graphs import GraphDecoder
import triton

from .kernels import step_picks, triton_skinny
from .kernels.skinny_shapes import whole_slice_shapes
from .kernels.triton_common import pow2


def candidates(key: str, use=None) -> list[tuple]:
    """Launch shapes to try for a product key ('[M16] N.. K.. G.. [folds] dtype'). One row: rows a
    program BN, the padded row as BK, 2-8 warps, with or without a 128-register cap (more programs
    an SM), or at 8 warps a 64-register one. More rows: the tensor-core tuner's configurations at 4
    and 8 warps that fit the launch (``use``: its recorded arguments, ``step_picks.used``), then the
    whole-slice shapes (``skinny_shapes.whole_slice_shapes``: one tile a program, all of it
    requested before the wait)."""
    parts = key.split()
    if parts[0].startswith("M"):
        pick, args, kwargs = use
        variants = [triton.Config(c.kwargs, num_warps=w, num_stages=c.num_stages) for c in triton_skinny._DOT
                    for w in (4, 8)]
        fit = [c for c in triton_skinny._waves(variants, args, **kwargs) if triton_skinny._fits_rows(c, args, kwargs)]
        whole = [p for p in whole_slice_shapes(args["K"], args["GS"], "swiglu" in parts)
                 if triton_skinny._fits_rows(step_picks.config(p), args, kwargs)]
        tuned = [step_picks.as_pick(c) for c in fit]
        return tuned + [p for p in whole if p not in tuned]
    kp = pow2(int(parts[1][1:]))
    rows = 2 if "swiglu" in parts else 1  # SwiGLU loads the gate and the up row
    # (a 64-register cap at 8 warps won batch 1's output projection: 413.1 -> 407.7 us, session 24)
    return [(bn, kp, w, 1, mr, 1) for bn in (1, 2, 4, 8, 16) for w in (2, 4, 8) for mr in (None, 64, 128)
            if bn * kp * rows <= 32768 and not (mr and w == 8 and bn <= 2) and (mr != 64 or w == 8)]


def step_us(model, batch: int = 1, steps: int = 200, reps: int = 3, fused_decode=None) -> float:
    """Median over ``reps`` of the mean time of ``steps`` replays of a fresh decode graph
    (``fused_decode``: the plan's choice, None: the default for the batch)."""
    cache = MHLACache(model.new_state(batch, device=model.device))
    dec = GraphDecoder(model, cache, plan=model.make_plan(batch, cuda_graphs=True, fused_decode=fused_decode))
    dec.step(torch.full((batch, 1), 3, dtype=torch.long, device=model.device))
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            dec.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / steps * 1e6)
    return sorted(times)[len(times) // 2]


def _current() -> dict:
    """{product key: the shape its tuner holds now}."""
    tuners = [triton_skinny._gemm] + [triton_skinny._gemv(kp) for kp in triton_skinny._gemv_sizes]
    out = {}
    for tuner in tuners:
        for k, cfg in tuner.cache.items():
            bm, n, kk, gs, norm, gate, swiglu, res, late, stats, dtype = k[:11]
            key = step_picks.product_key(n, kk, gs, norm, gate, swiglu, res, dtype, bm, late, stats)
            out[key] = step_picks.as_pick(cfg)
    return out


def tune_step(model, batch: int = 1, passes: int = 2, log=print, limit: int | None = None) -> dict:
    """Coordinate descent over the skinny products of ``model``'s fused decode step at ``batch``
    (CUDA). Returns {"picks": {key: pick}, "start_us", "best_us", "trials"}; the process keeps the
    picks in force until ``forget``. Nothing is written to disk here. ``limit``: try only each
    product's first ``limit`` candidates (tests)."""
    if model.device.type != "cuda":
        raise RuntimeError("tuning the decode step needs the model on a CUDA device")
    # (rows_picked: the fused step as it runs once its picks exist; from 17 rows it runs only then)
    plan = model.make_plan(batch, cuda_graphs=True, rows_picked=True)
    if not plan.fused_decode:
        raise RuntimeError(f"batch {batch} does not decode with the fused step ({plan.describe()}): nothing to tune "
                           "(the fused step runs up to 32 sequences, or MHLA_STREAM_FUSED_BATCH if set, and not with "
                           "MHLA_STREAM_FUSED_DECODE=0)")
    kept = dict(step_picks._forced)  # picks another batch's tuning left in force
    triton_skinny.forget_tuning()
    step_picks.used.clear()
    start = step_us(model, batch, fused_decode=True)
    uses = {k: u for k, u in step_picks.used.items() if k not in kept}
    picks = {k: v for k, v in _current().items() if k in uses}
    if not uses and step_picks.used:
        raise RuntimeError(f"batch {batch}'s products were tuned already in this process (a batch of the same row "
                           "block: 2-16 share one); tune one batch a row block")
    if not uses or set(picks) != set(uses):
        raise RuntimeError("the decode step launched no skinny products to tune")
    step_picks._forced.update(picks)
    trials = [{"picks": dict(picks), "us": start}]
    log(f"batch {batch}, start: {start:.1f} us a step ({batch * 1e6 / start:,.0f} tokens/s), {len(uses)} products")
    # the current shape first (a pass can only keep or improve it), then the others
    cands = {k: ([picks[k]] + [c for c in candidates(k, uses[k]) if c != picks[k]])[:limit] for k in sorted(uses)}
    try:
        for p in range(passes):
            for key in sorted(uses):
                timed = {}
                for cand in cands[key]:
                    step_picks._forced[key] = cand
                    triton_skinny.forget_tuning()
                    try:
                        timed[cand] = step_us(model, batch, fused_decode=True)
                    except Exception as e:  # a shape this GPU cannot compile or launch: skipped
                        log(f"  {key} {cand}: skipped ({type(e).__name__}: {str(e)[:120]})")
                        continue
                    trials.append({"picks": {k: step_picks._forced[k] for k in uses}, "us": timed[cand]})
                if not timed:
                    raise RuntimeError(f"no launch shape of {key} ran")
                best = min(timed, key=timed.get)
                step_picks._forced[key] = best
                cands[key] = sorted(timed, key=timed.get)[:4]
                log(f"pass {p + 1}, {key}: {best} {timed[best]:.1f} us")
        triton_skinny.forget_tuning()
        best_us = step_us(model, batch, fused_decode=True)
        picks = {k: step_picks._forced[k] for k in uses}
    except BaseException:
        forget()
        step_picks._forced.update(kept)
        raise
    log(f"batch {batch}, picked: {best_us:.1f} us a step ({batch * 1e6 / best_us:,.0f} tokens/s) against "
        f"{start:.1f} at the start")
    return {"picks": picks, "start_us": start, "best_us": best_us, "trials": trials}


def forget() -> None:
    """Back to the picks files (or tuning alone): drop forced picks and the tuners' choices."""
    step_picks._forced.clear()
    triton_skinny.forget_tuning()
