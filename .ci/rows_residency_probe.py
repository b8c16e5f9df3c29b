"""Session 20 probe (GPU): the fused decode step at B > 1 rows with its tensor-core skinny products'
launch shapes chosen in the captured step (coordinate descent, as for one row), against the batched
step (cuBLAS) in the same process. Timing only.

    MHLA_STREAM_FUSED_BATCH=64 python .ci/rows_residency_probe.py --batch 8,32 --json OUT.json
"""
import argparse
import json
import time

import torch
import triton

from mhla_stream import decode_tuning as tuning
from mhla_stream.cli.common import load_model
from mhla_stream.kernels import triton_skinny as ts

FORCED, SEEN, TUNERS = {}, {}, {}


def product(a, kw):
    return "gateup" if kw.get("SWIGLU") else ("down" if a["K"] > 2048 else "oproj" if kw.get("RESIDUAL") else "qkvg")


def prune(configs, named_args, **kw):
    name = product(named_args, kw)
    SEEN[name] = (dict(named_args), dict(kw))
    if name in FORCED:
        bn, bk, sp, w = FORCED[name]
        return [triton.Config({"BN": bn, "BK": bk, "SPLIT": sp}, num_warps=w, num_stages=3)]
    return ts._waves(configs, named_args, **kw)


def gemm():
    key = tuple(sorted(FORCED.items()))
    if key not in TUNERS:
        TUNERS[key] = triton.autotune(configs=ts._DOT, key=ts._KEY, do_bench=ts.graph_bench,
                                      prune_configs_by={"early_config_prune": prune})(ts._skinny_kernel)
    return TUNERS[key]


def step_us(model, B, fused):
    return tuning.step_us(model, B, steps=100, fused_decode=fused)


def candidates(name):
    a, kw = SEEN[name]
    allc = [triton.Config(c.kwargs, num_warps=w, num_stages=3) for c in ts._DOT for w in (4, 8)]
    return [(c.kwargs["BN"], c.kwargs["BK"], c.kwargs["SPLIT"], c.num_warps) for c in ts._waves(allc, a, **kw)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
    results = {}
    t0 = time.time()
    for B in map(int, args.batch.split(",")):
        FORCED.clear()
        batched = step_us(model, B, False)
        import mhla_stream.kernels.triton_skinny as tsm
        tsm._gemm = gemm()  # a tuner of this probe's: records each product's launch arguments
        tuned = step_us(model, B, True)
        print(f"[{time.time() - t0:.0f} s] batch {B}: batched step {batched:.1f} us, fused step (tuned alone) {tuned:.1f} us",
              flush=True)
        start = {}
        for key, cfg in tsm._gemm.cache.items():
            kw = dict(zip(ts._KEY, key))
            name = product(kw, kw)
            start[name] = (cfg.kwargs["BN"], cfg.kwargs["BK"], cfg.kwargs["SPLIT"], cfg.num_warps)
        FORCED.update(start)
        rows, top = [], {}
        for p in range(2):
            for name in ("gateup", "qkvg", "oproj", "down"):
                timed = {}
                for cand in (candidates(name) if p == 0 else top[name]):
                    FORCED[name] = cand
                    tsm._gemm = gemm()
                    try:
                        timed[cand] = step_us(model, B, True)
                    except Exception as e:
                        print(f"  {name} {cand}: {type(e).__name__} {str(e)[:100]}", flush=True)
                        continue
                    rows.append({"forced": str(FORCED), "us": timed[cand]})
                FORCED[name] = min(timed, key=timed.get)
                top[name] = sorted(timed, key=timed.get)[:4]
                print(f"[{time.time() - t0:.0f} s] batch {B} pass {p} {name}: {FORCED[name]} {timed[FORCED[name]]:.1f} us"
                      f" ({len(timed)} shapes)", flush=True)
        tsm._gemm = gemm()
        best = step_us(model, B, True)
        batched2 = step_us(model, B, False)
        print(f"batch {B}: fused step picked in the step {best:.1f} us ({B * 1e6 / best:,.0f} tok/s), tuned alone "
              f"{tuned:.1f}, batched step {batched:.1f} / {batched2:.1f} ({B * 1e6 / batched2:,.0f} tok/s); {FORCED}",
              flush=True)
        results[B] = {"batched_us": [batched, batched2], "fused_alone_us": tuned, "fused_picked_us": best,
                      "picks": {k: list(v) for k, v in FORCED.items()}, "start": {k: list(v) for k, v in start.items()},
                      "trials": rows}
        json.dump(results, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
