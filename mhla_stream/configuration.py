"""``MHLAConfig`` and the named presets (SPEC section 3)."""
from __future__ import annotations

import math

from transformers import PretrainedConfig

from .mixing import DEFAULT_POLICY, check_policy


def mlp_intermediate_size(hidden_size: int, hidden_ratio: int) -> int:
    """The reference MLP width: ``256 * ceil(int(hidden * ratio * 2/3) / 256)``."""
    return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)


class MHLAConfig(PretrainedConfig):
    model_type = "mhla"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 1024, num_hidden_layers: int = 24,
                 num_heads: int = 4, expand_k: float = 0.5, expand_v: float = 1.0, hidden_ratio: int = 4,
                 intermediate_size: int | None = None, norm_eps: float = 1e-6, block_size: int = 64,
                 num_blocks: int = 32, rope_theta: float = 10000.0, mixing_policy: str = DEFAULT_POLICY,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True, bos_token_id: int = 1,
                 eos_token_id: int = 2, pad_token_id: int | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size or mlp_intermediate_size(hidden_size, hidden_ratio)
        self.norm_eps = norm_eps
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.rope_theta = rope_theta
        self.mixing_policy = check_policy(mixing_policy)
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.validate_dims()

    def validate_dims(self) -> None:
        key_dim, value_dim = int(self.hidden_size * self.expand_k), int(self.hidden_size * self.expand_v)
        for name, total in (("key", key_dim), ("value", value_dim)):
            if total % self.num_heads:
                raise ValueError(f"{name} dim {total} is not divisible by num_heads={self.num_heads}")
        if self.head_k_dim % 2:
            raise ValueError(f"RoPE needs an even per-head key dim, got {self.head_k_dim}")

    @property
    def head_k_dim(self) -> int:
        return int(self.hidden_size * self.expand_k) // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return int(self.hidden_size * self.expand_v) // self.num_heads

    @property
    def trained_context(self) -> int:
        return self.block_size * self.num_blocks


# The paper's NLP run (SPEC section 3); weights come from the user.
PRESETS: dict[str, dict] = {
    "mhla-340m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=4, expand_k=0.5,
                      expand_v=1.0, hidden_ratio=4, norm_eps=1e-6, block_size=64, num_blocks=32,
                      bos_token_id=1, eos_token_id=2),
    # Tiny shapes for tests: a few blocks so that streaming crosses the trained edge quickly.
    "mhla-tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=2, expand_k=0.5,
                      expand_v=1.0, hidden_ratio=2, norm_eps=1e-6, block_size=8, num_blocks=4,
                      bos_token_id=1, eos_token_id=2),
}


def preset_config(name: str, **overrides) -> MHLAConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return MHLAConfig(**{**PRESETS[name], **overrides})
