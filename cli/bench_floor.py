"""The memory-traffic floor of a decode step, so that ``mhla-bench`` can say how close decode
runs to the hardware: a step must read every weight once and, per sequence, its state.

Per sequence, per layer, per token the decode form (SPEC section 1) reads the mixed prefix P,
reads and writes the running partial R; when a block closes (every C-th token) it reads the W
ring slots (and the far sum), writes one slot, the new P and the far sum. The closing traffic is
amortised over the C tokens of the block. Activations are a few kB a step and are not counted.
"""
from __future__ import annotations

import torch


def weight_bytes(model) -> int:
    """Bytes of the model's parameters, each counted once (``parameters()`` yields a tied weight
    once: the LM head shares the embedding, which a step reads once as the head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes_per_token(states) -> float:
    """State bytes one sequence moves per decode token, summed over layers (``states``: the
    model's per-layer ``MHLAState`` list; element sizes are read from the tensors, so a narrower
    ring storage is accounted for)."""
    total = 0.0
    for s in states:
        kv = s.prefix[0].numel()                     # H * K * V of one sequence
        f32 = s.prefix.element_size()
        per_token = 3 * kv * f32                     # read P, read + write R
        ring_es = s.ring.element_size()
        close = (s.window + 1) * kv * ring_es + kv * f32        # read W slots, write one; write P
        if s.far.numel():
            close += 2 * kv * f32                                # far: read + write
        total += per_token + close / s.block_size
    return total


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Measured device copy rate in bytes/s (bytes read + bytes written over the time): the
    practical bandwidth ceiling the floor is computed with, taken in the same run."""
    from triton.testing import do_bench
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def decode_floor(model, states, batch: int, bandwidth: float) -> dict:
    """Floor of one batched decode step: bytes moved, time at ``bandwidth``, tokens/s."""
    w = weight_bytes(model)
    s = state_bytes_per_token(states) * batch
    step_s = (w + s) / bandwidth
    return {"weight_MB": w / 1e6, "state_MB_per_step": s / 1e6, "floor_ms_per_step": step_s * 1e3,
            "floor_tok_s": batch / step_s, "bandwidth_TBps": bandwidth / 1e12}
