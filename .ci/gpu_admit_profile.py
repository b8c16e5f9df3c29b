"""Where a short prompt's forward spends device time (GPU): the admission of a 128-token prompt costs
3.05 ms at batch 1 and 13.9 ms for 8 prompts (gpu_host_costs.py, session 9), against 0.7 ms for a whole
decode step. Profiles one eager forward of B fresh prompts of T tokens (B in $BATCHES, T in $LENGTHS) and
prints the kernels grouped by name: count and device time."""
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mhla_stream import MHLACache
from mhla_stream.cli.common import load_model
from mhla_stream.cli.profile_model import _kernel_table, _print

model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
with torch.inference_mode():
    for T in [int(t) for t in os.environ.get("LENGTHS", "128").split(",")]:
        for B in [int(b) for b in os.environ.get("BATCHES", "1,8").split(",")]:
            ids = torch.randint(3, model.config.vocab_size, (B, T), device="cuda")
            run = lambda: model(input_ids=ids, past_key_values=MHLACache(model.new_state(B)), use_cache=True, logits_to_keep=1)
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                run()
            torch.cuda.synchronize()
            _print(f"forward of {B} fresh prompts of {T} tokens (eager)", _kernel_table(prof, 1),
                   (time.perf_counter() - t0) / 5 * 1e6, limit=30)
