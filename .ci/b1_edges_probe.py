"""Session 21 probe (GPU): the batch-1 step's edges. A/B in the captured step of (1) the LM head as
a one-row skinny product with the final norm folded in (``modeling.FOLD_HEAD``) and (2) the RoPE
angles computed in each decode kernel from its position (``modeling.ROPE_IN_KERNEL``); then the
head product's launch shapes timed in the step. Timing only (the GPU tests check the logits).
QUICK=1: the RoPE A/B alone, with the folded head (call6: fp32 cos / sin of an fp64-reduced angle;
call2 measured float64 cos / sin, ``rope_in_kernel_attempt.patch``)."""
import itertools
import json
import os
import sys

import torch

import mhla_stream.modeling as modeling
from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import candidates, step_us
from mhla_stream.kernels import step_picks, triton_skinny

model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
out = {}


def ab(tag):
    rows = []
    for rnd in range(3):
        for head, rope in itertools.product((False, True), (False, True)):
            modeling.FOLD_HEAD, modeling.ROPE_IN_KERNEL = head, rope  # (ROPE_IN_KERNEL: rope_in_kernel_attempt.patch)
            rows.append({"fold_head": head, "rope_in_kernel": rope, "us": step_us(model)})
            print(tag, rows[-1], flush=True)
    modeling.FOLD_HEAD = modeling.ROPE_IN_KERNEL = True
    return rows


if os.environ.get("QUICK") == "1":
    rows = []
    for rnd in range(3):
        for rope in (False, True):
            modeling.ROPE_IN_KERNEL = rope
            rows.append({"rope_in_kernel": rope, "us": step_us(model)})
            print("quick", rows[-1], flush=True)
    json.dump({"ab_rope_fp32_sincos": rows}, open(sys.argv[1], "w"), indent=1)
    sys.exit(0)
out["ab_head_tuned_alone"] = ab("alone")
D, V = model.config.hidden_size, model.config.vocab_size
key = step_picks.product_key(V, D, D, True, False, False, False, torch.bfloat16)
print("head tuned alone:", {k: v for k, v in triton_skinny.tuned_configs().items() if f", {V}, " in k}, flush=True)
sweep = []
for cand in candidates(key):
    step_picks._forced[key] = cand
    triton_skinny.forget_tuning()
    try:
        us = step_us(model)
    except Exception as e:
        print(cand, "failed", type(e).__name__, str(e)[:120], flush=True)
        continue
    sweep.append({"pick": cand, "us": us})
    print(f"{cand}: {us:.1f} us", flush=True)
best = min(sweep, key=lambda r: r["us"])
out["head_key"], out["sweep"], out["best"] = key, sweep, best
print("best", best, flush=True)
step_picks._forced[key] = best["pick"]
triton_skinny.forget_tuning()
out["ab_head_best_pick"] = ab("best pick")
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
