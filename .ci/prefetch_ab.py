"""Batch-1 decode of mhla-340m (random weights, bf16) with the skinny products' L2 prefetch off
and on, interleaved in one process (the switch is flipped on the kernel module between runs,
each run capturing its own decode graph). Prints decode tokens/s per run."""
import sys

import torch

from mhla_stream.cli.bench_runs import run_one
from mhla_stream.cli.common import load_model
from mhla_stream.kernels import triton_skinny

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
m = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
run_one("mhla", m, 128, 2, 1, 256, "cuda", True)  # warm-up: compile and tune (prefetch off)
triton_skinny.PREFETCH = True
run_one("mhla", m, 128, 2, 1, 256, "cuda", True)  # and with it on
for r in range(rounds):
    for pf in (False, True):
        triton_skinny.PREFETCH = pf
        row = run_one("mhla", m, 512, 512, 1, 512, "cuda", True)
        print(f"round {r} prefetch={int(pf)}: decode {row['decode_tok_s']:.0f} tok/s "
              f"({row['decode_ms_per_step']:.3f} ms/token)", flush=True)
