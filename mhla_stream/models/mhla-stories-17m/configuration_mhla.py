"""Lets plain transformers load this folder with trust_remote_code=True. The model code is the
installed mhla-stream runtime (https://pypi.org/project/mhla-stream); this file only points at it."""
try:
    from mhla_stream.configuration import MHLAConfig
except ImportError as error:
    raise ImportError("this model folder needs the mhla-stream runtime, which is not installed: "
                      "pip install mhla-stream") from error

__all__ = ["MHLAConfig"]
