"""The measurements behind ``mhla-bench`` (and ``serve_bench``'s in-process baseline): one timed
prefill + decode of an MHLA model or of a same-size transformers Llama. Kept apart from the
command so that ``mhla-bench --help`` imports neither torch nor transformers."""
from __future__ import annotations

import resource
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mhla_stream import MHLACache
from mhla_stream.graphs import GraphDecoder, GraphStep, prefill

from .bench_floor import decode_floor


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(device) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device):
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
def run_one(kind, model, prompt_len, new_tokens, batch, chunk, device, graphs=False, backend="auto", state_dtype=None,
            bandwidth=None, fused_decode=None, decode_only=False):
    """One timed prefill + decode. The MHLA model runs with its own plan for this batch;
    ``state_dtype``: storage of its block summaries (None = fp32). With a measured ``bandwidth``
    (bytes/s) an MHLA row also gets the decode step's memory-traffic floor. ``decode_only`` (MHLA):
    prefill the first sequence alone and copy its state into every row, untimed: a decode step
    costs the same whatever its tokens, and the full batch's prefill at 128k tokens would take
    minutes; the row then has no prefill figures."""
    vocab = model.config.vocab_size
    only_one = kind == "mhla" and decode_only  # only the first prompt is fed
    ids = torch.randint(3, vocab, (1 if only_one else batch, prompt_len), device=device)
    reset_peak(device)
    plan = None
    if kind == "mhla":
        plan = model.make_plan(batch, backend=backend, cuda_graphs=graphs, state_dtype=state_dtype,
                               fused_decode=fused_decode)
    if kind == "mhla":
        cache = MHLACache(model.new_state(batch, device=device, state_dtype=plan.state_dtype))
    else:
        cache = DynamicCache(config=model.config)
    prefill_graph = decoder = None
    capture_s = 0.0
    chunk = chunk if kind == "mhla" else prompt_len  # the Transformer prefills whole (flash attention)
    if kind == "mhla" and plan.cuda_graphs:  # captured once before timing, as a server does at start-up
        t = time.perf_counter()
        if prompt_len >= chunk and not decode_only:
            prefill_graph = GraphStep(model, cache, chunk, plan=plan)
        # greedy steps replayed back to back, each one's argmax written into the next one's input
        # inside the graph (mhla-serve's form), instead of an argmax and a copy launched between
        # replays: batch 1 0.431 against 0.435 ms a step (H100, session 20, call6 against call4)
        decoder = GraphDecoder(model, cache, plan=plan, feedback=True)
        sync(device)
        capture_s = time.perf_counter() - t
    if kind == "mhla" and decode_only:
        one = MHLACache(model.new_state(1, device=device, state_dtype=plan.state_dtype))
        plan1 = model.make_plan(1, backend=backend, cuda_graphs=False, state_dtype=plan.state_dtype)
        prefill(model, one, ids, chunk * batch, plan1)  # the whole-batch chunk, in one row
        for live, src in zip(cache.states, one.states):
            live.copy_(src)  # broadcast over the batch
        del one, src, live
        sync(device)
        if str(device).startswith("cuda"):  # peak memory: the decode's, not the one-row prefill's
            torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    if kind == "mhla" and decode_only:
        nxt = torch.randint(3, vocab, (batch, 1), device=device)  # a different token in each row
    elif kind == "mhla":
        logits = prefill(model, cache, ids, chunk, plan, prefill_graph)
    else:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
    if not (kind == "mhla" and decode_only):
        nxt = logits.argmax(-1, keepdim=True)
    sync(device)
    t1 = time.perf_counter()
    if decoder is not None:
        decoder.ids.copy_(nxt)
        for _ in range(new_tokens):
            decoder.replay()
    else:
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **({"plan": plan} if plan else {}))
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t2 = time.perf_counter()
    state = cache.nbytes if kind == "mhla" else sum(t.numel() * t.element_size() for layer in cache.layers
                                                    for t in (layer.keys, layer.values) if t is not None)
    row = {"model": kind, "prompt_len": prompt_len, "batch": batch, "ttft_s": t1 - t0,
           "prefill_tok_s": batch * prompt_len / (t1 - t0), "decode_tok_s": batch * new_tokens / max(t2 - t1, 1e-9),
           "decode_ms_per_step": (t2 - t1) / new_tokens * 1e3, "graph_capture_s": capture_s,
           "peak_mem_GiB": peak_bytes(device) / 2**30, "state_MiB": state / 2**20}
    if kind == "mhla" and decode_only:  # no prefill was timed
        del row["ttft_s"], row["prefill_tok_s"]
        row["decode_only"] = True
    if kind == "mhla" and bandwidth:
        floor = decode_floor(model, cache.states, batch, bandwidth)
        step_s = (t2 - t1) / new_tokens
        row.update(floor, pct_of_floor=100 * floor["floor_ms_per_step"] / (step_s * 1e3),
                   decode_GBps=(floor["weight_MB"] + floor["state_MB_per_step"]) * 1e6 / step_s / 1e9)
    return row
