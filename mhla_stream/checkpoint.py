"""Loading checkpoints: this project's layout and the reference (fla GLA, ``attn_extends: mhla``)
layout of SPEC section 3. Strict: a missing, unexpected or misshapen tensor is an error that
names the file and the key. ``.bin`` files are read with ``weights_only=True`` (no pickled code).

Every file the loader opens goes through ``checkpoint_file``: it must be a regular file inside
the checkpoint folder (no ``..``, no absolute names, no symlink leading outside, no FIFO or
device that could block), and errors never quote the file's contents. Shapes are read from the
safetensors headers and compared with the config before any model is built.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch

from .configuration import MHLAConfig
from .mixing import prepare_mixing

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file and key."""


def checkpoint_file(directory: Path, name, *, required: bool = True) -> Path | None:
    """The one gate for every file the loader opens: ``name`` relative to ``directory``, resolved
    (symlinks included) to a regular file inside it. Returns None for a missing optional file."""
    directory = Path(directory)
    name = os.fspath(name)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{directory}: invalid file name {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{directory}: file name {name!r} leaves the checkpoint folder (absolute or '..')")
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root:
        raise CheckpointError(f"{directory / name}: is a link that leads outside the checkpoint folder")
    try:
        info = os.stat(target)  # stat, never open: a FIFO or device must not block us
    except FileNotFoundError:
        if required:
            raise CheckpointError(f"{directory / name}: file not found") from None
        return None
    except OSError as e:
        raise CheckpointError(f"{directory / name}: cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{directory / name}: not a regular file (directory, FIFO, device or socket)")
    return Path(target)


def _open_regular(path: Path):
    """Opens without blocking and re-checks on the open descriptor (the file may have been swapped)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def read_json(path: Path) -> dict:
    """A JSON object from a path that ``checkpoint_file`` has vetted."""
    try:
        with _open_regular(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not readable as JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:  # the message gives line and column, never the text
        raise CheckpointError(f"{path}: not readable as JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: not readable ({e.strerror})") from None
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
    """Tensors of one vetted weight file. Error messages name the file and the kind of damage but
    never quote its bytes (the file could be anything: a secret, /proc, ...)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        with _open_regular(path) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupted, truncated or pickled-code files all land here
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: not a valid "
                              f"{'safetensors' if path.suffix == '.safetensors' else 'plain-tensor torch'} file, "
                              "truncated, damaged or holding pickled objects)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return state


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of one vetted weight file without reading the tensors (safetensors header;
    a memory-mapped, weights-only load for ``.bin``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: not a valid weight file, "
                              "truncated, damaged or holding pickled objects)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}


def weight_files(directory: Path) -> tuple[Path, dict[str, Path] | None]:
    """(the weight file or index found, key -> shard path for an index else None)."""
    for name in WEIGHT_FILES:
        path = checkpoint_file(directory, name, required=False)
        if path is None:
            continue
        if not name.endswith(".index.json"):
            return path, None
        index = read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path}: missing or empty 'weight_map'")
        shards = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            shards[shard] = checkpoint_file(directory, shard)
        return path, {k: shards[str(v)] for k, v in weight_map.items()}
    raise CheckpointError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def read_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape over the whole checkpoint, from headers only (nothing allocated)."""
    path, weight_map = weight_files(directory)
    if weight_map is None:
        return _file_shapes(path)
    shapes = {}
    for shard in sorted(set(weight_map.values())):
        shapes.update(_file_shapes(shard))
    return shapes


def load_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory, with the file each came from."""
    path, weight_map = weight_files(directory)
    if weight_map is None:
        tensors = _load_file(path)
        return tensors, {k: path for k in tensors}
    tensors, origin = {}, {}
    for shard in sorted(set(weight_map.values())):
        part = _load_file(shard)
        tensors.update(part)
        origin.update({k: shard for k in part})
    missing = sorted(k for k in weight_map if k not in tensors)
    if missing:
        raise CheckpointError(f"{path}: keys listed in the index are absent from their shards: {missing[:5]}")
    return tensors, origin


def expected_shapes(config: MHLAConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model this config builds, from a model on the meta device (no memory)."""
    from .modeling import MHLAForCausalLM
    with torch.device("meta"):
        model = MHLAForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_config_against_weights(config: MHLAConfig, shapes: dict[str, tuple[int, ...]], source) -> None:
    """Refuses a config that does not describe these weights, before the model is allocated."""
    layer_ids = {int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if layer_ids and len(layer_ids) != config.num_hidden_layers:
        raise CheckpointError(f"{source}: config says num_hidden_layers={config.num_hidden_layers} but the weights "
                              f"have {len(layer_ids)} layers")
    want = expected_shapes(config)
    for key in ("model.embeddings.weight", "model.layers.0.attn.q_proj.weight", "model.layers.0.attn.v_proj.weight",
                "model.layers.0.mlp.gate_proj.weight"):
        if key in shapes and key in want and _squeeze_trailing(shapes[key]) != want[key]:
            raise CheckpointError(f"{source}: key {key!r} has shape {shapes[key]}, expected {want[key]} by the config "
                                  f"(vocab {config.vocab_size}, hidden {config.hidden_size}, heads {config.num_heads}, "
                                  f"intermediate {config.intermediate_size})")
    for key, shape in shapes.items():
        if key in want and _squeeze_trailing(shape) != want[key]:
            raise CheckpointError(f"{source}: key {key!r} has shape {shape}, expected {want[key]} by the config")


def read_checked_config(directory: Path) -> tuple[MHLAConfig, str]:
    """The config (and layout name) of a checkpoint folder, checked against the weights' shapes as
    the file headers give them: nothing is allocated before the two agree."""
    raw = read_json(checkpoint_file(directory, "config.json"))
    shapes = read_shapes(directory)
    mixing_keys = sorted(k for k in shapes if k.endswith("attn.mixing_matrix"))
    num_blocks = int(shapes[mixing_keys[0]][0]) if mixing_keys and shapes[mixing_keys[0]] else None
    config, layout = config_from_dict(raw, directory / "config.json", num_blocks)
    check_config_against_weights(config, shapes, directory)
    return config, layout


def read_checkpoint(path) -> tuple[MHLAConfig, dict[str, torch.Tensor], str]:
    """Config and converted state dict (this project's names and shapes) of a checkpoint directory."""
    directory = Path(os.fspath(path))
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (a checkpoint is a folder with config.json and weights)")
    config, layout = read_checked_config(directory)
    tensors, origin = load_state_dict(directory)
    out = {}
    for key, t in tensors.items():
        if layout == "reference" and key.endswith("attn.mixing_matrix"):
            try:
                t = prepare_mixing(t)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{origin[key]}: key {key!r}: {e}") from None
        out[key] = t
    return config, out, layout


class StoredWeights:
    """The weights of a checkpoint folder exactly as stored, hashed once at first use (a state
    file's fingerprint). The files' sizes and mtimes are recorded at load time: if they changed
    since, the digest is not taken (None) rather than describe other weights than those loaded."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = self._stats()
        self._digest: str | None = None

    def _stats(self) -> list[tuple[str, int, int]]:
        path, weight_map = weight_files(self.directory)
        files = [path] if weight_map is None else sorted(set(weight_map.values()))
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

    def digest(self) -> str | None:
        if self._digest is None:
            from .state_io import hash_named_tensors
            try:
                if self._stats() != self.files:
                    return None
                h = hash_named_tensors(self._tensors())
                if self._stats() != self.files:
                    return None
            except (OSError, CheckpointError):
                return None
            self._digest = h
        return self._digest

    def _tensors(self):
        """(key, tensor) in key order, one tensor in memory at a time (safetensors) or memory-mapped."""
        from safetensors import safe_open
        handles, where = [], {}
        for path, _, _ in self.files:
            if path.endswith(".safetensors"):
                f = safe_open(path, framework="pt")
                handles.append(f)
                where.update({k: f for k in f.keys()})
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                where.update({k: state for k in state})
        for key in sorted(where):
            src = where[key]
            yield key, (src[key] if isinstance(src, dict) else src.get_tensor(key))


def check_preset_architecture(directory: Path, name: str) -> None:
    """Refuses weights brought for a named architecture (``mhla-340m``) that describe another one,
    from the config and the weight headers only."""
    from .configuration import PRESETS
    directory = Path(directory)
    config, _ = read_checked_config(directory)
    want = PRESETS[name]
    fields = ("hidden_size", "num_hidden_layers", "num_heads", "expand_k", "expand_v", "hidden_ratio",
              "block_size", "num_blocks")
    diff = [f"{k} {getattr(config, k)} (expected {want[k]})" for k in fields if getattr(config, k) != want[k]]
    if diff:
        raise CheckpointError(f"{directory}: these weights are not {name}: {', '.join(diff)}; load the folder "
                              "itself as the model to run another shape")


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
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        # the fingerprint hashes the weights as stored, not as cast; taken at first use
        model._mhla_stored_weights = StoredWeights(Path(source))
