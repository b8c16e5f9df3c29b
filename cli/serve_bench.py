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
import os
import random
import re
import subprocess
import sys
import time

import click

from .common import FiniteRange


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


_COMPLETION_TOKENS = re.compile(rb'"completion_tokens": ?(\d+)')


TEMPERATURE = [0.0]  # set by --temperature (the clients' processes get it as an argument)


def _body(prompt_ids, max_tokens, session=None) -> bytes:
    """A streamed greedy completion request, encoded once before the clock starts (``session``: on that
    persistent session, so every request after a client's first continues its stream)."""
    body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": TEMPERATURE[0], "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if session is not None:
        body["session"] = session
    return json.dumps(body).encode()


async def _stream_one(base, body: bytes, record):
    """One streamed request over a raw connection with the least client work per event: no HTTP
    library, no JSON decoding. A read that brings text chunks gets one time stamp (chunks that arrive
    together reach the client together); the token count comes from the closing usage chunk."""
    host, port = base.rsplit("/", 1)[-1].split(":")
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split(b" ", 2)[1] != b"200":
            raise RuntimeError(f"server answered {head[:200]!r}: {(await reader.read(300))!r}")
        stamps, rest, tail = [], b"", b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            events = (rest + data).split(b"\n\n")
            rest = events.pop()  # an event cut by the read ends in the next one
            # a text chunk is the only kind whose finish_reason is null and whose choices are not empty
            if any(b'"finish_reason": null' in e or b'"finish_reason":null' in e for e in events):
                stamps.append(time.perf_counter())
            tail = (tail + data)[-512:]
    finally:
        writer.close()
    found = _COMPLETION_TOKENS.findall(tail)
    if not found or b"[DONE]" not in tail:
        raise RuntimeError(f"the stream ended without usage and [DONE]: {tail[-200:]!r}")
    record.append({"start": t0, "stamps": stamps, "tokens": int(found[-1])})


def _latencies(records, window=None):
    ttft = [r["stamps"][0] - r["start"] for r in records if r["stamps"]]
    itl = []
    for r in records:
        for a, b in zip(r["stamps"], r["stamps"][1:]):
            if window is None or window[0] <= a and b <= window[1]:
                itl.append(b - a)
    return ttft, itl


async def _clients(base, vocab, clients, rounds, prompt_len, max_tokens, seed, start_at, sessions=False,
                   starts=None):
    rng = random.Random(seed)
    records = []
    bodies = [[_body([rng.randrange(3, vocab) for _ in range(prompt_len)], max_tokens,
                     f"bench-{seed}-{c}-{os.getpid()}" if sessions else None) for _ in range(rounds)]
              for c in range(clients)]

    async def worker(mine, delay):
        await asyncio.sleep(delay)
        for body in mine:
            await _stream_one(base, body, records)
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    await asyncio.gather(*(worker(mine, d) for mine, d in zip(bodies, starts or [0.0] * clients)))
    return records


def _client_process(base, vocab, clients, rounds, prompt_len, max_tokens, seed, start_at, sessions=False,
                    temperature=0.0, starts=None):
    """One load-generator process (its own event loop and GIL): its records and the CPU seconds it used.
    ``perf_counter`` is the system-wide monotonic clock on Linux, so stamps compare across processes."""
    cpu0 = time.process_time()
    TEMPERATURE[0] = temperature
    records = asyncio.run(_clients(base, vocab, clients, rounds, prompt_len, max_tokens, seed, start_at, sessions,
                                   starts))
    return records, time.process_time() - cpu0


def _start_offsets(shares: list[int], stagger_s: float) -> list[list[float]]:
    """Per load-generator process, its clients' start offsets: client j of process i is client
    j * procs + i of all (so every process's clients spread over the whole span), client n of c
    starts n / c of ``stagger_s`` after the first."""
    procs, total = len(shares), sum(shares)
    return [[(j * procs + i) * stagger_s / total for j in range(n)] for i, n in enumerate(shares)]


def _concurrency_phase(base, vocab, concurrency, rounds, prompt_len, max_tokens, procs=1, sessions=False,
                       temperature=0.0, stagger_s=0.0):
    """``concurrency`` streaming clients spread over ``procs`` processes, so that parsing the SSE of many
    streams in one Python process does not cap the figures; reports the clients' CPU use too.
    ``stagger_s``: client i starts i / concurrency of it after the first, so that requests arrive
    spread in time rather than in bursts of ``concurrency`` (closed-loop clients keep their offsets)."""
    import concurrent.futures as cf
    import multiprocessing
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    start_at = time.perf_counter() + (3.0 if procs > 1 else 0.0)  # room for the processes to start
    starts = _start_offsets(shares, stagger_s)
    if procs == 1:
        records, cpu = _client_process(base, vocab, concurrency, rounds, prompt_len, max_tokens, concurrency,
                                       start_at, sessions, temperature, starts[0])
        results = [(records, cpu)]
    else:
        with cf.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_client_process, base, vocab, n, rounds, prompt_len, max_tokens,
                                   concurrency * 1000 + i, start_at, sessions, temperature, starts[i])
                       for i, n in enumerate(shares)]
            results = [f.result() for f in futures]
    records = [r for rs, _ in results for r in rs]
    wall = max(s for r in records for s in r["stamps"][-1:]) - start_at
    ttft, itl = _latencies(records)
    tokens = sum(r["tokens"] for r in records)
    return {"concurrency": concurrency, "requests": len(records), "output_tok_s": tokens / wall,
            "ttft_p50_ms": _pct(ttft, 50) * 1e3, "ttft_p99_ms": _pct(ttft, 99) * 1e3,
            "itl_p50_ms": _pct(itl, 50) * 1e3, "itl_p99_ms": _pct(itl, 99) * 1e3,
            "client_procs": procs, "client_cpu_share": sum(c for _, c in results) / wall / procs,
            "client_cpu_us_per_token": sum(c for _, c in results) / max(1, tokens) * 1e6, "tokens": tokens}


async def _long_prompt_phase(base, vocab, streams, long_len, long_prompts, stream_tokens):
    """``streams`` clients generate while long prompts arrive one after another; ITL inside that window.
    Every request body is encoded before the streams start: building a 32k-id JSON body in this process
    mid-run would stall its event loop and show up as the streams' latency."""
    rng = random.Random(1)
    records, long_records = [], []
    stream_bodies = [_body([rng.randrange(3, vocab) for _ in range(16)], stream_tokens) for _ in range(streams)]
    long_bodies = [_body([rng.randrange(3, vocab) for _ in range(long_len)], 1) for _ in range(long_prompts)]
    cpu0 = time.process_time()
    runners = [asyncio.create_task(_stream_one(base, body, records)) for body in stream_bodies]
    await asyncio.sleep(0.5)  # let the streams reach their decode phase
    t0 = time.perf_counter()
    for body in long_bodies:
        await _stream_one(base, body, long_records)
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
@click.option("--temperature", default=0.0, show_default=True, type=FiniteRange(0, 2),
              help="the clients' sampling temperature (0: greedy; the in-process column stays greedy)")
@click.option("--stagger-ms", default=0.0, show_default=True, type=FiniteRange(0, 60_000),
              help="spread the clients' start times over this long, so that requests arrive spread in time "
                   "instead of in bursts (0: all clients start together); the ramp counts in the tokens/s")
@click.option("--sessions", is_flag=True, help="each client keeps one persistent session: its requests after the "
              "first continue it (the session tiers' cost: a state copied out at each request's end and back in)")
@click.option("--fake-model", is_flag=True,
              help="the host-cost harness: the real server around a stand-in runner that costs ~0 a step "
                   "(mhla_stream.serve.hostbench); measures what the host side alone can deliver")
@click.option("--device-model", default=None, help="with --fake-model: a modelled device (hostbench's DEVICE_MODELS, "
              "e.g. h100-340m) whose queued work takes the GPU's measured time; the in-process column is the model's")
@click.option("--smoke", is_flag=True, help="tiny CPU run of every phase (the shipped model)")
@click.option("--server-args", default="", help="more mhla-serve options, space-separated (e.g. --no-run-ahead)")
@click.option("--json", "json_path", default=None, type=click.Path())
def main(model, weights, random_weights, device, dtype, backend, concurrency, rounds, prompt_len, max_tokens,
         long_prompt_len, long_prompts, long_streams, session_memory, client_procs, temperature, stagger_ms, sessions, fake_model,
         device_model, smoke, server_args, json_path):
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
    device = "cpu" if fake_model else pick_device(device)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    import torch
    slots = max(levels + [long_streams + 1])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    if fake_model:
        model, rows, state_bytes, param_bytes, vocab = "fake", [None] * len(levels), 0, 0, 1000
        modelled = []
        if device_model:  # as mhla-serve on CUDA: chunk 1024, pieces of 256 (server_args may override them)
            from mhla_stream.serve.hostbench import ModelledDevice
            dev = ModelledDevice(device_model)
            rows = [{"batch": b, "decode_tok_s": dev.tok_s(b), "decode_ms_per_step": dev.decode_ms(b)} for b in levels]
            modelled = ["--device-model", device_model, "--prefill-chunk", "1024", "--prefill-piece", "256"]
        cmd = [sys.executable, "-m", "mhla_stream.serve.hostbench", "--port", str(port), "--max-batch", str(slots),
               "--max-queue", str(4 * max(levels + [long_streams]))] + modelled + server_args.split()
    else:
        rows, state_bytes, param_bytes, vocab = _in_process(model, weights, random_weights, device,
                                                            getattr(torch, dtype), levels, prompt_len, max_tokens,
                                                            backend)
        cmd = [sys.executable, "-m", "mhla_stream.cli.serve", "--model", model, "--port", str(port), "--device",
               device, "--dtype", dtype, "--backend", backend, "--max-batch", str(slots),
               "--max-prompt-tokens", str(long_prompt_len + 16), "--session-memory", session_memory,
               "--max-queue", str(4 * max(levels + [long_streams]))]
        cmd += ["--random-weights"] if random_weights else []
        cmd += ["--weights", weights] if weights else []
        cmd += server_args.split()
    server = subprocess.Popen(cmd)
    try:
        for _ in range(1200):  # bounded wait for start-up (model load, CUDA graph capture)
            if server.poll() is not None:
                raise click.ClickException(f"the server exited with status {server.returncode}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        _concurrency_phase(base, vocab, 2, 1, prompt_len, 4)  # warm-up
        serve_rows = []
        for c in levels:
            cpu0 = _server_cpu_s(server.pid)
            serve_rows.append(_concurrency_phase(base, vocab, c, rounds, prompt_len, max_tokens, client_procs,
                                                 sessions, temperature, stagger_ms / 1e3))
            tokens = serve_rows[-1].pop("tokens")
            serve_rows[-1]["server_cpu_us_per_token"] = (_server_cpu_s(server.pid) - cpu0) / tokens * 1e6
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
            "fake_model": fake_model, "sessions": sessions, "temperature": temperature, "stagger_ms": stagger_ms, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), **fit}
    click.echo(f"# {meta['device']}, {dtype}, {model}, prompt {prompt_len}, {max_tokens} new tokens per request")
    click.echo("concurrency | server tok/s | in-process tok/s | ratio | TTFT p50/p99 ms | ITL p50/p99 ms | "
               "server CPU us/token | client CPU us/token (procs)")
    for r, p in zip(serve_rows, rows):
        if p is not None:
            r["in_process_tok_s"] = p["decode_tok_s"]
            r["ratio"] = r["output_tok_s"] / p["decode_tok_s"]
        in_process = f"{p['decode_tok_s']:.1f} | {r['ratio']:.2f}" if p is not None else "- | -"
        click.echo(f"{r['concurrency']} | {r['output_tok_s']:.1f} | {in_process} | "
                   f"{r['ttft_p50_ms']:.1f}/{r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f}/{r['itl_p99_ms']:.2f} | "
                   f"{r['server_cpu_us_per_token']:.1f} | {r['client_cpu_us_per_token']:.1f} ({r['client_procs']})")
    if long_row:
        click.echo(f"{long_streams} streams while {long_prompts} prompts of {long_prompt_len} tokens arrive: ITL p50 "
                   f"{long_row['itl_p50_ms']:.2f} ms, p99 {long_row['itl_p99_ms']:.2f} ms "
                   f"(p99/p50 {long_row['itl_p99_ms'] / long_row['itl_p50_ms']:.2f}; client CPU "
                   f"{long_row['client_cpu_share']:.0%})")
    if not fake_model:
        click.echo(f"state per session {state_bytes / 2**20:.2f} MiB; {fit['sessions_in_host_budget']} sessions in "
                   f"{session_memory} of host memory" +
                   (f"; at most {fit['sessions_on_device_upper_bound']} on the device"
                    if "sessions_on_device_upper_bound" in fit else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "serve": serve_rows, "in_process": rows, "long_prompts": long_row}, f, indent=1)


def _server_cpu_s(pid: int) -> float:
    """CPU seconds of the server and its child processes (the HTTP process of --http-process)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        children = []
    return _process_cpu_s(pid) + sum(_process_cpu_s(c) for c in children)


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; Linux /proc, else nan."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


if __name__ == "__main__":
    main()
