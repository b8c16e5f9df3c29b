"""Host and device cost of each StepRunner call at the 340M shape (bf16, random weights): what one
engine turn pays for a decode step, an admission (staging zero, a prompt piece, the copy into a
slot, the first pick), and a batched admission of k prompts of 128 tokens (the forward and the
placement into slots apart: the per-request cost that serve_bench's bursts pay). Host = time until
the call returns (launches only); wall = per call with the device kept busy by a run of the same call,
synchronised at the end."""
import json
import os
import sys
import time

import torch

from mhla_stream.cli.common import load_model
from mhla_stream.serve.runner import StepRunner


def cost(fn, n=40):
    fn()
    torch.cuda.synchronize()
    host = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    host.sort()
    return {"host_us": round(1e6 * host[len(host) // 2], 1), "wall_us": round(1e6 * wall, 1)}


_MODE = torch.inference_mode()  # as the engine thread runs
_MODE.__enter__()
model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
rows = {}
for B in [int(b) for b in os.environ.get("BATCHES", "32,64").split(",")]:
    r = StepRunner(model, B, 1024, prefill_piece=256, admit_batch=8)
    out = {}
    out["decode_host_tokens"] = cost(lambda: r.decode({s: 7 for s in range(B)}))
    out["decode_auto"] = cost(lambda: r.decode({}, auto=list(range(B))))
    out["decode_auto_tokens_read"] = cost(lambda: r.decode({}, auto=list(range(B))).tokens())
    out["stage_begin"] = cost(lambda: r.stage_begin(None))
    for n in (128, 256):
        ids = list(range(100, 100 + n))
        out[f"stage_feed_{n}"] = cost(lambda: r.stage_feed(ids))
    out["stage_finish"] = cost(lambda: r.stage_finish(B - 1))
    lg = r.stage_feed(list(range(100, 228)))
    out["pick_first"] = cost(lambda: r.pick_first(0, lg))
    out["admit_128_total"] = cost(lambda: (r.stage_begin(None), r.stage_finish(r.max_batch - 1),
                                           r.pick_first(0, r.stage_feed(list(range(100, 228))))))
    st = r.stager
    if st is not None:  # batched admission: the whole call, then its forward graph and its placement alone
        for k in (1, 2, 8):
            items = [(s, None, list(range(100 + s, 228 + s))) for s in range(k)]
            out[f"admit_{k}x128"] = cost(lambda: r.admit(items))
            kb = next(b for b in st.buckets if b >= k)
            if (kb, 128) in st.graphs:
                out[f"admit_{k}x128_forward"] = cost(lambda: st.graphs[(kb, 128)][0].replay())
            for whole in (False, True):  # fresh prompts (the touched ring slots), a stored session (whole rows)
                if st._placers[(k, whole)] is not None:
                    out[f"admit_{k}x128_place{'_whole' if whole else ''}"] = cost(lambda: st._placers[(k, whole)].replay())
    rows[B] = out
    print(f"batch {B}:", json.dumps(out), flush=True)
    del r
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "host_costs.json"), "w"), indent=1)
