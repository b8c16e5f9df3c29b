"""Loading checkpoints: this project's layout and the reference (fla GLA, ``attn_extends: mhla``)
layout of SPEC section 3. Strict: a missing, unexpected or misshapen tensor is an error that
names the file and the key. ``.bin`` files are read with ``weights_only=True`` (no pickled code).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .configuration import MHLAConfig
from .mixing import prepare_mixing

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file and key."""


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(raw: dict, source: Path, num_blocks: int | None = None) -> tuple[MHLAConfig, str]:
    """Returns the config and the layout name (``mhla`` or ``reference``)."""
    model_type = raw.get("model_type")
    if model_type == "mhla":
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
        try:
            return MHLAConfig(**raw), "mhla"
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid mhla config ({e})") from None
    if model_type != "gla":
        raise CheckpointError(f"{source}: unknown model_type {model_type!r}; expected 'mhla' (this project) or "
                              "'gla' with attn_extends 'mhla' (the reference layout)")
    if raw.get("attn_extends", "mhla") != "mhla":
        raise CheckpointError(f"{source}: a gla config with attn_extends={raw['attn_extends']!r} is not an MHLA "
                              "model; expected attn_extends 'mhla'")
    checks = {"feature_map": ("relu", raw.get("feature_map", "relu")),
              "use_short_conv": (False, raw.get("use_short_conv", False)),
              "num_kv_heads": (raw.get("num_heads", 4), raw.get("num_kv_heads") or raw.get("num_heads", 4))}
    for key, (want, have) in checks.items():
        if have != want:
            raise CheckpointError(f"{source}: {key}={have!r} is not supported; expected {want!r}")
    fields = dict(vocab_size=raw.get("vocab_size", 32000), hidden_size=raw.get("hidden_size", 1024),
                  num_hidden_layers=raw.get("num_hidden_layers", 24), num_heads=raw.get("num_heads", 4),
                  expand_k=raw.get("expand_k", 0.5), expand_v=raw.get("expand_v", 1.0),
                  hidden_ratio=raw.get("hidden_ratio", 4), intermediate_size=raw.get("intermediate_size"),
                  norm_eps=raw.get("norm_eps", 1e-6), block_size=raw.get("block_size", raw.get("chunk_size", 64)),
                  num_blocks=num_blocks or raw.get("num_blocks", 32),
                  tie_word_embeddings=raw.get("tie_word_embeddings", True),
                  bos_token_id=raw.get("bos_token_id", 1), eos_token_id=raw.get("eos_token_id", 2),
                  pad_token_id=raw.get("pad_token_id"))
    try:
        return MHLAConfig(**fields), "reference"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid gla config ({e})") from None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupted, truncated or pickled-code files all land here
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return state


def load_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory, with the file each came from."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            index = read_json(path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{path}: missing or empty 'weight_map'")
            tensors, origin = {}, {}
            for shard in sorted(set(weight_map.values())):
                part = _load_file(directory / shard)
                tensors.update(part)
                origin.update({k: directory / shard for k in part})
            missing = sorted(k for k in weight_map if k not in tensors)
            if missing:
                raise CheckpointError(f"{path}: keys listed in the index are absent from their shards: {missing[:5]}")
            return tensors, origin
        tensors = _load_file(path)
        return tensors, {k: path for k in tensors}
    raise CheckpointError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def read_checkpoint(path) -> tuple[MHLAConfig, dict[str, torch.Tensor], str]:
    """Config and converted state dict (this project's names and shapes) of a checkpoint directory."""
    directory = Path(os.fspath(path))
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (a checkpoint is a folder with config.json and weights)")
    raw = read_json(directory / "config.json")
    tensors, origin = load_state_dict(directory)
    mixing_keys = [k for k in tensors if k.endswith("attn.mixing_matrix")]
    num_blocks = int(tensors[mixing_keys[0]].shape[0]) if mixing_keys and tensors[mixing_keys[0]].dim() else None
    config, layout = config_from_dict(raw, directory / "config.json", num_blocks)
    out = {}
    for key, t in tensors.items():
        if layout == "reference" and key.endswith("attn.mixing_matrix"):
            try:
                t = prepare_mixing(t)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{origin[key]}: key {key!r}: {e}") from None
        out[key] = t
    return config, out, layout


def check_and_load(model, tensors: dict[str, torch.Tensor], source) -> None:
    """Strict load with messages that name the key and the expected shape."""
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    if "lm_head.weight" in tensors and tied:
        if not torch.equal(tensors["lm_head.weight"].float(), tensors["model.embeddings.weight"].float()):
            raise CheckpointError(f"{source}: lm_head.weight differs from model.embeddings.weight but the config "
                                  "says tie_word_embeddings=true")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    if tied:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys: {', '.join(unexpected[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    for key, want in expected.items():
        have = tensors[key]
        if tuple(have.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(have.shape)}, expected {tuple(want.shape)}")
        if not have.is_floating_point():
            raise CheckpointError(f"{source}: key {key!r} has dtype {have.dtype}, expected a floating-point tensor")
    with torch.no_grad():
        for key, want in expected.items():
            want.copy_(tensors[key])
    if tied:
        model.tie_weights()
