"""Session 21 probe (GPU): the batch-1 MLP in one launch (``kernels/triton_mlp``) against the two
products, timed in the captured step with the shipped picks in force; then the one-launch MLP's
own launch shapes timed in the step; then the logits of both forms over 200 greedy steps."""
import json
import sys

import torch

from mhla_stream import MHLACache
from mhla_stream.cli.common import load_model
from mhla_stream.decode_tuning import candidates, step_us
from mhla_stream.kernels import step_picks, triton_mlp, triton_skinny

out = {}
model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)


def timed(on: bool) -> float:
    triton_mlp.ENABLED = on
    return step_us(model)


ab = []
for rnd in range(3):
    for on in (False, True):
        ab.append({"one_launch_mlp": on, "us": timed(on)})
        print(ab[-1], flush=True)
out["ab_tuned_alone"] = ab
print("MLP tuned alone:", triton_skinny.tuned_configs(), flush=True)

D = model.config.hidden_size
key = step_picks.product_key(model.config.intermediate_size, D, D, True, False, True, True, torch.bfloat16, down=True)
print("key", key, flush=True)
sweep = []
triton_mlp.ENABLED = True
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
out["sweep"], out["best"] = sweep, best
step_picks._forced[key] = best["pick"]
triton_skinny.forget_tuning()
ab2 = []
for rnd in range(3):
    for on in (False, True):
        ab2.append({"one_launch_mlp": on, "us": timed(on)})
        print("best pick", ab2[-1], flush=True)
out["ab_best_pick"] = ab2

# logits: the two forms from one prefilled prompt, 200 greedy steps each, compared step by step
torch.manual_seed(0)
ids = torch.randint(3, model.config.vocab_size, (1, 300), device="cuda")
plan = model.make_plan(1, cuda_graphs=False)
errs, agree = [], 0
with torch.inference_mode():
    caches = []
    for on in (False, True):
        triton_mlp.ENABLED = on
        c = MHLACache(model.new_state(1, device="cuda"))
        model(ids[:, :100], past_key_values=c, plan=plan)
        caches.append(c)
    for t in range(100, 300):
        lg = []
        for on, c in zip((False, True), caches):
            triton_mlp.ENABLED = on
            lg.append(model(ids[:, t:t + 1], past_key_values=c, plan=plan).logits.float())
        errs.append(float((lg[1] - lg[0]).norm() / lg[0].norm()))
        agree += int(lg[0].argmax() == lg[1].argmax())
out["logits_rel_err_max"], out["logits_rel_err_mean"] = max(errs), sum(errs) / len(errs)
out["argmax_agree"] = f"{agree}/200"
print({k: out[k] for k in ("logits_rel_err_max", "logits_rel_err_mean", "argmax_agree")}, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
