"""Session 22 probe (GPU): the decode kernel's launch shape (column block BV, warps) in the fused
step at batch 8 and 32, now that the fused step runs up to 32 rows with the whole-slice product
shapes (the default shapes were chosen alone or in the batched step, sessions 11-18). Timing only;
each shape computes the same sums (the kernel's tests cover BV 16-64)."""
import functools
import json
import os
import sys

import torch

import mhla_stream.modeling as modeling
from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import step_us

model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
orig = modeling.decode_into
out = {}
for batch in [int(b) for b in os.environ.get("BATCHES", "8,32").split(",")]:
    rows = []
    shapes = [(None, 4)] + [(bv, w) for bv in (16, 32, 64, 128) for w in (2, 4, 8)] + [(None, 4)]
    if os.environ.get("SHAPES"):  # e.g. "None:4 None:2" (session 24)
        shapes = [(None if a == "None" else int(a), int(b)) for a, b in (c.split(":") for c in os.environ["SHAPES"].split())]
    for bv, w in shapes:
        modeling.decode_into = functools.partial(orig, block_v=bv, num_warps=w)
        try:
            us = step_us(model, batch, fused_decode=True)
        except Exception as e:
            print(batch, bv, w, "failed", type(e).__name__, str(e)[:120], flush=True)
            continue
        rows.append({"block_v": bv, "num_warps": w, "us": us})
        print(batch, bv, w, f"{us:.1f} us", flush=True)
    modeling.decode_into = orig
    out[batch] = rows
    json.dump(out, open(sys.argv[1], "w"), indent=1)
