"""Session 22 probe (GPU): batches 16 and 24 (between the row blocks' ends), fused against batched,
and the decode kernel's open-block token form from 16 rows instead of 32 (``TOKENS_FROM``)."""
import json
import os
import sys

import torch

from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import step_us
from mhla_stream.kernels import triton_decode

model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
rows = []
CASES = [tuple(int(v) for v in c.split(":")) for c in os.environ.get("CASES", "16:1 24:1 24:0 32:1").split()]
for tokens_from in [int(t) for t in os.environ.get("FROM", "32,16,32").split(",")]:
    triton_decode.TOKENS_FROM = tokens_from
    for batch, fused in CASES:
        fused = bool(fused)
        us = step_us(model, batch, fused_decode=fused)
        rows.append({"tokens_from": tokens_from, "batch": batch, "fused": fused, "us": us})
        print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
