"""Whether the server's preallocated state rows fit where they go, checked before they are allocated.

Every slot, the staging row, the batched-admission rows and the park rows each hold a whole
streaming state (396 MiB for mhla-340m with the fp32 ring). Allocating more than the device has
ends in an out-of-memory traceback on CUDA, and on the CPU (zeroed pages are only committed when
touched) in the kernel killing the process later, in the middle of serving. So the rows are
counted first and a clear message says what fits.
"""
from __future__ import annotations

import torch

HEADROOM = 0.9  # of the free memory: the rest for activations, captured graphs and the allocator's slack


class NotEnoughMemory(RuntimeError):
    """The state rows asked for do not fit in the free memory of the device they go to."""


def row_bytes(model, policy=None, state_dtype=None) -> int:
    """Bytes of one sequence's state for ``model`` (all layers), counted on the meta device."""
    return sum(s.nbytes for s in model.new_state(1, policy, device="meta", state_dtype=state_dtype))


def free_bytes(device: torch.device) -> int | None:
    """Free memory where ``device``'s tensors live: the GPU's free memory, or the host's available
    memory for the CPU (Linux's MemAvailable); None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_rows_fit(model, slots: int, extra_rows: int, *, policy=None, state_dtype=None, free: int | None = None) -> int:
    """Raises ``NotEnoughMemory`` when ``slots`` + ``extra_rows`` states do not fit in HEADROOM of the
    free memory (``free``, default: measured now); returns the bytes of one row."""
    per_row = row_bytes(model, policy, state_dtype)
    free = free_bytes(model.device) if free is None else free
    need = (slots + extra_rows) * per_row
    if free is None or need <= HEADROOM * free:
        return per_row
    fit = int(HEADROOM * free // per_row) - extra_rows
    gib = 2 ** 30
    advice = [f"use --max-batch {fit} or less" if fit >= 1 else "not even one slot fits"]
    if extra_rows > 1:
        advice.append("--admit-batch 1 --no-async-session-copy leave out the extra working rows")
    if row_bytes(model, policy, torch.bfloat16) < per_row:
        advice.append("--state-dtype bf16 stores the ring in half the memory")
    raise NotEnoughMemory(
        f"{slots} slots and {extra_rows} working rows of streaming state need {need / gib:.1f} GiB "
        f"({per_row / 2 ** 20:.1f} MiB each), but {model.device.type} has {free / gib:.1f} GiB free (this server "
        f"uses at most {HEADROOM:.0%} of it for states): " + "; ".join(advice))
