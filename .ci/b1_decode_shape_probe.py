"""Session 20 probe (GPU): the batch-1 decode kernel's launch shape (value columns a program, warps,
register cap) timed in the captured step, with the shipped one-row picks in force. Timing only."""
import itertools
import json
import sys

import torch

import mhla_stream.modeling as modeling
from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import step_us

SHAPE = {}
_orig = modeling.decode_into


def shaped(*a, **k):
    if a[1].shape[0] == 1 and SHAPE:
        k.update(block_v=SHAPE["BV"], num_warps=SHAPE["w"], maxnreg=SHAPE["mr"])
    return _orig(*a, **k)


modeling.decode_into = shaped
model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
rows = [{"shape": "default (BV 16, 4 warps)", "us": step_us(model)}]
print(rows[0], flush=True)
for bv, w, mr in itertools.product((8, 16, 32, 64), (1, 2, 4, 8), (None, 128)):
    if mr and w >= 4:
        continue
    SHAPE.update(BV=bv, w=w, mr=mr)
    try:
        us = step_us(model)
    except Exception as e:
        print(bv, w, mr, "failed", type(e).__name__, str(e)[:100], flush=True)
        continue
    rows.append({"shape": dict(SHAPE), "us": us})
    print(f"BV {bv} warps {w} maxnreg {mr}: {us:.1f} us", flush=True)
SHAPE.clear()
rows.append({"shape": "default again", "us": step_us(model)})
print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
