"""``mhla-serve``: an OpenAI-compatible HTTP server with continuous batching and persistent sessions.

    mhla-serve                                   # the shipped model on 127.0.0.1:8000
    mhla-serve --model mhla-340m --weights DIR --max-batch 64 --sessions-dir ~/.mhla-sessions

Heavy imports (torch, the model, FastAPI) happen inside ``main`` so ``--help`` stays fast.
"""
from __future__ import annotations

import re
import sys

import click

from .common import FiniteRange, command, state_dtype_option

DEFAULT_SESSION_MEMORY = "4GiB"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r}: expected a size like 4GiB, 512MB or 1000000", param_hint="--session-memory")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@command
@click.option("--model", default=None, help="model name or checkpoint directory (default: the shipped model)")
@click.option("--weights", type=click.Path(), default=None, help="directory with the weights of a named model")
@click.option("--random-weights", is_flag=True, help="random weights of the model's shape (benchmarks only)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="sequences decoded together (engine slots)")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="requests waiting for a slot before new ones get 429")
@click.option("--max-prompt-tokens", default=131072, show_default=True, type=click.IntRange(1))
@click.option("--prefill-chunk", default=None, type=click.IntRange(1),
              help="prompt tokens per engine turn while no stream is decoding [default: 1024 on CUDA "
                   "(captured graphs), 512 on the CPU]")
@click.option("--prefill-piece", default=None, type=click.IntRange(1),
              help="prompt tokens per engine turn while other streams are decoding (their next token waits "
                   "for it), and the largest captured prefill graph [default: 256 on CUDA; the chunk on the CPU]")
@click.option("--admit-tokens", default=None, type=click.IntRange(1),
              help="while streams decode, whole short prompts (one piece each) a turn may admit together, in "
                   "tokens: a burst of arrivals waits fewer turns, at the cost of longer pauses for the running "
                   "streams (at 32 streams on the H100: ITL p99 14.7 against 9.6 ms with one prompt a turn, "
                   "for 0.74 against 0.61 of in-process tokens/s) [default on CUDA: 1024, or the piece if "
                   "larger; on the CPU: the piece]")
@click.option("--admit-batch", default=None, type=click.IntRange(1, 64),
              help="whole short prompts (one piece each) prefilled side by side in one forward, then placed in "
                   "their slots: a burst of arrivals costs one forward, not one each (uses this many more state "
                   "rows of device memory; 1: one prompt a forward) [default: 8 on CUDA, 1 on the CPU]")
@click.option("--admit-wait-ms", default=0.0, show_default=True, type=FiniteRange(0, 10_000),
              help="while streams decode, a short prompt may wait up to this long after its submission for "
                   "others to share its batched admission forward (whose cost is mostly fixed): more tokens/s "
                   "for the running streams, at most this much more time to first token (0: admitted at once)")
@click.option("--async-session-copy/--no-async-session-copy", default=None,
              help="CUDA: a finished session request's state goes to host memory through a device park row and a "
                   "side stream, without stopping the other streams (off: a plain copy that waits for the device) "
                   "[default: on with CUDA]")
@click.option("--api-key", default=None, envvar="MHLA_SERVE_API_KEY",
              help="require 'Authorization: Bearer KEY' on /v1 (or set MHLA_SERVE_API_KEY)")
@click.option("--sessions-dir", type=click.Path(file_okay=False), default=None,
              help="where sessions spill to and survive restarts (default: a temporary folder, lost at exit)")
@click.option("--session-memory", default=DEFAULT_SESSION_MEMORY, show_default=True,
              help="host memory for idle sessions before they move to disk")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton", "numba"]))
@click.option("--policy", default=None, type=click.Choice(["window", "window+far"]))
@state_dtype_option
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True, help="replay captured decode steps and prefill pieces (CUDA)")
@click.option("--run-ahead/--no-run-ahead", default=True, show_default=True,
              help="launch the next decode step before the host reads the last one's tokens, while every "
                   "running stream is plain greedy (no sampling, penalty or session)")
@click.option("--gil-switch-us", default=500, show_default=True, type=click.IntRange(10, 100_000),
              help="Python's thread switch interval: how long the engine thread may wait for the GIL "
                   "while the HTTP thread runs, once its decode step is done (Python's default: 5000)")
@click.option("--http-process/--no-http-process", default=None,
              help="run the HTTP side (FastAPI, uvicorn, the SSE writes) in its own process, so it does not "
                   "share the engine's GIL [default: on with CUDA, off on the CPU]")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def main(model, weights, random_weights, host, port, max_batch, max_queue, max_prompt_tokens, prefill_chunk,
         prefill_piece, admit_tokens, admit_batch, admit_wait_ms, async_session_copy, api_key,
         sessions_dir, session_memory, device, dtype, backend, policy, state_dtype, cuda_graph, run_ahead, gil_switch_us,
         http_process, log_level):
    """Serve an MHLA model over an OpenAI-compatible HTTP API."""
    budget = parse_bytes(session_memory)
    import os
    # the engine thread and the event loop share the GIL: the engine thread waits for its step without
    # it, and then waits to get it back up to the switch interval (5 ms by default: longer than a
    # decode step) while the HTTP thread runs Python, which would show directly in the ITL
    sys.setswitchinterval(gil_switch_us / 1e6)
    import shutil
    import signal
    import tempfile

    import torch
    import uvicorn

    from mhla_stream.hub import DEFAULT_MODEL, resolve_model
    from mhla_stream.serve.capacity import NotEnoughMemory
    from mhla_stream.serve.server import build_server
    from mhla_stream.tokenizer import Tokenizer, TokenizerError

    from .common import check_backend, fail, load_model, pick_device

    model = model or DEFAULT_MODEL
    device = pick_device(device)
    check_backend(backend, device)
    given_chunk = prefill_chunk
    prefill_chunk = prefill_chunk or (1024 if device.startswith("cuda") else 512)
    if prefill_piece is not None and prefill_piece > prefill_chunk:  # said, not silently cut to the chunk
        raise click.BadParameter(f"{prefill_piece} is larger than the prefill chunk ({prefill_chunk}"
                                 f"{'' if given_chunk else ', the default on ' + device}); a piece is at most a chunk",
                                 param_hint="--prefill-piece")
    prefill_piece = min(prefill_piece or (256 if device.startswith("cuda") else prefill_chunk), prefill_chunk)
    # measured on the H100 (README, 2026-11-23): 0.61 -> 0.74 of in-process tokens/s at 32 streams
    on_cuda = device.startswith("cuda")
    admit_tokens = admit_tokens or (max(1024, prefill_piece) if on_cuda else prefill_piece)
    admit_batch = admit_batch or (8 if on_cuda else 1)
    if admit_wait_ms and admit_batch == 1:  # said, not silently ignored
        click.echo("mhla-serve: --admit-wait-ms has no effect with --admit-batch 1 (prompts are admitted one a "
                   "forward, never held)", err=True)
    async_session_copy = on_cuda if async_session_copy is None else async_session_copy
    dtype = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    try:
        path = resolve_model(model, weights) if not (random_weights and model in ("mhla-340m",)) else None
        tokenizer = Tokenizer.from_directory(path) if path is not None else None
        tokenizer_spec = (path, None)  # how the HTTP process loads the same tokenizer (--http-process)
    except (TokenizerError, FileNotFoundError) as e:
        fail(f"cannot serve {model}: {e}")
    try:
        m = load_model(model, weights, random_weights, device, dtype)
    except RuntimeError as e:
        fail(f"cannot start {model}: {e}")
    if tokenizer is None:  # random weights without a checkpoint: the shipped tokenizer, for benchmarks only
        tokenizer = _widened(Tokenizer.from_directory(resolve_model(DEFAULT_MODEL)), m.config.vocab_size)
        tokenizer_spec = (resolve_model(DEFAULT_MODEL), m.config.vocab_size)
    temporary = sessions_dir is None
    sessions_dir = tempfile.mkdtemp(prefix="mhla-sessions-") if temporary else sessions_dir
    try:
        app = build_server(m, tokenizer, model_name=os.path.basename(os.path.normpath(model)), max_batch=max_batch,
                           max_queue=max_queue, max_prompt_tokens=max_prompt_tokens, prefill_chunk=prefill_chunk,
                           prefill_piece=prefill_piece, admit_tokens=admit_tokens, admit_batch=admit_batch,
                           async_session_copy=async_session_copy, admit_wait_ms=admit_wait_ms,
                           api_key=api_key, sessions_dir=sessions_dir, session_memory=budget, policy=policy,
                           cuda_graph=cuda_graph, backend=backend, state_dtype=state_dtype, run_ahead=run_ahead,
                           on_shutdown=(lambda: shutil.rmtree(sessions_dir, ignore_errors=True)) if temporary else None)
    except NotEnoughMemory as e:
        if temporary:
            shutil.rmtree(sessions_dir, ignore_errors=True)
        fail(str(e))
    except OSError as e:
        fail(f"sessions dir {sessions_dir}: {e}")
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (the lifespan flushes sessions), then re-raises the
    # signal to whatever handler was there before it: a no-op here, so the process exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    http, loop = _fast_http()
    if http_process is None:
        http_process = device.startswith("cuda")

    def announce():
        click.echo(f"mhla-serve: {model} on {device} ({dtype}), http://{host}:{port}/v1, {max_batch} slots, "
                   f"sessions in {sessions_dir}, state {state_dtype} ring", err=True)
        click.echo(f"mhla-serve engine: {app.state.engine.runner.describe()}", err=True)
        click.echo(f"mhla-serve http: {http} parser, {loop} event loop"
                   f"{', in its own process' if http_process else ''}", err=True)
    if http_process:
        sys.exit(serve_http_process(app, tokenizer_spec, host, port, log_level, http, loop, announce))
    announce()
    from mhla_stream.serve.shutdown import HTTP_DRAIN_S, draining_server, stop_in_background
    # SIGTERM: the engine's stop (grace, then a last event for every request) begins with uvicorn's
    # shutdown, so open streams end properly before uvicorn would cut them (serve/shutdown.py)
    server = draining_server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http, loop=loop,
                                            timeout_graceful_shutdown=HTTP_DRAIN_S),
                             lambda: stop_in_background(app.state.engine))
    server.run()
    if not server.started:  # as uvicorn.run: a failed start (the port in use) is a failed exit
        sys.exit(3)


def serve_http_process(app, tokenizer_spec, host, port, log_level, http, loop, announce) -> int:
    """``--http-process``: the engine here, the app (built by ``build_server``) in a child process."""
    from mhla_stream.serve.bridge import serve_split
    s = app.state
    return serve_split(s.engine, s.store, s.metrics, s.config, tokenizer_spec=tokenizer_spec, host=host, port=port,
                       log_level=log_level, http=http, loop=loop, announce=announce, on_shutdown=s.on_shutdown)


def _fast_http() -> tuple[str, str]:
    """httptools and uvloop when installed (dependencies; they halve the host time per streamed token),
    else uvicorn's pure-Python h11 and asyncio, which work the same, only slower."""
    import importlib.util
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http, loop


def _widened(tokenizer, vocab_size: int):
    """A tokenizer that accepts every id of a larger random-weight model; an id it lacks reads as that id
    modulo its size (random text of real pieces, as a trained model's would be, for the host's share)."""
    from mhla_stream.tokenizer import Tokenizer
    known = tokenizer.vocab_size
    if known >= vocab_size:
        return tokenizer
    return Tokenizer(tokenizer._encode, lambda ids: tokenizer._decode([i % known for i in ids]), vocab_size,
                     tokenizer.bos_id, tokenizer.eos_id, tokenizer.source, tokenizer.chat)


if __name__ == "__main__":
    main()
