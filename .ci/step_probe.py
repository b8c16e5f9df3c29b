"""Session 23 probe (GPU): the captured decode step (``decode_tuning.step_us``) at each case of
CASES ("batch:fused ...", fused 1 / 0), ROUNDS times each, for A/B runs of kernel builds in
separate processes. Appends {"label", "batch", "fused", "us"} rows to the JSON file argv[1]."""
import json
import os
import sys

import torch

from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import step_us

path, label = sys.argv[1], sys.argv[2]
model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
CASES = [tuple(int(v) for v in c.split(":")) for c in os.environ.get("CASES", "1:1 8:1 16:1 24:1 32:1 32:0").split()]
rows = json.load(open(path)) if os.path.exists(path) else []
for _ in range(int(os.environ.get("ROUNDS", "2"))):
    for batch, fused in CASES:
        us = step_us(model, batch, fused_decode=bool(fused))
        rows.append({"label": label, "batch": batch, "fused": bool(fused), "us": round(us, 1)})
        print(f"{label:>10} batch {batch:>3} {'fused' if fused else 'batched'}: {us:8.1f} us "
              f"({batch * 1e6 / us:,.0f} tok/s)", flush=True)
json.dump(rows, open(path, "w"), indent=1)
