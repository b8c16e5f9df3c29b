"""Launch shapes of the one-row (batch-1) skinny products, chosen in the decode step where they run.

The one-row tuner times each product alone, replaying one launch with its weight in L2. In the
decode step the products follow each other behind programmatic dependent launch, and a product's
programs load their weights before the previous product ends only if they fit on the SMs beside
its programs: the isolated picks hold 107-176 registers a thread at 256 threads (1-2 programs an
SM, up to 2.7 waves), so the next product waits for SMs instead of streaming its weights early.
Timed in the captured step instead (``mhla_stream.decode_tuning``), other shapes win: the
mhla-340m step on an H100 went from 487.6 to 422.7 us (+15%, session 20).

A pick is keyed by the device's name and the product (its N, K, norm group, folds and dtype), and
comes from, in order of precedence:
  - the user's file, written by ``python -m mhla_stream.cli.tune_decode`` (the path in
    ``MHLA_STREAM_ONE_ROW_PICKS``, default ``~/.cache/mhla_stream/one_row_picks.json``);
  - the file shipped with the package (``one_row_picks.json``: the shapes measured here).
A product without a pick is tuned alone, as before. ``MHLA_STREAM_ONE_ROW_PICKS=0``: no picks.
A file that cannot be read, or an entry that is not a valid launch shape, is skipped with one
warning: a bad file never stops a decode.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings

import triton

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "one_row_picks.json")
FIELDS = ("BN", "BK", "num_warps", "num_stages", "maxnreg")
_loaded: dict = {}       # device name -> {product key: pick tuple}
_forced: dict = {}       # product key -> pick tuple, set by the step tuner while it times candidates
used: dict = {}          # product key -> the pick a launch took (what mhla-bench records)


def user_path() -> str | None:
    raw = os.environ.get("MHLA_STREAM_ONE_ROW_PICKS", "").strip()
    if raw.lower() in ("0", "false", "no", "off"):
        return None
    return raw or os.path.join(os.path.expanduser("~"), ".cache", "mhla_stream", "one_row_picks.json")


def enabled() -> bool:
    return user_path() is not None


def product_key(N: int, K: int, GS: int, norm: bool, gate: bool, swiglu: bool, residual: bool, dtype) -> str:
    """'N3072 K1024 G1024 norm bf16': what a one-row launch computes, independent of the model."""
    folds = [f for f, on in (("norm", norm), ("gate", gate), ("swiglu", swiglu), ("residual", residual)) if on]
    name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32").replace(
        "float16", "fp16")
    return " ".join([f"N{N}", f"K{K}", f"G{GS}", *folds, name])


def valid_pick(value) -> tuple | None:
    """A pick tuple from a file's entry ({BN, BK, num_warps, num_stages, maxnreg}), None if invalid."""
    if not isinstance(value, dict) or set(value) - set(FIELDS) or not {"BN", "BK", "num_warps"} <= set(value):
        return None
    bn, bk, w = value["BN"], value["BK"], value["num_warps"]
    st, mr = value.get("num_stages", 1), value.get("maxnreg")

    def whole(v, lo, hi):
        return type(v) is int and lo <= v <= hi
    pow2 = lambda v: whole(v, 1, 1 << 20) and v & (v - 1) == 0  # noqa: E731
    if not (pow2(bn) and bn <= 64 and pow2(bk) and 16 <= bk <= 16384 and w in (1, 2, 4, 8, 16)
            and whole(st, 1, 8) and (mr is None or whole(mr, 24, 255))):
        return None
    return (bn, bk, w, st, mr)


def read(path: str, device: str) -> dict:
    """{product key: pick} for ``device`` from the file at ``path``; {} (with a warning) if the file
    is unreadable or not a picks file; invalid entries are skipped with a warning."""
    try:
        entry = existing(path)["devices"].get(device, {})
        products = entry.get("products", {}) if isinstance(entry, dict) else None
        if not isinstance(products, dict):
            raise ValueError(f"the entry for {device} has no products table")
    except ValueError as e:
        warnings.warn(f"mhla_stream: one-row picks file skipped: {e}; products are tuned alone",
                      RuntimeWarning, stacklevel=3)
        return {}
    picks = {key: valid_pick(value) for key, value in products.items()}
    bad = [key for key, pick in picks.items() if pick is None]
    if bad:
        warnings.warn(f"mhla_stream: {path}: invalid launch shapes for {bad[:3]} skipped", RuntimeWarning, stacklevel=3)
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
    if not os.path.exists(path):
        return {"format": 1, "devices": {}}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not (isinstance(data, dict) and data.get("format") == 1 and isinstance(data.get("devices"), dict)):
            raise ValueError("no format 1 and devices")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} exists and is not a one-row picks file ({e}); move it away first") from e
    return data


def write(path: str, device: str, products: dict, note: str = "") -> None:
    """Merge ``products`` ({key: pick tuple}) into the file at ``path`` under ``device``. Atomic:
    a new file is renamed over the old one, so an interrupted write leaves the old file whole; an
    unreadable old file is not overwritten (ValueError)."""
    data = existing(path)
    entry = data["devices"].setdefault(device, {})
    if not isinstance(entry, dict) or not isinstance(entry.setdefault("products", {}), dict):
        raise ValueError(f"{path}: the entry for {device} is not a picks entry; move the file away first")
    entry["products"].update({k: dict(zip(FIELDS, p)) for k, p in products.items()})
    if note:
        entry["note"] = note
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".one_row_picks.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _loaded.clear()


def config(pick: tuple) -> triton.Config:
    bn, bk, w, st, mr = pick
    return triton.Config({"BN": bn, "BK": bk, "SPLIT": 1}, num_warps=w, num_stages=st, maxnreg=mr)


def prune(configs, named_args, **kwargs):
    """The one-row tuner's pruning: the pick for this product if there is one (forced by the step
    tuner, or from the files), else every configuration (tuned alone)."""
    x = named_args["x_ptr"]
    key = product_key(named_args["N"], named_args["K"], named_args["GS"], kwargs.get("NORM", False),
                      kwargs.get("GATE", False), kwargs.get("SWIGLU", False), kwargs.get("RESIDUAL", False), x.dtype)
    pick = _forced.get(key)
    if pick is None and x.is_cuda and enabled():
        import torch
        pick = picks_for(torch.cuda.get_device_name(x.device)).get(key)
    if pick is None:
        used[key] = None
        return configs
    used[key] = pick
    return [config(pick)]
