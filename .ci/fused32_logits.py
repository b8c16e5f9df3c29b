"""Session 22 check (GPU): mhla-340m (random weights, bf16) at batch 32, the fused step with the
shipped whole-slice picks against the batched (cuBLAS) step and the unfused step, 100 decode
steps from a 100-token prompt (crossing the block close at 128). Prints the relative logit
difference per step (max, mean) and the greedy agreement."""
import json
import os
import sys

import torch

from mhla_stream import MHLACache
from mhla_stream.cli.common import load_model

torch.manual_seed(0)
model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
B, P, S = int(os.environ.get("B", 32)), 100, 100
ids = torch.randint(3, 32000, (B, P + S), device="cuda")
plans = {name: model.make_plan(B, cuda_graphs=False, fused_decode=name == "fused", batched_decode=name == "batched")
         for name in ("fused", "batched", "unfused")}
assert plans["fused"].fused_decode and plans["batched"].batched_decode
logits = {}
with torch.inference_mode():
    for name, plan in plans.items():
        cache = MHLACache(model.new_state(B, device="cuda"))
        model(ids[:, :P], past_key_values=cache, plan=plan)
        logits[name] = torch.stack([model(ids[:, t:t + 1], past_key_values=cache, plan=plan).logits[:, 0].float()
                                    for t in range(P, P + S)])
out = {}
for a, b in (("fused", "unfused"), ("batched", "unfused"), ("fused", "batched")):
    x, y = logits[a], logits[b]
    rel = ((x - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)).tolist()
    agree = (x.argmax(-1) == y.argmax(-1)).float().mean().item()
    out[f"{a}_vs_{b}"] = {"rel_max": max(rel), "rel_mean": sum(rel) / len(rel), "argmax_agree": agree}
    print(a, "vs", b, out[f"{a}_vs_{b}"], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
