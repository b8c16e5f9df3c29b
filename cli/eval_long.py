"""Loss per position on long held-out text, for each policy past the trained blocks (SPEC section 2).

    python -m mhla_stream.cli.eval_long --model DIR --tokens runs/data/heldout_books.bin --length 16384

Streams each sequence through the model in chunks with a live state (as a runtime would) and
reports the mean next-token loss in position buckets: 0-1x, 1-2x, 2-4x, 4-8x, 8-16x the trained context.
"""
from __future__ import annotations

import json

import click
import numpy as np
import torch

from mhla_stream import POLICIES, MHLACache, MHLAForCausalLM


@torch.no_grad()
def position_losses(model, seqs: torch.Tensor, policy: str, chunk: int) -> torch.Tensor:
    """seqs [N, T+1] -> per-position loss [T] averaged over the N sequences."""
    N, T1 = seqs.shape
    cache = MHLACache(model.new_state(N, policy=policy))
    out = []
    for s in range(0, T1 - 1, chunk):
        x = seqs[:, s:min(s + chunk, T1 - 1)]
        logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits.float()
        y = seqs[:, s + 1:s + 1 + x.shape[1]]
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0))
    return torch.cat(out)


@click.command()
@click.option("--model", "model_dir", required=True)
@click.option("--tokens", required=True, type=click.Path(exists=True))
@click.option("--length", default=16384)
@click.option("--sequences", default=8)
@click.option("--chunk", default=1024)
@click.option("--json", "json_path", default=None)
def main(model_dir, tokens, length, sequences, chunk, json_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MHLAForCausalLM.from_pretrained(model_dir, device=device,
                                            dtype=torch.bfloat16 if device == "cuda" else None)
    ctx = model.config.trained_context
    data = np.fromfile(tokens, dtype=np.uint16).astype(np.int64)
    starts = np.linspace(0, len(data) - length - 2, sequences).astype(int)
    seqs = torch.from_numpy(np.stack([data[s:s + length + 1] for s in starts])).to(device)
    edges = [0, ctx] + [ctx * 2 ** i for i in range(1, 10) if ctx * 2 ** i <= length]
    result = {"trained_context": ctx, "length": length, "sequences": sequences, "buckets": [], "policies": {}}
    for policy in POLICIES:
        per_pos = position_losses(model, seqs, policy, chunk)
        result["policies"][policy] = [float(per_pos[a:b].mean()) for a, b in zip(edges, edges[1:])]
    result["buckets"] = [f"{a}-{b}" for a, b in zip(edges, edges[1:])]
    print("positions      | " + " | ".join(POLICIES))
    for i, name in enumerate(result["buckets"]):
        print(f"{name:14s} | " + " | ".join(f"{result['policies'][p][i]:.4f}" for p in POLICIES))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
