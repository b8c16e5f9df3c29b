"""Next-token selection: greedy or sampling with temperature, top-k, top-p, min-p and repetition penalty.

The transforms are applied in the order transformers' ``generate`` applies them (repetition
penalty, temperature, top-k, top-p, min-p), so the same seed and settings give the same tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


# The documented defaults (README, "Generation settings"): used for what a model folder's
# generation_config.json does not say. No repetition penalty, so greedy decoding (-t 0,
# do_sample=False) is exactly transformers' greedy with the same folder.
DEFAULTS = {"max_new_tokens": 200, "do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}
# settings shared with transformers.GenerationConfig (the rest are the runtime's own)
HF_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0     # 0 means greedy
    top_k: int = 0               # 0 disables
    top_p: float = 1.0           # 1 disables
    min_p: float = 0.0           # 0 disables; else drop tokens below min_p x the top probability
    repetition_penalty: float = 1.0
    do_sample: bool = True
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens must be an int >= 0"),
            (_num(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0 (0 = greedy)"),
            (_int(self.top_k) and self.top_k >= 0, "top_k must be an int >= 0 (0 = off)"),
            (_num(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (_num(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1] (0 = off)"),
            (_num(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be a finite number > 0"),
            (isinstance(self.do_sample, bool), "do_sample must be true or false"),
            (isinstance(self.stop_at_eos, bool), "stop_at_eos must be true or false"),
            (self.seed is None or (_int(self.seed) and 0 <= self.seed < 2 ** 64),
             "seed must be None or an int in [0, 2**64)"),
            (isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
             "stop must be a list of non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter: {msg}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_kwargs(cls, **kw) -> "SamplingParams":
        """Explicit settings only: what is not given keeps the dataclass's neutral value."""
        _check_names(kw)
        return cls(**{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def resolve(cls, generation_config=None, **kw) -> "SamplingParams":
        """The one place settings come from: ``kw`` (None = not given), then the model folder's
        ``generation_config`` (a ``transformers.GenerationConfig`` or a dict; only what it sets),
        then ``DEFAULTS``. ``temperature=0`` means greedy, as ``do_sample=False`` does."""
        _check_names(kw)
        given = {k: v for k, v in kw.items() if v is not None}
        folder = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else \
            dict(generation_config or {})
        settings = {**DEFAULTS, **{k: v for k, v in folder.items() if k in HF_KEYS and v is not None}}
        if given.get("temperature") == 0:
            given.setdefault("do_sample", False)
        elif "temperature" in given and "do_sample" not in given:
            given["do_sample"] = True  # asking for a temperature asks for sampling
        settings.update(given)
        if settings.get("do_sample") is False:  # greedy: sampling-only settings do not apply
            for key in _SAMPLING_ONLY:
                settings.pop(key, None)
        params = cls(**settings)
        _validate_with_transformers(params)
        return params


def _check_names(kw: dict) -> None:
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")


def _validate_with_transformers(p: SamplingParams) -> None:
    """transformers' own checks on the shared settings, as one ValueError line."""
    from transformers import GenerationConfig
    shared = {k: getattr(p, k) for k in HF_KEYS}
    if p.greedy:
        shared = {k: v for k, v in shared.items() if k not in _SAMPLING_ONLY}
        shared["do_sample"] = False
    if not shared.get("min_p"):
        shared.pop("min_p", None)
    try:
        GenerationConfig(**shared).validate(strict=True)
    except ValueError as e:
        raise ValueError(f"invalid sampling parameter: {str(e).splitlines()[0]}") from None


def _num(x) -> bool:
    """A real, finite number (inf temperature would sample uniformly, NaN would sample garbage)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V]; history [B, N] token ids. Seen tokens: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)                  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[..., -1] = False                                            # keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def select_next(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next ids [B]."""
    logits = apply_repetition_penalty(logits.float(), history, p.repetition_penalty)
    if p.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
