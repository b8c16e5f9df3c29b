"""Model names -> local directories. Everything is offline.

* a path to a checkpoint directory (this project's layout or the reference layout);
* ``mhla-340m``: the paper's architecture on weights the user brings, looked up in ``weights``,
  then ``$MHLA_STREAM_HOME/mhla-340m``, then ``~/.cache/mhla_stream/mhla-340m``;
* the project's own small models, shipped inside the package (``mhla_stream/models/<name>``);
* a Hugging Face Hub id (``org/name``) already in the huggingface_hub cache: read with
  ``local_files_only=True``, so nothing is downloaded (``hf download org/name`` fetches one).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

PACKAGED = Path(__file__).parent / "models"
DEFAULT_MODEL = "mhla-stories-17m"
USER_WEIGHT_MODELS = ("mhla-340m",)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFound(FileNotFoundError):
    pass


def cached_hub_model(repo_id: str) -> Path:
    """The local snapshot of a Hub model, from the huggingface_hub cache only (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        raise ModelNotFound(f"model {repo_id!r} is not in the Hugging Face cache ({type(e).__name__}); this runtime "
                            f"never downloads: fetch it first with `hf download {repo_id}` (or point --model at a "
                            "folder)") from None


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
    if HUB_ID.fullmatch(name):
        return cached_hub_model(name)
    known = ", ".join(packaged_models() + list(USER_WEIGHT_MODELS)) or "none"
    raise ModelNotFound(f"model {name!r} not found: not a directory and not a known name (known: {known})")
