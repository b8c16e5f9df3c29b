"""Options and loading shared by the command-line tools; errors become one clear line and exit 2."""
from __future__ import annotations

import functools
import math
import sys

import click

from mhla_stream.hub import DEFAULT_MODEL

# torch, transformers and the model code are imported inside the functions that load a model,
# so that `--help` and `--version` stay fast (nothing heavy is imported to print them).


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FiniteRange(click.FloatRange):
    """click's FloatRange lets NaN through (every comparison with NaN is false)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def command(fn=None, **kw):
    """A click command with -h / --help and --version (help never imports torch or transformers)."""
    def wrap(f):
        from mhla_stream import __version__
        f = click.version_option(__version__, "--version", prog_name="mhla-stream", message="%(prog)s %(version)s")(f)
        return click.command(context_settings=CONTEXT, **kw)(f)
    return wrap(fn) if fn is not None else wrap


def model_options(fn):
    opts = [
        click.option("--model", "model", default=DEFAULT_MODEL, show_default=True,
                     help="shipped model name, mhla-340m, a checkpoint folder, or a Hugging Face Hub id (org/name) "
                          "already in the local huggingface_hub cache (never downloaded)"),
        click.option("--weights", type=click.Path(), default=None,
                     help="folder with the weights of a named model (e.g. mhla-340m)"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
        click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="weights dtype (default: float32 on CPU, bfloat16 on GPU)"),
        click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton", "numba"]),
                     show_default=True, help="MHLA operator implementation (auto: Triton on GPU, numba/torch on CPU)"),
        click.option("--policy", default=None, type=click.Choice(["window", "window+far"]),
                     help="mixing past the trained blocks (default: the model's)"),
        click.option("--threads", default=None, type=click.IntRange(1),
                     help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


# the names mhla_stream.state.STATE_DTYPES accepts (repeated here so that --help imports no torch;
# a test checks that the two lists agree)
STATE_DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16")


def state_dtype_option(fn):
    """``--state-dtype``: storage of the completed block summaries (kept apart from model_options,
    which mhla-serve shares)."""
    return click.option("--state-dtype", default="fp32", show_default=True, type=click.Choice(STATE_DTYPE_NAMES),
                        help="storage of the completed block summaries (the ring, ~94% of the MHLA state): bf16 "
                             "halves the state memory; every sum is still formed in fp32 (README: State storage)")(fn)


def sampling_options(fn):
    """Every option defaults to None = take the model folder's generation_config.json, then the
    documented defaults (mhla_stream.sampling.DEFAULTS; README "Generation settings")."""
    opts = [
        click.option("--max-new-tokens", "-n", default=None, type=click.IntRange(0),
                     help="tokens to generate  [default: model's generation_config, else 200]"),
        click.option("--temperature", "-t", default=None, type=click.FloatRange(0),
                     help="sampling temperature; 0 = greedy, exactly transformers' greedy  [default: 0.8]"),
        click.option("--top-k", default=None, type=click.IntRange(0),
                     help="sample among the k most likely tokens; 0 = off  [default: 40]"),
        click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True),
                     help="nucleus sampling: smallest set with this probability mass; 1 = off  [default: 0.95]"),
        click.option("--min-p", default=None, type=click.FloatRange(0, 1),
                     help="drop tokens below min-p x the top token's probability; 0 = off  [default: off]"),
        click.option("--repetition-penalty", default=None, type=click.FloatRange(0, min_open=True),
                     help="penalise tokens already in the text (transformers' rule); 1 = off  [default: 1.0]"),
        click.option("--seed", default=None, type=int, help="random seed for sampling (default: random)"),
        click.option("--stop", multiple=True, help="stop when this string appears (repeatable)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def sampling_kwargs(kw: dict) -> dict:
    """The sampling options the user gave (None = not given: the model's settings apply)."""
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    given = {k: kw[k] for k in keys if kw.get(k) is not None}
    if kw.get("stop"):
        given["stop"] = list(kw["stop"])
    return given


def check_sampling(params: dict) -> None:
    """Rejects bad values before a model is loaded (ValueError: one line via friendly_errors)."""
    from mhla_stream.sampling import SamplingParams
    SamplingParams.resolve(None, **params)


def set_threads(threads, device) -> None:
    if threads is None:
        return
    if not str(device).startswith("cpu"):
        raise click.UsageError("--threads applies to the CPU; drop it or use --device cpu")
    import torch
    torch.set_num_threads(threads)
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # numba missing or its thread pool already fixed: torch's setting is the one that matters
        pass


def feed_with_progress(stream, text, min_tokens: int | None = None) -> int:
    """``stream.feed`` with a progress bar on stderr for long prefills, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return stream.feed(text)
    threshold = min_tokens if min_tokens is not None else 2 * stream.prefill_chunk
    bar = None

    def progress(done, total):
        nonlocal bar
        if total < threshold:
            return
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="tok", desc="prefill", file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        return stream.feed(text, progress=progress)
    finally:
        if bar is not None:
            bar.close()


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


def load_stream(model, weights, device, dtype, backend, policy, threads=None, **kw):
    """StreamingMHLA for the CLI; loading errors become a message and exit status 2."""
    import torch

    from mhla_stream import CheckpointError, ModelNotFound, StreamingMHLA
    device = pick_device(device)
    set_threads(threads, device)
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


def load_model(model, weights, random_weights, device, dtype):
    """An ``MHLAForCausalLM`` for the benchmarks: a checkpoint, or random weights of a preset's (or a
    checkpoint's) shape. Each caller makes its own execution plan (``model.make_plan``)."""
    import torch

    from mhla_stream import PRESETS, CheckpointError, MHLAForCausalLM, ModelNotFound, preset_config
    from mhla_stream.hub import resolve_model
    if random_weights:
        if model in PRESETS:
            cfg = preset_config(model)
        else:
            try:
                cfg = MHLAForCausalLM.from_pretrained(resolve_model(model, weights)).config
            except (ModelNotFound, CheckpointError, ValueError) as e:
                fail(str(e))
        torch.manual_seed(0)
        with torch.device(device):
            m = MHLAForCausalLM(cfg)
        m.to(dtype)
    else:
        try:
            m = MHLAForCausalLM.from_pretrained(resolve_model(model, weights), device=device, dtype=dtype)
        except (ModelNotFound, CheckpointError, ValueError) as e:
            fail(str(e))
    return m.eval().prepare_inference()


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
