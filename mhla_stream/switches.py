"""The environment variables that steer execution, read once per process (``switches()``).

    TRITON_INTERPRET=1            Triton kernels run in the interpreter (CPU tests)
    MHLA_STREAM_FUSED_DECODE=0    no batch-1 fused decode, no batched decode step and no Triton
                                  feature kernel in prefill
    MHLA_STREAM_FUSED_BATCH=N     the largest batch that decodes with the fused step (five Triton
                                  launches a layer); larger batches take the batched step (default:
                                  16, or 32 where the step picks name the model's products)
    MHLA_STREAM_PDL=0             no programmatic dependent launch between decode kernels, nor for
                                  the compiled elementwise kernels (inductor's triton.enable_pdl)
    MHLA_STREAM_PDL_EARLY=0       a decode kernel lets its successor start only after its main loop
                                  (default: at its first instruction, so the successor's weight
                                  loads overlap this kernel's whole run)
    MHLA_STREAM_COMPILE=0         no torch.compile of the elementwise ops on CUDA
    MHLA_STREAM_TRITON_TRAIN=0    training keeps the differentiable torch chunk form on CUDA
                                  (default: the Triton forward + backward)
    MHLA_STREAM_TUNE=0            the prefill kernels take one launch configuration each instead of
                                  timing several per shape (the GPU test sweep: minutes of compiling)
    MHLA_STREAM_STEP_PICKS=PATH   the user's file of decode-step launch shapes (default
                                  ~/.cache/mhla_stream/step_picks.json; 0: no picks, each product
                                  tuned alone). Read by ``kernels/step_picks.py`` (a path, not a switch)

Each MHLA_STREAM_* switch is off for 0, false, no or off (any case), on otherwise.

Kept apart from ``plan.py`` so that the kernels can read the same switches without importing
library policy.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass


# the default largest fused-decode batch (measured, H100, mhla-340m, session 16: the fused step
# beats the batched one by 19-26% at batches 2-16 with its products tuned alone)
FUSED_BATCH = 16
# ... and up to this batch where the step picks (``kernels/step_picks.py``) name the model's
# products for the batch's row block: with the whole-slice shapes picked in the step the fused step
# beat the batched one by 12% at 32 (1,078 against 1,226 us); tuned alone it lost by 12% (1,373;
# session 22); at 64 it lost by 7% even picked (1,692 against 1,579 us). README, Speed
FUSED_BATCH_PICKED = 32


@dataclass(frozen=True)
class Switches:
    interpret: bool
    fused_decode: bool
    pdl: bool
    compile: bool
    triton_train: bool = True
    tune: bool = True
    pdl_early: bool = True
    fused_batch: int = FUSED_BATCH
    fused_batch_set: bool = False  # MHLA_STREAM_FUSED_BATCH given: it decides, picks or not


OFF = ("0", "false", "no", "off")  # what turns a switch off ("false" read as on would be a silent surprise)


def _on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in OFF


@functools.lru_cache(maxsize=None)
def switches() -> Switches:
    return Switches(interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
                    fused_decode=_on("MHLA_STREAM_FUSED_DECODE"),
                    pdl=_on("MHLA_STREAM_PDL"),
                    compile=_on("MHLA_STREAM_COMPILE"),
                    triton_train=_on("MHLA_STREAM_TRITON_TRAIN"),
                    tune=_on("MHLA_STREAM_TUNE"),
                    pdl_early=_on("MHLA_STREAM_PDL_EARLY"),
                    fused_batch=_count("MHLA_STREAM_FUSED_BATCH", FUSED_BATCH),
                    fused_batch_set=bool(os.environ.get("MHLA_STREAM_FUSED_BATCH", "").strip()))


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be a whole number >= 0 (0: no fused decode), got {raw!r}")
    return value
