"""Launch shapes of the decode step's skinny products, chosen in the step where they run.

Each skinny product is tuned alone at its first launch (``triton_skinny``), replaying one launch
with its weight in L2. In the decode step the products follow each other behind programmatic
dependent launch, and a product's programs load their weights before the previous product ends
only if they fit on the SMs beside its programs: at one row the isolated picks hold 107-176
registers a thread at 256 threads (1-2 programs an SM, up to 2.7 waves), so the next product
waits for SMs instead of streaming its weights early. Timed in the captured step instead
(``mhla_stream.decode_tuning``), other shapes win: the mhla-340m batch-1 step on an H100 went
from 487.6 to 422.7 us (+15%, session 20).

A pick is keyed by the device's name and the product: its row block (tensor-core form, from two
rows: 'M16 ...'; one row: no prefix), N, K, norm group, folds and dtype. Picks come from, in order
of precedence:
  - the user's file, written by ``python -m mhla_stream.cli.tune_decode`` (the path in
    ``MHLA_STREAM_STEP_PICKS``, default ``~/.cache/mhla_stream/step_picks.json``);
  - the file shipped with the package (``step_picks.json``: the shapes measured here).
A product without a pick, or whose pick does not fit its launch, is tuned alone as before.
``MHLA_STREAM_STEP_PICKS=0``: no picks. A file that cannot be read, or an entry that is not a
valid launch shape, is skipped with a warning: a bad file never stops a decode.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings

import triton

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_picks.json")
FIELDS = ("BN", "BK", "num_warps", "num_stages", "maxnreg", "SPLIT")
# a picks file holds a few dozen products a GPU (the shipped one: 4 KiB); a larger one is not read
# (it would be read whole at the first decode step)
MAX_BYTES = 1 << 20
# the largest tile a pick may ask for: the one-row candidates' (decode_tuning) and the tuners' shapes
# stay within it; a tile of a million elements would compile for minutes (or not at all)
MAX_TILE = 32768
_loaded: dict = {}       # device name -> {product key: pick tuple}
_forced: dict = {}       # product key -> pick tuple, set by the step tuner while it times candidates
used: dict = {}          # product key -> (the pick it took or None, its launch arguments): the step tuner's list
_rejected: set = set()   # keys whose pick failed to compile or launch on this GPU: tuned alone from then on
_pending: list = []      # the key whose pick the launch under way took (set by the pruning, read on failure)


def user_path() -> str | None:
    raw = os.environ.get("MHLA_STREAM_STEP_PICKS", "").strip()
    if raw.lower() in ("0", "false", "no", "off"):
        return None
    # (~ expanded: a quoted "~/picks.json" in a shell or a service file reaches us unexpanded)
    return os.path.expanduser(raw) if raw else os.path.join(os.path.expanduser("~"), ".cache", "mhla_stream",
                                                             "step_picks.json")


def enabled() -> bool:
    return user_path() is not None


def product_key(N: int, K: int, GS: int, norm: bool, gate: bool, swiglu: bool, residual: bool, dtype,
                rows: int = 1, late: bool = False, stats: bool = False) -> str:
    """'N3072 K1024 G1024 norm bf16' (one row), 'M16 N3072 K1024 G1024 stats bf16' (the tensor-core
    form's row block of 16): what a launch computes, independent of the model."""
    folds = [f for f, on in (("norm", norm), ("gate", gate), ("swiglu", swiglu), ("residual", residual),
                             ("late", late), ("stats", stats)) if on]
    name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32").replace(
        "float16", "fp16")
    return " ".join(([f"M{rows}"] if rows > 1 else []) + [f"N{N}", f"K{K}", f"G{GS}", *folds, name])


def launch_key(named_args, kwargs) -> str:
    """The product key of a skinny launch (the tuners' pruning arguments)."""
    kw = kwargs.get
    return product_key(named_args["N"], named_args["K"], named_args["GS"], kw("NORM", False), kw("GATE", False),
                       kw("SWIGLU", False), kw("RESIDUAL", False), named_args["x_ptr"].dtype, kw("BM", 1),
                       kw("LATE", False), kw("STATS_IN", False))


def valid_pick(value) -> tuple | None:
    """A pick tuple from a file's entry ({BN, BK, num_warps[, num_stages, maxnreg, SPLIT]}), None if
    invalid. (Whether it fits a particular launch is checked at the launch.)"""
    if not isinstance(value, dict) or set(value) - set(FIELDS) or not {"BN", "BK", "num_warps"} <= set(value):
        return None
    bn, bk, w = value["BN"], value["BK"], value["num_warps"]
    st, mr, sp = value.get("num_stages", 1), value.get("maxnreg"), value.get("SPLIT", 1)

    def whole(v, lo, hi):
        return type(v) is int and lo <= v <= hi
    pow2 = lambda v: whole(v, 1, 1 << 20) and v & (v - 1) == 0  # noqa: E731
    # (num_warps through pow2 too: ``w in (1, 2, 4, ...)`` lets true and 4.0 through)
    if not (pow2(bn) and bn <= 128 and pow2(bk) and 16 <= bk <= 16384 and pow2(w) and w <= 16
            and bn * bk <= MAX_TILE
            and whole(st, 1, 8) and (mr is None or whole(mr, 24, 255)) and whole(sp, 1, 8)):
        return None
    return (bn, bk, w, st, mr, sp)


def read(path: str, device: str) -> dict:
    """{product key: pick} for ``device`` from the file at ``path``; {} (with a warning) if the file
    is unreadable or not a picks file; invalid entries are skipped with a warning."""
    try:
        entry = existing(path)["devices"].get(device, {})
        products = entry.get("products", {}) if isinstance(entry, dict) else None
        if not isinstance(products, dict):
            raise ValueError(f"the entry for {device} has no products table")
    except ValueError as e:
        warnings.warn(f"mhla_stream: step picks file skipped: {e}; products are tuned alone",
                      RuntimeWarning, stacklevel=3)
        return {}
    picks = {key: valid_pick(value) for key, value in products.items()}
    bad = [key for key, pick in picks.items() if pick is None]
    if bad:  # (keys cut short: a hostile key must not make a warning of a megabyte)
        warnings.warn(f"mhla_stream: {path}: invalid launch shapes for {len(bad)} products "
                      f"{[k[:80] for k in bad[:3]]} skipped", RuntimeWarning, stacklevel=3)
    return {key: pick for key, pick in picks.items() if pick is not None}


def picks_for(device: str) -> dict:
    """The shipped picks for ``device`` overlaid by the user's (read once a process)."""
    if device not in _loaded:
        picks = {}
        if enabled():
            picks.update(read(SHIPPED, device))
            picks.update(read(user_path(), device))
        _loaded[device] = picks
    return _loaded[device]


def existing(path: str) -> dict:
    """The picks file at ``path`` as data ({"format": 1, "devices": {}} if there is none yet);
    ValueError if something else is there (it is never overwritten)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:  # (a dangling link too: the file it names is made)
        return {"format": 1, "devices": {}}
    except (OSError, ValueError) as e:  # a symlink loop, a path through a file, no permission
        raise ValueError(f"{path} cannot be read ({e}); move it away first") from e
    try:
        # only a regular file is opened: a FIFO would block the open (and the decode) forever, a
        # device like /dev/zero never end; a file over MAX_BYTES is not read at all
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_BYTES:
            raise ValueError(f"{st.st_size} bytes, more than {MAX_BYTES}")
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # (bounded too: the file may grow after the stat)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"more than {MAX_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
        if not (isinstance(data, dict) and data.get("format") == 1 and isinstance(data.get("devices"), dict)):
            raise ValueError("no format 1 and devices")
    except RecursionError as e:  # json nested past the recursion limit: not a ValueError
        raise ValueError(f"{path} exists and is not a step picks file (nested too deep); "
                         "move it away first") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} exists and is not a step picks file ({e}); move it away first") from e
    return data


def write(path: str, device: str, products: dict, note: str = "") -> None:
    """Merge ``products`` ({key: pick tuple}) into the file at ``path`` under ``device``. Atomic:
    a new file is renamed over the old one, so an interrupted write leaves the old file whole; an
    unreadable old file is not overwritten (ValueError)."""
    # through a symlink: the file it names is replaced (the link stays; renaming over the link
    # would turn it into a copy and leave its target behind)
    path = os.path.realpath(path)
    data = existing(path)
    entry = data["devices"].setdefault(device, {})
    if not isinstance(entry, dict) or not isinstance(entry.setdefault("products", {}), dict):
        raise ValueError(f"{path}: the entry for {device} is not a picks entry; move the file away first")
    entry["products"].update({k: dict(zip(FIELDS, p)) for k, p in products.items()})
    if note:
        entry["note"] = note
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".step_picks.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            try:  # the old file's permissions (mkstemp's 0600 would hide a shared file from its readers)
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            except FileNotFoundError:
                pass
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _loaded.clear()


def config(pick: tuple) -> triton.Config:
    bn, bk, w, st, mr, sp = pick
    return triton.Config({"BN": bn, "BK": bk, "SPLIT": sp}, num_warps=w, num_stages=st, maxnreg=mr)


def as_pick(cfg: triton.Config) -> tuple:
    return (cfg.kwargs["BN"], cfg.kwargs["BK"], cfg.num_warps, cfg.num_stages, cfg.maxnreg, cfg.kwargs["SPLIT"])


def pruner(fits, fallback=None):
    """A tuner's pruning: the pick for this launch if there is one (forced by the step tuner, or
    from the files) and ``fits(config, named_args, kwargs)``, else ``fallback`` (or every
    configuration): tuned alone. Each launch's key and arguments are recorded in ``used``."""
    def prune(configs, named_args, **kwargs):
        key = launch_key(named_args, kwargs)
        x = named_args["x_ptr"]
        pick = _forced.get(key)
        if pick is None and x.is_cuda and enabled() and key not in _rejected:
            import torch
            pick = picks_for(torch.cuda.get_device_name(x.device)).get(key)
        if pick is not None and not fits(config(pick), named_args, kwargs):
            if key not in _forced:
                warnings.warn(f"mhla_stream: the step pick {pick} does not fit the launch {key}: tuned alone",
                              RuntimeWarning, stacklevel=2)
            pick = None
        scalars = {k: v for k, v in named_args.items() if isinstance(v, (int, float, bool))}
        used[key] = (pick, scalars, dict(kwargs))  # (no tensors: kept past the launch)
        if pick is None:
            return fallback(configs, named_args, **kwargs) if fallback else configs
        _pending.append(key)
        return [config(pick)]
    return prune


def launching(tuner, launch):
    """Runs ``launch()`` (a launch through ``tuner``). If it fails on a pick from a file (a shape
    this GPU cannot compile or run: too much shared memory, say), the pick is dropped with a
    warning and the launch runs again with that product tuned alone: a bad file never stops a
    decode. (Compiling and the resource checks come before the kernel runs: nothing was written.)
    A forced pick (the step tuner's) raises, so that the tuner skips the shape."""
    _pending.clear()
    try:
        return launch()
    except Exception as e:
        key = _pending[-1] if _pending else None
        # only Triton's own errors (compiling, resources): a CUDA error is not the pick's fault
        ours = type(e).__module__.split(".")[0] == "triton"
        if key is None or key in _forced or not ours or not hasattr(tuner, "cache"):
            raise
        _rejected.add(key)
        tuner.cache.clear()  # (every product re-prunes at its next launch; only this one changes)
        warnings.warn(f"mhla_stream: the step pick for {key} failed on this GPU ({type(e).__name__}: "
                      f"{str(e)[:160]}); tuned alone instead", RuntimeWarning, stacklevel=3)
        _pending.clear()
        return launch()
    finally:
        _pending.clear()
