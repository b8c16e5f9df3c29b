"""Options and loading shared by the command-line tools; errors become one clear line and exit 2."""
from __future__ import annotations

import functools
import sys

import click

from mhla_stream.hub import DEFAULT_MODEL


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
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise click.UsageError(f"--device {device}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise click.UsageError(f"--device {device}: only cpu and cuda devices are supported")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: no CUDA device is available here")
    return device


def check_backend(backend: str, device: str) -> None:
    """``--backend`` against the device, before anything is loaded."""
    import torch

    from mhla_stream.attention import resolve_backend
    try:
        resolve_backend(backend, torch.device(device))
    except (RuntimeError, ValueError) as e:
        fail(f"--backend {backend}: {e}")


def check_weights_flag(model: str, weights) -> None:
    from mhla_stream.hub import USER_WEIGHT_MODELS
    if weights is not None and model not in USER_WEIGHT_MODELS:
        fail(f"--weights is only for {', '.join(USER_WEIGHT_MODELS)}; {model} brings its own weights "
             "(pass a checkpoint folder as --model instead)")


def text_input(value, source: str) -> str:
    """The one input normaliser for text from argv, stdin or a file: bytes must be UTF-8, and
    undecodable argv bytes (which Python keeps as lone surrogates) are refused with one line."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"{source} is not UTF-8 text (byte 0x{value[e.start]:02x} at offset {e.start})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(f"{source} is not UTF-8 text (undecodable byte at character {e.start})")
    return value


def read_stdin_text() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    return text_input(stream.read() if stream is not None else sys.stdin.read(), "standard input")


def load_stream(model, weights, device, dtype, backend, policy, **kw):
    """StreamingMHLA for the CLI; loading errors become a message and exit status 2."""
    import torch

    from mhla_stream import CheckpointError, ModelNotFound, StreamingMHLA
    device = pick_device(device)
    check_weights_flag(model, weights)
    check_backend(backend, device)
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        return StreamingMHLA.from_pretrained(model, device=device, dtype=getattr(torch, dtype), weights=weights,
                                             backend=backend, policy=policy, **kw)
    except (ModelNotFound, CheckpointError, ValueError) as e:
        fail(str(e))
    except RuntimeError as e:  # e.g. a backend that is not available here
        fail(f"cannot start {model}: {e}")


def fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn):
    """Bad values found late (sampling, tokens) print one line instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        from mhla_stream import StateFileError
        from mhla_stream.tokenizer import TokenizerError
        try:
            return fn(*a, **k)
        except (ValueError, TypeError, StateFileError, TokenizerError) as e:
            fail(str(e))
    return wrapper
