"""Files that make a model folder usable from plain transformers (no ``import mhla_stream`` first).

* ``configuration_mhla.py`` / ``modeling_mhla.py``: two-line shims that import the installed
  mhla-stream package, named by ``auto_map`` in ``config.json`` so that
  ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` finds the classes;
* ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` converted from the
  SentencePiece ``tokenizer.model`` (same ids, see ``hf_tokenizer``);
* ``generation_config.json``: the sampling settings the runtime and ``generate()`` both read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .sampling import DEFAULTS

AUTO_MAP = {"AutoConfig": "configuration_mhla.MHLAConfig", "AutoModel": "modeling_mhla.MHLAModel",
            "AutoModelForCausalLM": "modeling_mhla.MHLAForCausalLM"}

_SHIM = '''"""Lets plain transformers load this folder with trust_remote_code=True. The model code is the
installed mhla-stream runtime (https://pypi.org/project/mhla-stream); this file only points at it."""
try:
    from mhla_stream.{module} import {names}
except ImportError as error:
    raise ImportError("this model folder needs the mhla-stream runtime, which is not installed: "
                      "pip install mhla-stream") from error

__all__ = [{quoted}]
'''

SHIMS = {"configuration_mhla.py": ("configuration", ["MHLAConfig"]),
         "modeling_mhla.py": ("modeling", ["MHLAForCausalLM", "MHLAModel"])}


def shim_source(module: str, names: list[str]) -> str:
    return _SHIM.format(module=module, names=", ".join(names), quoted=", ".join(f'"{n}"' for n in names))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shims(directory) -> None:
    """The shim files and ``auto_map`` in an existing ``config.json``."""
    d = Path(directory)
    for name, (module, names) in SHIMS.items():
        _write_text(d / name, shim_source(module, names))
    config_path = d / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = dict(AUTO_MAP)
    _write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_generation_config(directory, config=None, overrides: dict | None = None) -> None:
    """``generation_config.json``: the documented defaults, then what the folder already says, then
    ``overrides``; validated by transformers' ``GenerationConfig``."""
    from transformers import GenerationConfig
    d = Path(directory)
    settings = dict(DEFAULTS)
    existing = d / "generation_config.json"
    if existing.exists():
        settings.update(GenerationConfig.from_pretrained(d).to_diff_dict())
    settings.update(overrides or {})
    for key in ("transformers_version", "_from_model_config"):
        settings.pop(key, None)
    if config is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, key, None) is not None:
                settings.setdefault(key, getattr(config, key))
    gen = GenerationConfig(**settings)
    gen.validate(strict=True)
    gen.save_pretrained(d)


def write_hf_files(directory, config=None, tokenizer_model=None, converted=None) -> None:
    """Everything plain transformers needs next to ``config.json`` and the weights. ``tokenizer_model``:
    a SentencePiece file to copy in and convert (default: the folder's own ``tokenizer.model``);
    ``converted``: its conversion, made earlier by the caller."""
    d = Path(directory)
    write_shims(d)
    write_generation_config(d, config)
    sp = d / "tokenizer.model"
    if tokenizer_model is not None and Path(tokenizer_model).resolve() != sp.resolve():
        sp.write_bytes(Path(tokenizer_model).read_bytes())
    if sp.exists():
        from .hf_tokenizer import write_tokenizer_files
        write_tokenizer_files(sp, d, converted=converted)  # the stream has no length limit: no model_max_length
