"""Session 22 probe (GPU): the fused step's tensor-core products at 8 and 32 rows with "whole
slice" launch shapes, whose programs hold one weight tile each (BK x SPLIT covers K), so that all
of a product's weight is requested before it waits on the previous kernel, as the one-row
products do. The tuner's shapes loop over 2-16 tiles a program and request only the first early.

For each batch in BATCHES (default 8,32): the fused step as shipped (picks or tuned alone), one
pass of coordinate descent over the products with the current shape plus the whole-slice shapes
(timed in the captured step, ``decode_tuning.step_us``), the step with the winners, and at 32 the
batched (cuBLAS) step in the same process. Writes the winners to OUT/rows_picks.json.
Timing only: the GPU tests check the logits with these picks (MHLA_STREAM_STEP_PICKS)."""
import json
import os
import sys
import time

import torch

from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import _current, forget, step_us
from mhla_stream.kernels import step_picks, triton_skinny
from mhla_stream.kernels.skinny_shapes import whole_slice_shapes

out_dir = sys.argv[1]
BATCHES = [int(b) for b in os.environ.get("BATCHES", "8,32").split(",")]
model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
T0 = time.time()


# CAPS (e.g. "128,96"): each whole-slice shape also with these register caps (maxnreg), so that a
# product's programs leave room on an SM for the next product's to start and request their
# weights early (session 23's question: at 32 rows the picks hold 100-182 registers a thread)
CAPS = [int(c) for c in os.environ.get("CAPS", "").split(",") if c]


def whole_slice(key: str) -> list[tuple]:
    """The whole-slice shapes (``skinny_shapes.whole_slice_shapes``) for a 'M.. N.. K.. G..' key,
    and with CAPS each of them register-capped."""
    parts = key.split()
    shapes = whole_slice_shapes(int(parts[2][1:]), int(parts[3][1:]), "swiglu" in parts)
    return shapes + [(bn, bk, w, st, cap, sp) for bn, bk, w, st, _, sp in shapes for cap in CAPS]


def timed(batch):
    try:
        return step_us(model, batch, fused_decode=True)
    except Exception as e:
        print(f"  failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


results = {}
all_picks = {}
for batch in BATCHES:
    forget()
    step_picks.used.clear()
    start = step_us(model, batch, fused_decode=True)
    keys = sorted(k for k in step_picks.used if k.startswith("M"))
    current = {k: v for k, v in _current().items() if k in keys}
    print(f"[{time.time() - T0:.0f} s] batch {batch}: fused step {start:.1f} us ({batch * 1e6 / start:,.0f} tok/s); "
          f"products {current}", flush=True)
    rec = {"start_us": start, "start_picks": {k: list(v) for k, v in current.items()}, "trials": []}
    if batch > 16:
        rec["batched_us"] = step_us(model, batch, fused_decode=False)
        print(f"  batched step {rec['batched_us']:.1f} us", flush=True)
    step_picks._forced.update(current)
    for key in keys:
        best, best_us = current[key], None
        for cand in [current[key]] + [c for c in whole_slice(key) if c != current[key]]:
            step_picks._forced[key] = cand
            triton_skinny.forget_tuning()
            us = timed(batch)
            rec["trials"].append({"key": key, "pick": list(cand), "us": us})
            print(f"  {key} {cand}: {us}", flush=True)
            if us is not None and (best_us is None or us < best_us):
                best, best_us = cand, us
        step_picks._forced[key] = best
        results[batch] = rec
        json.dump(results, open(os.path.join(out_dir, "rows_probe.json"), "w"), indent=1)
        print(f"[{time.time() - T0:.0f} s] {key}: best {best} {best_us:.1f} us", flush=True)
    triton_skinny.forget_tuning()
    rec["final_us"] = [step_us(model, batch, fused_decode=True) for _ in range(2)]
    rec["final_picks"] = {k: list(step_picks._forced[k]) for k in keys}
    if batch > 16:
        rec["batched_us_after"] = step_us(model, batch, fused_decode=False)
    print(f"[{time.time() - T0:.0f} s] batch {batch}: {start:.1f} -> {rec['final_us']} us; batched "
          f"{rec.get('batched_us')} / {rec.get('batched_us_after')}", flush=True)
    results[batch] = rec
    all_picks.update({k: step_picks._forced[k] for k in keys})
    json.dump(results, open(os.path.join(out_dir, "rows_probe.json"), "w"), indent=1)
forget()
step_picks.write(os.path.join(out_dir, "rows_picks.json"), torch.cuda.get_device_name(0), all_picks,
                 note="session 22 rows probe")
print("done", flush=True)
