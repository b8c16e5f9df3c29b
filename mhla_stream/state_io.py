"""State files: safetensors with metadata, written atomically, checked on load.

Metadata: format name and version, the model's fingerprint and config, position, policy, and
a sha256 of every tensor, so a state from another model, an unknown version, or a truncated or
altered file is refused with a message and the live state is left as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

FORMAT = "mhla-stream-state"
VERSION = "1"


class StateFileError(ValueError):
    pass


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """Config plus a strided sample of every parameter: cheap even for large models."""
    h = hashlib.sha256(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def write_state_file(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**meta, "format": FORMAT, "version": VERSION, "sha256": digest(tensors)}
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StateFileError(f"{path}: folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_state_file(path, expect_model: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StateFileError(f"{path}: no such state file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise StateFileError(f"{path}: not a readable state file, truncated or damaged ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise StateFileError(f"{path}: not an mhla-stream state file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise StateFileError(f"{path}: state file version {meta.get('version')!r} is not known to this release "
                             f"(it reads version {VERSION})")
    if meta.get("model") != expect_model:
        raise StateFileError(f"{path}: this state was made by another model ({meta.get('model_name', '?')}, "
                             f"fingerprint {meta.get('model')}); the loaded model's fingerprint is {expect_model}")
    if digest(tensors) != meta.get("sha256"):
        raise StateFileError(f"{path}: checksum mismatch, the file was altered or damaged")
    return tensors, meta
