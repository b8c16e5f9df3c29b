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


def rows_for(slots: int, admit_batch: int = 1, park: int = 0) -> int:
    """State rows a runner allocates for ``slots``: the slots, the staging row, the batched-admission
    rows (``admit_batch`` capped at the slots; none for one) and the park rows (StepRunner)."""
    admit = min(admit_batch, slots)
    return slots + 1 + (admit if admit > 1 else 0) + park


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def check_rows_fit(model, slots: int, *, admit_batch: int = 1, park: int = 0, policy=None, state_dtype=None,
                   free: int | None = None) -> int:
    """Raises ``NotEnoughMemory`` when the rows of ``rows_for(slots, admit_batch, park)`` states do not
    fit in HEADROOM of the free memory (``free``, default: measured now); returns one row's bytes."""
    per_row = row_bytes(model, policy, state_dtype)
    free = free_bytes(model.device) if free is None else free
    rows = rows_for(slots, admit_batch, park)
    if free is None or rows * per_row <= HEADROOM * free:
        return per_row
    room = int(HEADROOM * free // per_row)  # rows that fit
    lo, hi = 0, slots - 1  # the most slots whose rows fit (rows_for grows with the slots): a bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if rows_for(mid, admit_batch, park) <= room else (lo, mid - 1)
    fit = lo
    advice = [f"use --max-batch {fit} or less" if fit else "not even one slot fits"]
    if rows_for(max(fit, 1), admit_batch, park) > rows_for(max(fit, 1)):
        advice.append("--admit-batch 1 --no-async-session-copy leave out the admission and park rows")
    if row_bytes(model, policy, torch.bfloat16) < per_row:
        advice.append("--state-dtype bf16 stores the ring in half the memory")
    raise NotEnoughMemory(
        f"{slots} slots need {rows} rows of streaming state (with the staging, admission and park rows), "
        f"{_size(rows * per_row)} at {_size(per_row)} a row, but {model.device.type} has {_size(free)} free "
        f"(this server uses at most {HEADROOM:.0%} of it for states): " + "; ".join(advice))
