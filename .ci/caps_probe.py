"""Session 24 probe (GPU): register caps on the shipped step picks, then on the decode kernel.

Question (session 23): at 32 rows the products' programs hold 100-182 registers a thread and
fill the SMs' register files, so the next kernel's programs (launched early by PDL) cannot be
resident until the current ones exit, and cannot request their weights early as at one row.
A cap (``maxnreg``) leaves room on each SM at the price of spills. For each batch in BATCHES:
the step as shipped, one pass of coordinate descent over each product's current pick with the
caps CAPS, then the decode kernel with the caps DCAPS at 4 and 2 warps, the step with the
winners twice. Timed in the captured step (``decode_tuning.step_us``); every cap computes the
same sums. Writes OUT/caps_probe.json and OUT/caps_picks.json (the products' winners)."""
import functools
import json
import os
import sys
import time

import torch

import mhla_stream.modeling as modeling
from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import _current, forget, step_us
from mhla_stream.kernels import step_picks, triton_skinny

out_dir = sys.argv[1]
BATCHES = [int(b) for b in os.environ.get("BATCHES", "32,8,1").split(",")]
CAPS = [int(c) for c in os.environ.get("CAPS", "64,80,96,112,128,160").split(",")]
DCAPS = [int(c) for c in os.environ.get("DCAPS", "64,80,96").split(",")]
model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
orig_decode = modeling.decode_into
T0 = time.time()


def timed(batch):
    try:
        return step_us(model, batch, fused_decode=True)
    except Exception as e:
        print(f"  failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


results, all_picks = {}, {}
for batch in BATCHES:
    forget()
    step_picks.used.clear()
    start = timed(batch)
    keys = sorted(k for k in step_picks.used if k in _current())
    current = {k: v for k, v in _current().items() if k in keys}
    print(f"[{time.time() - T0:.0f} s] batch {batch}: step {start:.1f} us; picks {current}", flush=True)
    rec = results[batch] = {"start_us": start, "start_picks": {k: list(v) for k, v in current.items()},
                            "trials": [], "decode_trials": []}
    step_picks._forced.update(current)
    for key in keys:
        best, best_us = current[key], None
        caps = [current[key][4]] + [c for c in [None] + CAPS if c != current[key][4]]  # the current pick first
        for cap in caps:
            cand = current[key][:4] + (cap,) + current[key][5:]
            step_picks._forced[key] = cand
            triton_skinny.forget_tuning()
            us = timed(batch)
            rec["trials"].append({"key": key, "pick": list(cand), "us": us})
            print(f"  {key} cap {cap}: {us}", flush=True)
            if us is not None and (best_us is None or us < best_us):
                best, best_us = cand, us
        step_picks._forced[key] = best
        triton_skinny.forget_tuning()
        print(f"[{time.time() - T0:.0f} s] {key}: best {best} {best_us:.1f} us", flush=True)
    dbest, dbest_us = (4, None), None
    for warps in (4, 2):
        for cap in [None] + DCAPS:
            modeling.decode_into = functools.partial(orig_decode, num_warps=warps, maxnreg=cap)
            us = timed(batch)
            rec["decode_trials"].append({"num_warps": warps, "maxnreg": cap, "us": us})
            print(f"  decode kernel {warps} warps cap {cap}: {us}", flush=True)
            if us is not None and (dbest_us is None or us < dbest_us):
                dbest, dbest_us = (warps, cap), us
    modeling.decode_into = functools.partial(orig_decode, num_warps=dbest[0], maxnreg=dbest[1])
    rec["final_us"] = [timed(batch) for _ in range(2)]
    modeling.decode_into = orig_decode
    rec["final_picks"] = {k: list(step_picks._forced[k]) for k in keys}
    rec["decode_best"] = list(dbest)
    print(f"[{time.time() - T0:.0f} s] batch {batch}: {start:.1f} -> {rec['final_us']} us (decode {dbest})",
          flush=True)
    all_picks.update({k: step_picks._forced[k] for k in keys})
    json.dump(results, open(os.path.join(out_dir, "caps_probe.json"), "w"), indent=1)
forget()
step_picks.write(os.path.join(out_dir, "caps_picks.json"), torch.cuda.get_device_name(0), all_picks,
                 note="session 24 caps probe")
print("done", flush=True)
