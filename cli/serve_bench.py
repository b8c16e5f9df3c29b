"""Load generator for ``mhla-serve``: starts the server, drives it with concurrent streaming clients,
and puts the figures next to the in-process batched decode of ``mhla-bench`` at the same batch sizes.

    python -m mhla_stream.cli.serve_bench --model mhla-340m --random-weights --json serve.json
    python -m mhla_stream.cli.serve_bench --smoke          # tiny CPU run of every phase

Phases: (1) in-process batched decode tokens/s per batch size (``mhla-bench``'s path); (2) for each
concurrency, that many streaming clients: aggregate output tokens/s, time to first token p50/p99,
inter-token latency p50/p99; (3) long prompts keep arriving while streams run: the running
streams' inter-token latency p50/p99. Prompts are random token ids, generation ignores eos.
"""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import click


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _stream_one(client, base, prompt_ids, max_tokens, record):
    body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event.get("choices") and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    record.append({"start": t0, "stamps": stamps, "tokens": tokens})


def _latencies(records, window=None):
    ttft = [r["stamps"][0] - r["start"] for r in records if r["stamps"]]
    itl = []
    for r in records:
        for a, b in zip(r["stamps"], r["stamps"][1:]):
            if window is None or window[0] <= a and b <= window[1]:
                itl.append(b - a)
    return ttft, itl


async def _clients(base, vocab, clients, rounds, prompt_len, max_tokens, seed, start_at):
    import httpx
    rng = random.Random(seed)
    records = []
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 8)) as client:
        async def worker():
            for _ in range(rounds):
                await _stream_one(client, base, [rng.randrange(3, vocab) for _ in range(prompt_len)], max_tokens,
                                  records)
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        await asyncio.gather(*(worker() for _ in range(clients)))
    return records


def _client_process(base, vocab, clients, rounds, prompt_len, max_tokens, seed, start_at):
    """One load-generator process (its own event loop and GIL): its records and the CPU seconds it used.
    ``perf_counter`` is the system-wide monotonic clock on Linux, so stamps compare across processes."""
    cpu0 = time.process_time()
    records = asyncio.run(_clients(base, vocab, clients, rounds, prompt_len, max_tokens, seed, start_at))
    return records, time.process_time() - cpu0


def _concurrency_phase(base, vocab, concurrency, rounds, prompt_len, max_tokens, procs=1):
    """``concurrency`` streaming clients spread over ``procs`` processes, so that parsing the SSE of many
    streams in one Python process does not cap the figures; reports the clients' CPU use too."""
    import concurrent.futures as cf
    import multiprocessing
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    start_at = time.perf_counter() + (3.0 if procs > 1 else 0.0)  # room for the processes to start
    if procs == 1:
        records, cpu = _client_process(base, vocab, concurrency, rounds, prompt_len, max_tokens, concurrency,
                                       start_at)
        results = [(records, cpu)]
    else:
        with cf.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_client_process, base, vocab, n, rounds, prompt_len, max_tokens,
                                   concurrency * 1000 + i, start_at) for i, n in enumerate(shares)]
            results = [f.result() for f in futures]
    records = [r for rs, _ in results for r in rs]
    wall = max(s for r in records for s in r["stamps"][-1:]) - start_at
    ttft, itl = _latencies(records)
    return {"concurrency": concurrency, "requests": len(records), "output_tok_s": sum(r["tokens"] for r in records) / wall,
            "ttft_p50_ms": _pct(ttft, 50) * 1e3, "ttft_p99_ms": _pct(ttft, 99) * 1e3,
            "itl_p50_ms": _pct(itl, 50) * 1e3, "itl_p99_ms": _pct(itl, 99) * 1e3,
            "client_procs": procs, "client_cpu_share": sum(c for _, c in results) / wall / procs}


async def _long_prompt_phase(base, vocab, streams, long_len, long_prompts, stream_tokens):
    """``streams`` clients generate while long prompts arrive one after another; ITL inside that window."""
    import httpx
    rng = random.Random(1)
    records, long_records = [], []
    cpu0 = time.process_time()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=streams + 8)) as client:
        runners = [asyncio.create_task(_stream_one(client, base, [rng.randrange(3, vocab) for _ in range(16)],
                                                   stream_tokens, records)) for _ in range(streams)]
        await asyncio.sleep(0.5)  # let the streams reach their decode phase
        t0 = time.perf_counter()
        for _ in range(long_prompts):
            await _stream_one(client, base, [rng.randrange(3, vocab) for _ in range(long_len)], 1, long_records)
        t1 = time.perf_counter()
        # this client process's CPU use since cpu0, taken 0.5 s before t0
        cpu_share = (time.process_time() - cpu0) / (t1 - t0 + 0.5)
        await asyncio.gather(*runners)
    _, itl = _latencies(records, (t0, t1))
    long_ttft = [r["stamps"][0] - r["start"] for r in long_records if r["stamps"]]
    return {"streams": streams, "long_prompt_len": long_len, "long_prompts": long_prompts,
            "itl_p50_ms": _pct(itl, 50) * 1e3, "itl_p99_ms": _pct(itl, 99) * 1e3, "itl_samples": len(itl),
            "long_prompt_ttft_p50_s": _pct(long_ttft, 50), "client_cpu_share": cpu_share,
            "all_streams_outlived_window": all(
                r["stamps"] and r["stamps"][-1] >= t1 for r in records)}


def _in_process(model, weights, random_weights, device, dtype, batches, prompt_len, new_tokens, backend):
    import torch

    from .bench_runs import run_one
    from .common import load_model
    m = load_model(model, weights, random_weights, device, dtype)
    graphs = device.startswith("cuda")
    rows = []
    for b in batches:
        run_one("mhla", m, prompt_len, 2, b, 512, device, graphs, backend)  # warm-up at the timed shape
        r = run_one("mhla", m, prompt_len, new_tokens, b, 512, device, graphs, backend)
        rows.append({"batch": b, "decode_tok_s": r["decode_tok_s"], "decode_ms_per_step": r["decode_ms_per_step"]})
    state_bytes = sum(s.nbytes for s in m.new_state(1, device="meta")) if hasattr(m, "new_state") else 0
    params = sum(p.numel() * p.element_size() for p in m.parameters())
    vocab = m.config.vocab_size
    del m
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows, state_bytes, params, vocab


@click.command()
@click.option("--model", default="mhla-340m", show_default=True)
@click.option("--weights", default=None, type=click.Path())
@click.option("--random-weights", is_flag=True)
@click.option("--device", default=None)
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton", "numba"]))
@click.option("--concurrency", default="1,8,32,64", show_default=True)
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1), help="requests per client")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(2))
@click.option("--long-prompt-len", default=32768, show_default=True, type=click.IntRange(1))
@click.option("--long-prompts", default=4, show_default=True, type=click.IntRange(0))
@click.option("--long-streams", default=32, show_default=True, type=click.IntRange(1))
@click.option("--session-memory", default="4GiB", show_default=True, help="the server's default host budget")
@click.option("--client-procs", default=4, show_default=True, type=click.IntRange(1),
              help="load-generator processes the clients of a concurrency level are spread over")
@click.option("--smoke", is_flag=True, help="tiny CPU run of every phase (the shipped model)")
@click.option("--json", "json_path", default=None, type=click.Path())
def main(model, weights, random_weights, device, dtype, backend, concurrency, rounds, prompt_len, max_tokens,
         long_prompt_len, long_prompts, long_streams, session_memory, client_procs, smoke, json_path):
    """Measure mhla-serve under concurrent streaming clients against in-process batched decode."""
    import socket

    import httpx

    from .common import pick_device
    from .serve import parse_bytes
    if smoke:
        model, random_weights, concurrency, rounds = "mhla-stories-17m", False, "1,2", 1
        prompt_len, max_tokens, long_prompt_len, long_prompts, long_streams = 16, 8, 1024, 1, 2
        client_procs = min(client_procs, 2)
    try:
        levels = [int(x) for x in concurrency.split(",")]
        assert levels and all(x > 0 for x in levels)
    except (ValueError, AssertionError):
        raise click.BadParameter("expected comma-separated positive integers", param_hint="--concurrency")
    device = pick_device(device)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    import torch
    rows, state_bytes, param_bytes, vocab = _in_process(model, weights, random_weights, device, getattr(torch, dtype),
                                                        levels, prompt_len, max_tokens, backend)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mhla_stream.cli.serve", "--model", model, "--port", str(port), "--device", device,
           "--dtype", dtype, "--backend", backend, "--max-batch", str(max(levels + [long_streams + 1])),
           "--max-prompt-tokens", str(long_prompt_len + 16), "--session-memory", session_memory,
           "--max-queue", str(4 * max(levels + [long_streams]))]
    cmd += ["--random-weights"] if random_weights else []
    cmd += ["--weights", weights] if weights else []
    server = subprocess.Popen(cmd)
    try:
        for _ in range(1200):  # bounded wait for start-up (model load, CUDA graph capture)
            if server.poll() is not None:
                raise click.ClickException(f"mhla-serve exited with status {server.returncode}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        _concurrency_phase(base, vocab, 2, 1, prompt_len, 4)  # warm-up
        serve_rows = [_concurrency_phase(base, vocab, c, rounds, prompt_len, max_tokens, client_procs) for c in levels]
        long_row = asyncio.run(_long_prompt_phase(base, vocab, long_streams, long_prompt_len, long_prompts,
                                                  max_tokens * 16)) if long_prompts else None
    finally:
        server.terminate()
        server.wait(timeout=120)
    budget = parse_bytes(session_memory)
    fit = {"state_bytes_per_session": state_bytes, "sessions_in_host_budget": budget // max(state_bytes, 1)}
    if device.startswith("cuda"):
        free = torch.cuda.get_device_properties(device).total_memory - param_bytes
        fit["sessions_on_device_upper_bound"] = free // max(state_bytes, 1)
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "dtype": dtype,
            "model": model, "random_weights": random_weights, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "date": time.strftime("%Y-%m-%d"), **fit}
    click.echo(f"# {meta['device']}, {dtype}, {model}, prompt {prompt_len}, {max_tokens} new tokens per request")
    click.echo("concurrency | server tok/s | in-process tok/s | ratio | TTFT p50/p99 ms | ITL p50/p99 ms | client CPU")
    for r, p in zip(serve_rows, rows):
        r["in_process_tok_s"] = p["decode_tok_s"]
        r["ratio"] = r["output_tok_s"] / p["decode_tok_s"]
        click.echo(f"{r['concurrency']} | {r['output_tok_s']:.1f} | {p['decode_tok_s']:.1f} | {r['ratio']:.2f} | "
                   f"{r['ttft_p50_ms']:.1f}/{r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f}/{r['itl_p99_ms']:.2f} | "
                   f"{r['client_cpu_share']:.0%} of {r['client_procs']} procs")
    if long_row:
        click.echo(f"{long_streams} streams while {long_prompts} prompts of {long_prompt_len} tokens arrive: ITL p50 "
                   f"{long_row['itl_p50_ms']:.2f} ms, p99 {long_row['itl_p99_ms']:.2f} ms "
                   f"(p99/p50 {long_row['itl_p99_ms'] / long_row['itl_p50_ms']:.2f}; client CPU "
                   f"{long_row['client_cpu_share']:.0%})")
    click.echo(f"state per session {state_bytes / 2**20:.2f} MiB; {fit['sessions_in_host_budget']} sessions in "
               f"{session_memory} of host memory" + (f"; at most {fit['sessions_on_device_upper_bound']} on the device"
                                                     if "sessions_on_device_upper_bound" in fit else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "serve": serve_rows, "in_process": rows, "long_prompts": long_row}, f, indent=1)


if __name__ == "__main__":
    main()
