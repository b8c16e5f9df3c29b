"""``mhla-bench``: time to first token, prefill and decode tokens/s, peak memory and state bytes
on long prompts; ``--compare transformer`` runs a same-size softmax Transformer (transformers
Llama, SDPA) in the same run.

    mhla-bench --model mhla-340m --random-weights --prompt-len 2048,32768,131072 --compare transformer
"""
from __future__ import annotations

import json
import os
import resource
import time

import click
import torch
from tqdm import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mhla_stream import MHLACache
from mhla_stream.graphs import GraphDecoder, GraphStep, prefill

from .common import check_backend, check_weights_flag, fail, load_model, pick_device


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak_bytes(device) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak(device):
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def same_size_transformer(cfg, device, dtype):
    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                     num_attention_heads=max(1, cfg.hidden_size // 64), intermediate_size=cfg.intermediate_size,
                     max_position_embeddings=1 << 20, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True)
    with torch.device(device):
        m = LlamaForCausalLM._from_config(lc, attn_implementation="sdpa", dtype=dtype)
    return m.eval()


@torch.inference_mode()
def run_one(kind, model, prompt_len, new_tokens, batch, chunk, device, graphs=False, backend="auto"):
    """One timed prefill + decode. The MHLA model runs with its own plan for this batch."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    _reset_peak(device)
    plan = model.make_plan(batch, backend=backend, cuda_graphs=graphs) if kind == "mhla" else None
    if kind == "mhla":
        cache = MHLACache(model.new_state(batch, device=device))
    else:
        cache = DynamicCache(config=model.config)
    prefill_graph = decoder = None
    capture_s = 0.0
    chunk = chunk if kind == "mhla" else prompt_len  # the Transformer prefills whole (flash attention)
    if kind == "mhla" and plan.cuda_graphs:  # captured once before timing, as a server does at start-up
        t = time.perf_counter()
        if prompt_len >= chunk:
            prefill_graph = GraphStep(model, cache, chunk, plan=plan)
        decoder = GraphDecoder(model, cache, plan=plan)
        _sync(device)
        capture_s = time.perf_counter() - t
    _sync(device)
    t0 = time.perf_counter()
    if kind == "mhla":
        logits = prefill(model, cache, ids, chunk, plan, prefill_graph)
    else:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
    nxt = logits.argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    if decoder is not None:
        for _ in range(new_tokens):
            nxt = decoder.step(nxt)[:, -1].argmax(-1, keepdim=True)
    else:
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **({"plan": plan} if plan else {}))
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    state = cache.nbytes if kind == "mhla" else sum(t.numel() * t.element_size() for layer in cache.layers
                                                    for t in (layer.keys, layer.values) if t is not None)
    return {"model": kind, "prompt_len": prompt_len, "batch": batch, "ttft_s": t1 - t0,
            "prefill_tok_s": batch * prompt_len / (t1 - t0), "decode_tok_s": batch * new_tokens / max(t2 - t1, 1e-9),
            "decode_ms_per_step": (t2 - t1) / new_tokens * 1e3, "graph_capture_s": capture_s,
            "peak_mem_GiB": _peak_bytes(device) / 2**30, "state_MiB": state / 2**20}


@click.command()
@click.option("--model", default="mhla-340m", show_default=True)
@click.option("--weights", default=None, type=click.Path())
@click.option("--random-weights", is_flag=True, help="random weights of the model's shape (fine for throughput)")
@click.option("--prompt-len", default="2048,32768", show_default=True, help="comma-separated prompt lengths")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batch", default="1", show_default=True, help="comma-separated batch sizes")
@click.option("--prefill-chunk", default=16384, show_default=True, type=click.IntRange(1))
@click.option("--compare", type=click.Choice(["transformer"]), default=None)
@click.option("--device", default=None)
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton", "numba"]))
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="capture the MHLA decode step and full prefill chunks (before timing)")
@click.option("--json", "json_path", default=None, type=click.Path(), help="also write the rows here")
def main(model, weights, random_weights, prompt_len, new_tokens, batch, prefill_chunk, compare, device, dtype, backend,
         cuda_graph, json_path):
    """Measure prefill and decode speed of an MHLA model on long prompts."""
    try:
        lengths = [int(x) for x in prompt_len.split(",")]
        batches = [int(x) for x in batch.split(",")]
        assert all(x > 0 for x in lengths + batches)
    except (ValueError, AssertionError):
        raise click.BadParameter("expected comma-separated positive integers", param_hint="--prompt-len/--batch")
    device = pick_device(device)
    check_weights_flag(model, weights)
    check_backend(backend, device)
    if json_path:  # found out now, not after the whole run
        folder = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(json_path):
            fail(f"--json {json_path}: folder {folder} does not exist or is not writable (or the path is a folder)")
    dtype = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    m = load_model(model, weights, random_weights, device, dtype)
    click.echo(f"# plan (batch {batches[0]}): {m.make_plan(batches[0], backend=backend, cuda_graphs=cuda_graph).describe()}")
    kinds = [("mhla", m)]
    if compare:
        kinds.append(("transformer", same_size_transformer(m.config, device, dtype)))
    rows = []
    jobs = [(k, mod, L, b) for L in lengths for b in batches for k, mod in kinds]
    for kind, mod, L, b in tqdm(jobs, desc="bench", dynamic_ncols=True):
        graphs = cuda_graph and device.startswith("cuda")
        # warm-up at the timed chunk shape: kernels compiled and tuned, graphs captured once before timing
        run_one(kind, mod, min(L, prefill_chunk), 2, b, prefill_chunk, device, graphs, backend)
        try:
            rows.append(run_one(kind, mod, L, new_tokens, b, prefill_chunk, device, graphs, backend))
        except torch.OutOfMemoryError:
            rows.append({"model": kind, "prompt_len": L, "batch": b, "error": "out of memory"})
            _reset_peak(device)
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "dtype": str(dtype),
            "date": time.strftime("%Y-%m-%d"), "model": model, "random_weights": random_weights,
            "params": sum(p.numel() for p in m.parameters()), "new_tokens": new_tokens,
            "plans": {b: m.make_plan(b, backend=backend, cuda_graphs=cuda_graph).describe() for b in batches}}
    cols = ["model", "prompt_len", "batch", "ttft_s", "prefill_tok_s", "decode_tok_s", "decode_ms_per_step", "peak_mem_GiB",
            "state_MiB"]
    click.echo(f"# {meta['device']}, {meta['dtype']}, {meta['date']}, {model} ({meta['params'] / 1e6:.0f}M params)")
    click.echo(" | ".join(cols))
    for r in rows:
        click.echo(" | ".join(r.get("error", "") if c == "ttft_s" and "error" in r else
                              (f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))) for c in cols))
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
        except OSError as e:
            fail(f"--json {json_path}: cannot write the results ({e.strerror})")


if __name__ == "__main__":
    main()
