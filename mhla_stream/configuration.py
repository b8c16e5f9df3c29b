"""``MHLAConfig`` and the named presets (SPEC section 3)."""
from __future__ import annotations

import math

from transformers import PretrainedConfig

from .mixing import DEFAULT_POLICY, check_policy
from .presets import PRESETS


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
        # types and ranges first: nothing downstream (the intermediate size, the model) sees a bad value
        _check_config_values(locals())
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
        self.check_size()

    def validate_dims(self) -> None:
        key_dim, value_dim = int(self.hidden_size * self.expand_k), int(self.hidden_size * self.expand_v)
        for name, total in (("key", key_dim), ("value", value_dim)):
            if total % self.num_heads:
                raise ValueError(f"{name} dim {total} is not divisible by num_heads={self.num_heads}")
        if self.head_k_dim % 2:
            raise ValueError(f"RoPE needs an even per-head key dim, got {self.head_k_dim}")

    def estimated_parameters(self) -> int:
        H, K, V, D = self.num_heads, self.head_k_dim, self.head_v_dim, self.hidden_size
        per_layer = D * (2 * H * K + 2 * H * V) + H * V * D + 3 * D * self.intermediate_size + self.num_blocks ** 2
        embeddings = self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer

    def estimated_state_bytes(self) -> int:
        """fp32 streaming state of one sequence (ring of L-1 summaries plus three more, and the open
        block's key and value buffers, which grow with the block size)."""
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        return 4 * self.num_hidden_layers * H * (K * V * (self.num_blocks + 3) + self.block_size * (K + V))

    def check_size(self) -> None:
        """Absurd sizes are refused here, before anything is allocated."""
        params, state = self.estimated_parameters(), self.estimated_state_bytes()
        if params > MAX_PARAMETERS:
            raise ValueError(f"config describes {params:,} parameters, more than the {MAX_PARAMETERS:,} this runtime "
                             "accepts; check hidden_size, num_hidden_layers, vocab_size and intermediate_size")
        if state > MAX_STATE_BYTES:
            raise ValueError(f"config needs {state / 2**30:,.1f} GiB of streaming state per sequence, more than "
                             f"{MAX_STATE_BYTES / 2**30:,.0f} GiB; check num_blocks and the head dims")

    @property
    def head_k_dim(self) -> int:
        return int(self.hidden_size * self.expand_k) // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return int(self.hidden_size * self.expand_v) // self.num_heads

    @property
    def trained_context(self) -> int:
        return self.block_size * self.num_blocks


MAX_PARAMETERS = 1 << 37      # ~137B: far past anything this runtime serves, far below an absurd config
MAX_STATE_BYTES = 1 << 36     # 64 GiB of state per sequence
_MAX_DIM = 1 << 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _show(x) -> str:
    """A value for an error message, cut short (a config may hold anything)."""
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_config_values(v: dict) -> None:
    """One place for the types and ranges of every MHLAConfig field; one clear line per problem."""
    errors = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "block_size", "num_blocks"):
        x = v[name]
        if not _is_int(x) or not 1 <= x <= _MAX_DIM:
            errors.append(f"{name} must be an int in [1, {_MAX_DIM}], got {_show(x)}")
    inter = v["intermediate_size"]
    if inter is not None and not (_is_int(inter) and 1 <= inter <= _MAX_DIM):
        errors.append(f"intermediate_size must be None or an int in [1, {_MAX_DIM}], got {_show(inter)}")
    for name in ("expand_k", "expand_v", "hidden_ratio"):
        if not _is_real(v[name]) or not 0 < v[name] <= 64:
            errors.append(f"{name} must be a finite number in (0, 64], got {_show(v[name])}")
    if not _is_real(v["rope_theta"]) or v["rope_theta"] <= 0:
        errors.append(f"rope_theta must be a finite number > 0, got {_show(v['rope_theta'])}")
    if not _is_real(v["norm_eps"]) or not 0 < v["norm_eps"] < 1:
        errors.append(f"norm_eps must be a number in (0, 1), got {_show(v['norm_eps'])}")
    if not _is_real(v["initializer_range"]) or v["initializer_range"] < 0:
        errors.append(f"initializer_range must be a finite number >= 0, got {_show(v['initializer_range'])}")
    if not isinstance(v["tie_word_embeddings"], bool):
        errors.append(f"tie_word_embeddings must be true or false, got {_show(v['tie_word_embeddings'])}")
    vocab = v["vocab_size"] if _is_int(v["vocab_size"]) else None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        x = v[name]
        if x is not None and not (_is_int(x) and 0 <= x < (vocab or 0)):
            errors.append(f"{name} must be None or an id in [0, vocab_size={vocab}), got {_show(x)}")
    if not isinstance(v["mixing_policy"], str):
        errors.append(f"mixing_policy must be a string, got {_show(v['mixing_policy'])}")
    if errors:
        raise ValueError("invalid MHLA config: " + "; ".join(errors))


def preset_config(name: str, **overrides) -> MHLAConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return MHLAConfig(**{**PRESETS[name], **overrides})
