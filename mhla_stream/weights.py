"""Derived weight tensors of the inference paths, kept in step with the parameters they come from."""
from __future__ import annotations

import torch
from torch import nn


def _version(w: torch.Tensor):
    """The in-place version counter; weights made under ``torch.inference_mode()`` have none
    (they cannot be changed in place outside it), so their data pointer stands in."""
    if w.is_inference():
        return ("inference", w.data_ptr())
    return w._version


class ConcatenatedWeight:
    """The weights of several projections of one input, concatenated, so that at inference on a
    GPU they run as one matrix product (fewer launches per decoded token). A real tensor, made
    on first use (``MHLAForCausalLM.prepare_inference`` makes them all up front) and made again
    whenever a source weight is replaced, moved or cast (``to()``), or changed in place
    (``load_state_dict``, an optimizer step: its version counter moves).

    ``norm``: an RMSNorm (``modeling.RMSNorm``) whose weight is folded into the columns (tiled
    ``repeat`` times), W diag(w), for products that take the norm as a scale of their sums (the
    fused step from two rows)."""

    def __init__(self, *linears: nn.Linear, norm: nn.Module | None = None, repeat: int = 1):
        self._linears = linears  # a plain tuple: the modules stay registered on their owner only
        self._norm, self._repeat = (norm,) if norm is not None else (), repeat
        self._made_from, self.tensor = None, None

    def _source_key(self, ws):
        # (data_ptr: a ``.data =`` swap keeps the version; in-place writes through ``.data`` are not seen)
        return tuple((w, _version(w), w.data_ptr(), w.device, w.dtype) for w in ws)

    def get(self) -> torch.Tensor:
        ws = [lin.weight for lin in self._linears]
        key = self._source_key(ws + [n.weight for n in self._norm])
        stale = self._made_from is None or any(
            a[0] is not b[0] or a[1:] != b[1:] for a, b in zip(key, self._made_from))
        if stale:
            tensor = torch.cat(ws, 0) if len(ws) > 1 else ws[0].detach().clone()
            if self._norm:  # (in fp32, one rounding to the weight's dtype)
                scale = self._norm[0].weight.detach().float().repeat(self._repeat)
                tensor = (tensor.float() * scale).to(ws[0].dtype)
            self.tensor, self._made_from = tensor.detach(), key
            if self.tensor.is_cuda and not torch.cuda.is_current_stream_capturing():
                # the decode kernels read their first weight tile before waiting on the previous
                # kernel (programmatic dependent launch): the new copy must be complete by then
                torch.cuda.current_stream().synchronize()
        return self.tensor
