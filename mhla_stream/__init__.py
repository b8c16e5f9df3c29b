"""mhla-stream: a streaming, stateful runtime for MHLA (multi-head linear attention) models."""
from transformers import AutoConfig, AutoModelForCausalLM

from .attention import mhla_attention
from .checkpoint import CheckpointError
from .configuration import PRESETS, MHLAConfig, preset_config
from .mixing import DEFAULT_POLICY, POLICIES, extend_mixing
from .modeling import MHLAForCausalLM, MHLAModel
from .reference import mhla_reference
from .state import MHLAState
from .cache import MHLACache
from .sampling import SamplingParams
from .state_io import StateFileError
from .streaming import Snapshot, StreamingMHLA
from .hub import DEFAULT_MODEL, ModelNotFound

AutoConfig.register("mhla", MHLAConfig, exist_ok=True)
AutoModelForCausalLM.register(MHLAConfig, MHLAForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["mhla_attention", "mhla_reference", "MHLAState", "MHLAConfig", "MHLAForCausalLM", "MHLAModel",
           "CheckpointError", "MHLACache", "SamplingParams", "StateFileError", "Snapshot", "StreamingMHLA",
           "DEFAULT_MODEL", "ModelNotFound", "PRESETS", "preset_config", "extend_mixing", "POLICIES", "DEFAULT_POLICY",
           "__version__"]
