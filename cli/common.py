"""Options and loading shared by the command-line tools; errors become one clear line and exit 2."""
from __future__ import annotations

import functools
import sys

import click
import torch

from mhla_stream import (PRESETS, CheckpointError, MHLAForCausalLM, ModelNotFound, StateFileError, StreamingMHLA,
                         preset_config)
from mhla_stream.hub import DEFAULT_MODEL, resolve_model
from mhla_stream.tokenizer import TokenizerError


def model_options(fn):
    opts = [
        click.option("--model", "model", default=DEFAULT_MODEL, show_default=True,
                     help="model name (the shipped default, mhla-340m) or a checkpoint directory"),
        click.option("--weights", type=click.Path(), default=None,
                     help="directory with the weights of a named model (e.g. mhla-340m)"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
        click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="weights dtype (default: float32 on CPU, bfloat16 on GPU)"),
        click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton", "numba"])),
        click.option("--policy", default=None, type=click.Choice(["window", "window+far"]),
                     help="mixing past the trained blocks (default: the model's)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def sampling_options(fn):
    opts = [
        click.option("--max-new-tokens", "-n", default=200, show_default=True, type=click.IntRange(0)),
        click.option("--temperature", "-t", default=0.8, show_default=True, type=click.FloatRange(0),
                     help="0 = greedy"),
        click.option("--top-k", default=40, show_default=True, type=click.IntRange(0), help="0 = off"),
        click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
        click.option("--repetition-penalty", default=1.1, show_default=True, type=click.FloatRange(0, min_open=True)),
        click.option("--seed", default=None, type=int),
        click.option("--stop", multiple=True, help="stop string (repeatable)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def sampling_kwargs(kw: dict) -> dict:
    return dict(max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_k=kw["top_k"],
                top_p=kw["top_p"], repetition_penalty=kw["repetition_penalty"], seed=kw["seed"],
                stop=list(kw["stop"]), do_sample=kw["temperature"] > 0)


def pick_device(device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: no CUDA device is available here")
    return device


def load_stream(model, weights, device, dtype, backend, policy, **kw):
    """StreamingMHLA for the CLI; loading errors become a message and exit status 2."""
    device = pick_device(device)
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        return StreamingMHLA.from_pretrained(model, device=device, dtype=getattr(torch, dtype), weights=weights,
                                             backend=backend, policy=policy, **kw)
    except (ModelNotFound, CheckpointError) as e:
        fail(str(e))
    except RuntimeError as e:  # e.g. a backend that is not available here
        fail(f"cannot start {model}: {e}")


def load_model(model, weights, random_weights, device, dtype):
    """An ``MHLAForCausalLM`` for the benchmarks: a checkpoint, or random weights of a preset's (or a
    checkpoint's) shape. Each caller makes its own execution plan (``model.make_plan``)."""
    if random_weights:
        if model in PRESETS:
            cfg = preset_config(model)
        else:
            try:
                cfg = MHLAForCausalLM.from_pretrained(resolve_model(model, weights)).config
            except (ModelNotFound, CheckpointError) as e:
                fail(str(e))
        torch.manual_seed(0)
        with torch.device(device):
            m = MHLAForCausalLM(cfg)
        m.to(dtype)
    else:
        try:
            m = MHLAForCausalLM.from_pretrained(resolve_model(model, weights), device=device, dtype=dtype)
        except (ModelNotFound, CheckpointError) as e:
            fail(str(e))
    return m.eval().prepare_inference()


def fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn):
    """Bad values found late (sampling, tokens) print one line instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except (ValueError, TypeError, StateFileError, TokenizerError) as e:
            fail(str(e))
    return wrapper
