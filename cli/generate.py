"""``mhla-generate``: one prompt (argument, --file or stdin) to text; ``--json`` adds timings."""
from __future__ import annotations

import json
import sys
import time

import click

from .common import (check_sampling, command, feed_with_progress, friendly_errors, load_stream, model_options,
                     read_stdin_text, sampling_kwargs, sampling_options, state_dtype_option, text_input)


@command
@click.argument("prompt", required=False)
@click.option("--file", "prompt_file", type=click.File("rb"), default=None,
              help="read the prompt from this file (a progress bar shows long prefills on a terminal)")
@click.option("--json", "as_json", is_flag=True, help="print text and timings as JSON")
@model_options
@state_dtype_option
@sampling_options
@friendly_errors
def main(prompt, prompt_file, as_json, model, weights, device, dtype, backend, policy, threads, state_dtype, **kw):
    """Continue PROMPT (or --file, or standard input) with the model."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give the prompt as an argument or with --file, not both")
    if prompt is not None:
        prompt = text_input(prompt, "the prompt argument")
    elif prompt_file is not None:
        prompt = text_input(prompt_file.read(), f"--file {prompt_file.name}")
    elif not sys.stdin.isatty():
        prompt = read_stdin_text()
    else:
        raise click.UsageError("no prompt: pass one as an argument, with --file, or on standard input")
    params = sampling_kwargs(kw)
    check_sampling(params)  # every sampling value checked before the model is loaded
    stream = load_stream(model, weights, device, dtype, backend, policy, threads, state_dtype=state_dtype)
    t0 = time.perf_counter()
    n_prompt = feed_with_progress(stream, prompt) if prompt else 0
    t1 = time.perf_counter()
    pieces, n_new = [], 0
    start = stream.position
    for piece in stream.stream(None, **params):
        pieces.append(piece)
        if not as_json:
            click.echo(piece, nl=False)
    n_new = stream.position - start
    t2 = time.perf_counter()
    text = "".join(pieces)
    if as_json:
        click.echo(json.dumps({"model": model, "device": str(stream.device), "prompt_tokens": n_prompt,
                               "new_tokens": n_new, "text": text, "prefill_s": round(t1 - t0, 4),
                               "decode_s": round(t2 - t1, 4),
                               "prefill_tok_s": round(n_prompt / max(t1 - t0, 1e-9), 1),
                               "decode_tok_s": round(n_new / max(t2 - t1, 1e-9), 1),
                               "state_bytes": stream.state_bytes,
                               "state_dtype": str(stream.state_dtype).replace("torch.", "")}))
    else:
        click.echo()


if __name__ == "__main__":
    main()
