"""mhla-stream: a streaming, stateful runtime for MHLA (multi-head linear attention) models.

Names are imported on first use (module ``__getattr__``), so that ``import mhla_stream`` and the
command lines' ``--help`` do not pay for importing torch and transformers. Using the model classes
(``MHLAConfig``, ``MHLAForCausalLM``, ``MHLAModel``, or anything that loads a model) registers them
with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "mhla_attention": "attention", "mhla_reference": "reference", "MHLAState": "state", "MHLACache": "cache",
    "MHLAConfig": "configuration", "PRESETS": "configuration", "preset_config": "configuration",
    "MHLAForCausalLM": "modeling", "MHLAModel": "modeling", "CheckpointError": "checkpoint",
    "SamplingParams": "sampling", "StateFileError": "state_io", "Snapshot": "streaming", "StreamingMHLA": "streaming",
    "DEFAULT_MODEL": "hub", "ModelNotFound": "hub", "extend_mixing": "mixing", "POLICIES": "mixing",
    "DEFAULT_POLICY": "mixing",
}

__all__ = ["mhla_attention", "mhla_reference", "MHLAState", "MHLAConfig", "MHLAForCausalLM", "MHLAModel",
           "CheckpointError", "MHLACache", "SamplingParams", "StateFileError", "Snapshot", "StreamingMHLA",
           "DEFAULT_MODEL", "ModelNotFound", "PRESETS", "preset_config", "extend_mixing", "POLICIES", "DEFAULT_POLICY",
           "__version__"]


def register_auto_classes() -> None:
    """``AutoConfig`` / ``AutoModelForCausalLM`` learn ``model_type: "mhla"`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration import MHLAConfig
    from .modeling import MHLAForCausalLM
    AutoConfig.register("mhla", MHLAConfig, exist_ok=True)
    AutoModelForCausalLM.register(MHLAConfig, MHLAForCausalLM, exist_ok=True)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mhla_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
