"""Loss per position on long held-out text, for each policy past the trained blocks (SPEC section 2)
and each storage dtype of the block summaries (``--state-dtype``).

    python -m mhla_stream.cli.eval_long --model DIR --tokens runs/data/heldout_books.bin --length 16384
    python -m mhla_stream.cli.eval_long --books ../shared/data/gutenberg/moby_dick_pg2701.txt.xz \\
        --policy window --state-dtype fp32,bf16 --logit-positions 1000,4000,16000

Streams each sequence through the model in chunks with a live state (as a runtime would) and
reports the mean next-token loss in position buckets: 0-1x, 1-2x, 2-4x, 4-8x, 8-16x the trained
context. ``--tokens`` is a uint16 token file (``prepare_data``); ``--books`` are text files (.xz
allowed) tokenized with the model's own tokenizer, each as bos + text + eos. With several state
dtypes, the logits at ``--logit-positions`` are compared against the first dtype's.
"""
from __future__ import annotations

import json
import lzma

import click
import numpy as np
import torch

from mhla_stream import DEFAULT_MODEL, POLICIES, MHLACache, MHLAForCausalLM
from mhla_stream.state import STATE_DTYPES, dtype_name, resolve_state_dtype


@torch.no_grad()
def position_losses(model, seqs: torch.Tensor, policy: str, chunk: int, state_dtype=None, logit_positions=()):
    """seqs [N, T+1] -> (per-position loss [T] averaged over the N sequences, {position: logits [N, vocab]}
    at ``logit_positions``, state bytes per sequence)."""
    N, T1 = seqs.shape
    cache = MHLACache(model.new_state(N, policy=policy, state_dtype=state_dtype))
    out, kept = [], {}
    for s in range(0, T1 - 1, chunk):
        x = seqs[:, s:min(s + chunk, T1 - 1)]
        logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits.float()
        kept.update({p: logits[:, p - s].clone() for p in logit_positions if s <= p < s + x.shape[1]})
        y = seqs[:, s + 1:s + 1 + x.shape[1]]
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0))
    return torch.cat(out), kept, cache.nbytes // N


def read_books(paths, tokenizer) -> np.ndarray:
    ids = []
    for p in paths:
        opener = lzma.open if str(p).endswith(".xz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            ids += tokenizer.encode(f.read(), add_bos=True) + [tokenizer.eos_id]
    return np.asarray(ids, dtype=np.int64)


def comma_list(allowed):
    def parse(ctx, param, value):
        items = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if not items or bad:
            raise click.BadParameter(f"expected a comma-separated list of {', '.join(allowed)}")
        return items
    return parse


@click.command()
@click.option("--model", "model_dir", default=DEFAULT_MODEL, show_default=True)
@click.option("--tokens", default=None, type=click.Path(exists=True, dir_okay=False), help="uint16 token file")
@click.option("--books", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="text files (.txt or .txt.xz), tokenized with the model's tokenizer (repeatable)")
@click.option("--length", default=16384, type=click.IntRange(1))
@click.option("--sequences", default=8, type=click.IntRange(1))
@click.option("--chunk", default=1024, type=click.IntRange(1))
@click.option("--policy", "policies", default=",".join(POLICIES), show_default=True, callback=comma_list(POLICIES))
@click.option("--state-dtype", "state_dtypes", default="fp32", show_default=True,
              callback=comma_list(tuple(STATE_DTYPES)), help="comma-separated: storage of the block summaries")
@click.option("--logit-positions", default="", help="comma-separated positions whose logits are compared across "
                                                    "state dtypes (max and mean absolute difference)")
@click.option("--threads", default=None, type=click.IntRange(1))
@click.option("--json", "json_path", default=None)
def main(model_dir, tokens, books, length, sequences, chunk, policies, state_dtypes, logit_positions, threads,
         json_path):
    if (tokens is None) == (not books):
        raise click.UsageError("give either --tokens or --books")
    try:
        positions = [int(p) for p in logit_positions.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers", param_hint="--logit-positions") from None
    if any(not 0 <= p < length for p in positions):
        raise click.BadParameter(f"positions must lie in [0, {length})", param_hint="--logit-positions")
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MHLAForCausalLM.from_pretrained(model_dir, device=device,
                                            dtype=torch.bfloat16 if device == "cuda" else None)
    ctx = model.config.trained_context
    if books:
        from mhla_stream.hub import resolve_model
        from mhla_stream.tokenizer import Tokenizer
        data = read_books(books, Tokenizer.from_directory(resolve_model(model_dir)))
    else:
        data = np.fromfile(tokens, dtype=np.uint16).astype(np.int64)
    if len(data) < length + 2:
        raise click.UsageError(f"the text holds {len(data)} tokens, fewer than --length + 2")
    starts = np.linspace(0, len(data) - length - 2, sequences).astype(int)
    seqs = torch.from_numpy(np.stack([data[s:s + length + 1] for s in starts])).to(device)
    edges = [0, ctx] + [ctx * 2 ** i for i in range(1, 10) if ctx * 2 ** i <= length]
    dtypes = list(dict.fromkeys(dtype_name(resolve_state_dtype(d)) for d in state_dtypes))
    result = {"model": str(model_dir), "trained_context": ctx, "length": length, "sequences": sequences,
              "device": device, "buckets": [f"{a}-{b}" for a, b in zip(edges, edges[1:])], "policies": {},
              "runs": {}, "state_bytes_per_sequence": {}, "logit_diff": {}}
    for policy in policies:
        first = None
        for name in dtypes:
            per_pos, logits, nbytes = position_losses(model, seqs, policy, chunk, name, positions)
            run = f"{policy}/{name}"
            result["runs"][run] = [float(per_pos[a:b].mean()) for a, b in zip(edges, edges[1:])]
            result["state_bytes_per_sequence"][name] = nbytes
            if first is None:
                first = (run, logits)
                result["policies"][policy] = result["runs"][run]
            elif positions:
                diffs = [(logits[p] - first[1][p]).abs() for p in positions]
                result["logit_diff"][f"{run} vs {first[0]}"] = {
                    "positions": positions, "max_abs": [float(d.max()) for d in diffs],
                    "mean_abs": [float(d.mean()) for d in diffs]}
    runs = list(result["runs"])
    click.echo("positions      | " + " | ".join(runs))
    for i, name in enumerate(result["buckets"]):
        click.echo(f"{name:14s} | " + " | ".join(f"{result['runs'][r][i]:.4f}" for r in runs))
    for key, d in result["logit_diff"].items():
        click.echo(f"logits, {key}: max abs {max(d['max_abs']):.3g}, mean abs {np.mean(d['mean_abs']):.3g}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
