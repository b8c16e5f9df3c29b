"""State files: safetensors with metadata, written atomically, validated in one place on load.

Metadata: format name and version, the model's fingerprint and config, position, policy and
the ring's storage dtype (``state_dtype``; absent in files written before the option: fp32).
The sha256 covers every tensor and every metadata field, and ``validate_state`` then checks that
the content is a state this stream can continue (shapes, dtypes, positions, logits, history), so
a file from another model, an unknown version, a truncated, altered or crafted file is refused
with a message, and the caller copies nothing until everything has passed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field

import torch

FORMAT = "mhla-stream-state"
VERSION = "3"  # 3: the open-block buffers; 2 (without them) is read; 1 (unchecked metadata) is refused
_READS = ("2", VERSION)
STALE_TMP_SECONDS = 10 * 60  # a temporary file this old was left by a killed save
_FLOAT_FIELDS = ("ring", "far", "prefix", "partial", "open_keys", "open_values")
_BUFFER_FIELDS = ("open_keys", "open_values", "partial_end")  # added in version 3
# config fields that define the network; library versions, dtype and names are left out
_ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "expand_k", "expand_v", "hidden_ratio",
              "intermediate_size", "norm_eps", "block_size", "num_blocks", "rope_theta", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id")


class StateFileError(ValueError):
    pass


def _hash_tensors(h, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())


def digest(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """sha256 of the tensors and of every metadata field (except the checksum itself)."""
    h = hashlib.sha256()
    _hash_tensors(h, tensors)
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def hash_named_tensors(items) -> str:
    """sha256 of (name, tensor) pairs given in name order, every value in its own dtype (the same
    bytes ``_hash_tensors`` would hash for the dict, one tensor at a time)."""
    h = hashlib.sha256()
    for name, t in items:
        _hash_tensors(h, {name: t})
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """The architecture plus the weights exactly as stored on disk (``checkpoint.StoredWeights``,
    hashed once at first use), so the running dtype and library versions do not matter and any
    changed weight does. A model built in memory hashes all its values in fp32."""
    config = model.config.to_dict()
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in _ARCH_KEYS}, sort_keys=True, default=str).encode())
    source = getattr(model, "_mhla_stored_weights", None)
    stored = source.digest() if source is not None else None
    if stored is None:
        h.update(b"live")
        _hash_tensors(h, {k: v.detach().float() for k, v in model.state_dict().items()})
    else:
        h.update(stored.encode())
    return h.hexdigest()[:32]


def _remove_stale_temporaries(directory: str) -> None:
    """Temporary files of saves that were killed (SIGKILL leaves no chance to clean up): ours, in
    this folder, regular files and older than ``STALE_TMP_SECONDS`` (a live save is never that old)."""
    now = time.time()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(".state-") and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and now - info.st_mtime > STALE_TMP_SECONDS:
                os.remove(path)
        except OSError:
            pass  # raced with another cleaner, or not ours to remove


def write_state_file(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**meta, "format": FORMAT, "version": VERSION}
    meta["sha256"] = digest(tensors, meta)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StateFileError(f"{path}: folder {directory} does not exist")
    _remove_stale_temporaries(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    except OSError as e:
        raise StateFileError(f"{path}: cannot write in {directory} ({e.strerror})") from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except Exception as e:  # a full disk, a quota, an I/O error: one clear error, the old file kept
        _remove_quietly(tmp)
        raise StateFileError(f"{path}: could not save the state ({type(e).__name__}: "
                             f"{getattr(e, 'strerror', None) or e}); the previous file, if any, is unchanged") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


@dataclass
class StateLayout:
    """What a state must look like to be continued by a given stream."""
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # layers.{i}.{field} -> (shape, dtype)
    num_layers: int
    vocab_size: int
    policy: str
    fingerprint: str
    state_dtype: str = "float32"  # storage dtype of the completed block summaries (the ring)

    @classmethod
    def of(cls, states, vocab_size: int, fingerprint: str) -> "StateLayout":
        """The layout of one sequence's per-layer ``states`` (``MHLAState`` of batch 1)."""
        tensors = {f"layers.{i}.{n}": (tuple(getattr(st, n).shape), getattr(st, n).dtype)
                   for i, st in enumerate(states) for n in st.TENSORS}
        ring = str(states[0].ring.dtype).replace("torch.", "")
        return cls(tensors, len(states), vocab_size, states[0].policy, fingerprint, ring)


@dataclass
class ValidState:
    layers: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    history: list[int]
    position: int
    meta: dict[str, str] = field(default_factory=dict)  # a file's metadata (checksummed with it)


def read_state_file(path, layout: StateLayout) -> ValidState:
    from safetensors import safe_open
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except OSError:
        raise StateFileError(f"{path}: no such state file") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or stream forever
        raise StateFileError(f"{path}: not a regular file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise StateFileError(f"{path}: not a readable state file, truncated or damaged ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise StateFileError(f"{path}: not an mhla-stream state file (format {str(meta.get('format'))[:40]!r})")
    if meta.get("version") == "1":
        raise StateFileError(f"{path}: state file version '1' was written by an older release whose metadata is not "
                             f"checksummed; it cannot be trusted, save the stream again (this release reads {VERSION})")
    if meta.get("version") not in _READS:
        raise StateFileError(f"{path}: state file version {str(meta.get('version'))[:20]!r} is not known to this "
                             f"release (it reads versions {', '.join(_READS)})")
    if meta.get("model") != layout.fingerprint:
        raise StateFileError(f"{path}: this state was made by another model ({str(meta.get('model_name', '?'))[:80]}, "
                             f"fingerprint {str(meta.get('model'))[:40]}); the loaded model's fingerprint is "
                             f"{layout.fingerprint}")
    if digest(tensors, meta) != meta.get("sha256"):
        raise StateFileError(f"{path}: checksum mismatch, the file was altered or damaged")
    if meta.get("policy") != layout.policy:
        raise StateFileError(f"{path}: state uses policy {str(meta.get('policy'))[:40]!r}, this stream uses "
                             f"{layout.policy!r}")
    stored = meta.get("state_dtype", "float32")  # files from before the option stored an fp32 ring
    if stored != layout.state_dtype:
        raise StateFileError(f"{path}: state stores its block summaries in {stored[:20]!r}, this stream stores them in "
                             f"{layout.state_dtype!r}; open a stream with state_dtype={stored[:20]!r} to load it")
    position = meta.get("position", "")
    if not re.fullmatch(r"[0-9]{1,19}", position) or int(position) >= 2 ** 63:
        raise StateFileError(f"{path}: position {position[:40]!r} is not an int >= 0")
    if meta["version"] == "2":
        tensors = _with_empty_buffers(layout, tensors, int(position))
    try:
        valid = validate_state(layout, tensors, int(position))
    except StateFileError as e:
        raise StateFileError(f"{path}: {e}") from None
    valid.meta = meta
    return valid


def _with_empty_buffers(layout: StateLayout, tensors: dict, position: int) -> dict:
    """A version-2 state (its open block all in R) in the current layout: empty open buffers and
    R complete up to the position. A version-2 file holding one of them was not written by a release."""
    out = dict(tensors)
    for name, (shape, dtype) in layout.tensors.items():
        if name.rsplit(".", 1)[1] in _BUFFER_FIELDS:
            if name in out:
                raise StateFileError(f"a version-2 state file holds tensor {name}, which version 2 does not have")
            out[name] = torch.full(shape, position, dtype=dtype) if dtype == torch.int64 else torch.zeros(shape, dtype=dtype)
    return out


def validate_state(layout: StateLayout, tensors: dict[str, torch.Tensor], position: int) -> ValidState:
    """The one check of a state's content (files and snapshots): every layer tensor present with its
    shape and dtype, no unknown tensors, ``pos`` equal to the position, float tensors finite,
    logits [vocab] fp32 and finite (present exactly when the position is > 0), history int64 ids
    in range and no longer than the position. Raises StateFileError; touches nothing."""
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise StateFileError(f"position must be an int >= 0, got {position!r}")
    known = set(layout.tensors) | {"logits", "history"}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise StateFileError(f"unexpected tensors {', '.join(unknown[:5])[:200]} (not a state of this model)")
    layers = {}
    for name, (shape, dtype) in layout.tensors.items():
        t = tensors.get(name)
        if t is None:
            raise StateFileError(f"tensor {name} is missing")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise StateFileError(f"tensor {name} has shape {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
        field = name.rsplit(".", 1)[1]
        if field == "pos" and bool((t != position).any()):
            raise StateFileError(f"tensor {name} says {t.tolist()[:4]} tokens were seen, the position says {position}")
        if field in _FLOAT_FIELDS and not bool(torch.isfinite(t).all()):
            raise StateFileError(f"tensor {name} holds NaN or infinite values")
        layers[name] = t
    for name, t in layers.items():  # (after every pos check: a wrong position is reported as such)
        if name.endswith(".partial_end"):
            if bool(((t < 0) | (t > position)).any()):
                raise StateFileError(f"tensor {name} says {t.tolist()[:4]}, outside [0, position {position}]")
            # R must be zero unless it holds tokens of the current block: the decode kernel would
            # ignore it and the other forms not (a crafted file, or a version-2 one at a block start)
            layer = name[:-len(".partial_end")]
            C = layers[layer + ".open_keys"].shape[2]
            live = t[:, position % 2] > position - position % C
            if bool((layers[layer + ".partial"][~live] != 0).any()):
                raise StateFileError(f"tensor {layer}.partial is not zero though it holds no token of the current block")
    logits = tensors.get("logits")
    if (logits is None) != (position == 0):
        raise StateFileError(f"logits are {'missing' if logits is None else 'present'} at position {position}")
    if logits is not None:
        if tuple(logits.shape) != (layout.vocab_size,) or logits.dtype != torch.float32:
            raise StateFileError(f"logits have shape {tuple(logits.shape)} {logits.dtype}, expected "
                                 f"({layout.vocab_size},) torch.float32")
        if not bool(torch.isfinite(logits).all()):
            raise StateFileError("logits hold NaN or infinite values")
    history = tensors.get("history")
    if history is None:
        raise StateFileError("tensor history is missing")
    if history.dim() != 1 or history.dtype != torch.int64:
        raise StateFileError(f"history has shape {tuple(history.shape)} {history.dtype}, expected a 1-D int64 tensor")
    if history.numel() > position:
        raise StateFileError(f"history holds {history.numel()} tokens but the position is {position}")
    if history.numel() and not bool(((history >= 0) & (history < layout.vocab_size)).all()):
        raise StateFileError(f"history holds token ids outside [0, {layout.vocab_size})")
    return ValidState(layers, logits, history.tolist(), position)
