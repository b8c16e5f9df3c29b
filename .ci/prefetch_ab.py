"""Decode of mhla-340m (random weights, bf16) with MHLA_STREAM_PREFETCH off and on, interleaved in
one process (the switch is flipped on the kernel module between runs; each run captures its own
decode graph), at batch 1 (the skinny kernels' prefetch of the next projection) and at the
batches given (the prefetch kernel after the operator). Prints decode tokens/s per run.

    python .ci/prefetch_ab.py [ROUNDS] [BATCHES]      e.g. python .ci/prefetch_ab.py 2 1,32
"""
import sys

import torch

from mhla_stream.cli.bench_runs import run_one
from mhla_stream.cli.common import load_model
from mhla_stream.kernels import triton_skinny

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,32").split(",")]
m = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
print(f"# {torch.cuda.get_device_name()}, mhla-340m random weights, bf16, prompt 512, 512 new tokens", flush=True)
for b in batches:
    for pf in (False, True):  # warm-up: compile and tune both variants before timing
        triton_skinny.PREFETCH = pf
        run_one("mhla", m, 128, 2, b, 256, "cuda", True)
    for r in range(rounds):
        for pf in (False, True):
            triton_skinny.PREFETCH = pf
            row = run_one("mhla", m, 512, 512, b, 512, "cuda", True)
            print(f"batch {b} round {r} prefetch={int(pf)}: decode {row['decode_tok_s']:.0f} tok/s "
                  f"({row['decode_ms_per_step']:.3f} ms a step)", flush=True)
