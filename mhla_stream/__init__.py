"""mhla-stream: a streaming, stateful runtime for MHLA (multi-head linear attention) models."""
from .attention import mhla_attention
from .mixing import DEFAULT_POLICY, POLICIES, extend_mixing
from .reference import mhla_reference
from .state import MHLAState

__version__ = "0.1.0"
__all__ = ["mhla_attention", "mhla_reference", "MHLAState", "extend_mixing", "POLICIES", "DEFAULT_POLICY",
           "__version__"]
