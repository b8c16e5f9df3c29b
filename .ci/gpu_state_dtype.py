"""GPU check of the bf16 state storage (``state_dtype``) at the mhla-340m shape: random weights in
bf16 on CUDA, a random prompt, then greedy decoding with an fp32 ring; the same tokens are fed to
a second stream whose ring is bf16 (teacher forcing, so both see the same inputs). Prints the
max / mean absolute logit difference after the prompt and over the decoded steps, and the state
MiB per sequence of both. JSON goes to $OUT/gpu_state_dtype.json when $OUT is set.

    python .ci/gpu_state_dtype.py                  # H100: ~5k-token prompt, 200 decoded tokens
    python .ci/gpu_state_dtype.py --tiny           # CPU smoke run (mhla-tiny, short prompt)

(needs the package installed, e.g. ``pip install -e .`` as the .ci/gpu_*.sh scripts do)
"""
import argparse
import json
import os
import sys
import time

import torch

from mhla_stream import MHLACache
from mhla_stream.cli.common import load_model  # the same random-weights model as mhla-bench
from mhla_stream.graphs import prefill


def step(model, cache, x, plan):
    """One decoded token: the next-token logits [vocab] in fp32."""
    return model(input_ids=x, past_key_values=cache, use_cache=True, plan=plan).logits[0, -1].float()


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="mhla-tiny on the CPU, fp32 (a smoke test)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    if args.tiny:
        name, device, dtype, prompt_len, new_tokens = "mhla-tiny", "cpu", torch.float32, 150, 40
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny on a CPU")
        name, device, dtype, prompt_len, new_tokens = "mhla-340m", "cuda", torch.bfloat16, 5000, 200
    prompt_len = args.prompt_len or prompt_len
    new_tokens = args.new_tokens or new_tokens
    model = load_model(name, None, True, device, dtype)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=gen).to(device)

    runs = {}
    tokens = None
    for state_dtype in ("float32", "bfloat16"):
        plan = model.make_plan(1, state_dtype=state_dtype, cuda_graphs=False)
        cache = MHLACache(model.new_state(1, state_dtype=state_dtype, device=device))
        t0 = time.perf_counter()
        logits = [prefill(model, cache, ids, args.chunk, plan)[0].float()]
        steps = []
        if tokens is None:  # the fp32-ring run picks the tokens (greedy); the bf16 run is fed the same ones
            tokens = []
            for _ in range(new_tokens):
                tokens.append(int(logits[-1].argmax()))
                x = torch.tensor([[tokens[-1]]], device=device)
                logits.append(step(model, cache, x, plan))
        else:
            for tok in tokens:
                logits.append(step(model, cache, torch.tensor([[tok]], device=device), plan))
        if device == "cuda":
            torch.cuda.synchronize()
        steps = torch.stack(logits)  # [1 + new_tokens, vocab]: after the prompt, then after each token
        runs[state_dtype] = {"logits": steps, "state_bytes": cache.nbytes, "seconds": time.perf_counter() - t0,
                             "plan": plan.describe()}

    diff = (runs["bfloat16"]["logits"] - runs["float32"]["logits"]).abs()
    per_step_max = diff.max(-1).values
    agree = (runs["bfloat16"]["logits"].argmax(-1) == runs["float32"]["logits"].argmax(-1)).float().mean()
    result = {
        "model": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
        "date": time.strftime("%Y-%m-%d"), "prompt_len": prompt_len, "new_tokens": new_tokens,
        "after_prompt": {"max_abs": float(diff[0].max()), "mean_abs": float(diff[0].mean())},
        "decode": {"max_abs": float(diff[1:].max()), "mean_abs": float(diff[1:].mean()),
                   "max_abs_last_step": float(per_step_max[-1])},
        "greedy_agreement": float(agree),
        "logit_scale": float(runs["float32"]["logits"].abs().mean()),
        "state_MiB_per_sequence": {k: r["state_bytes"] / 2**20 for k, r in runs.items()},
        "sessions_per_80GB_state_only": {k: int(80e9 // r["state_bytes"]) for k, r in runs.items()},
        "seconds": {k: round(r["seconds"], 2) for k, r in runs.items()},
        "plans": {k: r["plan"] for k, r in runs.items()},
    }
    print(f"{name} on {result['device']}, {dtype}, prompt {prompt_len}, {new_tokens} decoded tokens")
    print(f"logit |bf16 ring - fp32 ring|: after the prompt max {result['after_prompt']['max_abs']:.4g} "
          f"mean {result['after_prompt']['mean_abs']:.4g}; over decode max {result['decode']['max_abs']:.4g} "
          f"mean {result['decode']['mean_abs']:.4g} (mean |logit| {result['logit_scale']:.3g}); "
          f"greedy argmax agrees at {100 * result['greedy_agreement']:.1f}% of steps")
    for k, mib in result["state_MiB_per_sequence"].items():
        print(f"state {k} ring: {mib:.4g} MiB a sequence, {result['sessions_per_80GB_state_only'][k]} sequences "
              f"in 80 GB (state only)")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_state_dtype.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
