"""Model names -> local directories. Everything is offline.

* a path to a checkpoint directory (this project's layout or the reference layout);
* ``mhla-340m``: the paper's architecture on weights the user brings, looked up in ``weights``,
  then ``$MHLA_STREAM_HOME/mhla-340m``, then ``~/.cache/mhla_stream/mhla-340m``;
* the project's own small models, shipped inside the package (``mhla_stream/models/<name>``).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGED = Path(__file__).parent / "models"
DEFAULT_MODEL = "mhla-stories-17m"
USER_WEIGHT_MODELS = ("mhla-340m",)


class ModelNotFound(FileNotFoundError):
    pass


def packaged_models() -> list[str]:
    return sorted(p.name for p in PACKAGED.iterdir() if (p / "config.json").exists()) if PACKAGED.is_dir() else []


def weight_search_path(name: str, weights=None) -> list[Path]:
    places = [Path(weights)] if weights else []
    if os.environ.get("MHLA_STREAM_HOME"):
        places.append(Path(os.environ["MHLA_STREAM_HOME"]) / name)
    places.append(Path.home() / ".cache" / "mhla_stream" / name)
    return places


def resolve_model(name_or_path, weights=None) -> Path:
    name = os.fspath(name_or_path)
    if weights is not None and name not in USER_WEIGHT_MODELS:
        raise ValueError(f"weights are only taken by {', '.join(USER_WEIGHT_MODELS)}; {name!r} brings its own "
                         "(give a checkpoint folder as the model instead)")
    if name in USER_WEIGHT_MODELS:
        places = weight_search_path(name, weights)
        for p in places:
            if (p / "config.json").exists():
                from .checkpoint import check_preset_architecture
                check_preset_architecture(p, name)  # a checkpoint of another shape is not this model
                return p
        looked = "\n".join(f"  - {p}" for p in places)
        raise ModelNotFound(
            f"no weights for {name} found. Looked in:\n{looked}\n"
            f"No {name} weights are published; bring your own and put them in one of those folders "
            "(or pass --weights DIR). Either layout works:\n"
            "  - this project's: config.json (model_type 'mhla') + model.safetensors, as save_pretrained writes;\n"
            "  - the reference's: config.json (model_type 'gla', attn_extends 'mhla', feature_map 'relu') + "
            "model.safetensors or pytorch_model.bin (sharded with an index json is fine).")
    packaged = PACKAGED / name
    if (packaged / "config.json").exists():
        return packaged
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    known = ", ".join(packaged_models() + list(USER_WEIGHT_MODELS)) or "none"
    raise ModelNotFound(f"model {name!r} not found: not a directory and not a known name (known: {known})")
