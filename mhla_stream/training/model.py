"""The models ``mhla-train`` builds, and the module whose forward is the training loss.

The loss module reads the causal LM from outside: the plain path calls the model's own forward,
the fused path runs the decoder stack (MHLA's ``model.model``, transformers' ``get_decoder()`` for
Llama and fla's GLA) and hands its last hidden state to the fused head + cross-entropy, so the full
logits never exist. Activation checkpointing wraps each block's
forward from here too; ``modeling.py`` is not changed for training.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..plan import make_plan
from .fused_loss import fused_linear_cross_entropy

from . import ARCHS  # noqa: F401  (re-exported)


class ArchError(ValueError):
    """A shape or an arch this machine cannot build (``mhla-train`` prints it as one line)."""


def resolve_shape(preset: str | None, hidden: int, layers: int, heads: int, block_size: int, num_blocks: int) -> dict:
    """The shape every arch is built with: the preset's where one is named (its hidden_ratio too)."""
    if preset is None:
        return dict(hidden=hidden, layers=layers, heads=heads, block_size=block_size, num_blocks=num_blocks,
                    hidden_ratio=4)
    from mhla_stream.presets import PRESETS
    p = PRESETS[preset]
    return dict(hidden=p["hidden_size"], layers=p["num_hidden_layers"], heads=p["num_heads"], block_size=p["block_size"],
                num_blocks=p["num_blocks"], hidden_ratio=p["hidden_ratio"])


def check_shape(arch: str, shape: dict) -> None:
    """Refuse, with one line, a shape the baseline's own code would reject with an assertion or a traceback."""
    hidden, heads = shape["hidden"], shape["heads"]
    if arch == "transformer" and hidden % 64:
        raise ArchError(f"--hidden {hidden}: the transformer baseline needs a multiple of 64 (heads of 64)")
    if arch == "gla" and (hidden % 2 or (hidden // 2) % heads):  # expand_k 0.5: hidden / 2 keys over the heads
        raise ArchError(f"--hidden {hidden} --heads {heads}: GLA needs hidden / 2 divisible by the number of heads")


def load_fla():
    """fla's GLA classes, or ArchError with one line: fla is optional (not a dependency of mhla-stream)."""
    try:
        from fla.models import GLAConfig, GLAForCausalLM
    except Exception as e:  # noqa: BLE001  not installed, or installed but broken: fla runs Triton code on import
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise ArchError(f"--arch gla needs fla (pip install flash-linear-attention), which does not import here: "
                        f"{type(e).__name__}: {why}") from None
    return GLAConfig, GLAForCausalLM


def build_gla(vocab: int, shape: dict):
    """fla's GLA at MHLA's shape: same width, depth, heads, key/value expansion and MLP; tied embeddings.
    fla's fused norm and fused losses are off, so that LossModule computes the loss the same way for
    every arch (its fused path needs only the decoder's last hidden state and the head's weight)."""
    GLAConfig, GLAForCausalLM = load_fla()
    cfg = GLAConfig(vocab_size=vocab, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                    num_heads=shape["heads"], expand_k=0.5, expand_v=1.0, hidden_ratio=shape["hidden_ratio"],
                    max_position_embeddings=shape["block_size"] * shape["num_blocks"], norm_eps=1e-6,
                    attn_mode="chunk", tie_word_embeddings=True, fuse_norm=False, fuse_cross_entropy=False,
                    fuse_linear_cross_entropy=False, use_cache=False, bos_token_id=1, eos_token_id=2)
    # fla 0.5 lists the tied key; transformers 5 wants the {target: source} mapping (4.x takes either)
    tied = type("GLAForCausalLM", (GLAForCausalLM,), {"_tied_weights_keys": {"lm_head.weight": "model.embeddings.weight"}})
    try:
        model = tied(cfg)
    except (AttributeError, TypeError):  # a transformers version that only takes fla's own list
        model = GLAForCausalLM(cfg)
    if model.lm_head.weight is not model.model.embeddings.weight:  # whatever the transformers version did
        model.lm_head.weight = model.model.embeddings.weight
    return model


def build_model(arch: str, vocab: int, hidden: int, layers: int, heads: int, block_size: int, num_blocks: int,
                policy: str, preset: str | None = None):
    """The model ``mhla-train`` trains. With a preset every arch takes the preset's width and depth
    (heads: the transformer keeps heads of 64, GLA the preset's); the vocabulary is the data's."""
    from mhla_stream import MHLAConfig, MHLAForCausalLM
    from mhla_stream.configuration import mlp_intermediate_size
    shape = resolve_shape(preset, hidden, layers, heads, block_size, num_blocks)
    check_shape(arch, shape)
    hidden, layers, heads = shape["hidden"], shape["layers"], shape["heads"]
    block_size, num_blocks = shape["block_size"], shape["num_blocks"]
    if arch == "gla":
        return build_gla(vocab, shape)
    if arch == "transformer":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          intermediate_size=mlp_intermediate_size(hidden, 4), max_position_embeddings=block_size * num_blocks,
                          rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
        return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    if preset is not None:
        from mhla_stream.configuration import preset_config
        cfg = preset_config(preset, vocab_size=vocab, mixing_policy=policy)
    else:
        cfg = MHLAConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads,
                         block_size=block_size, num_blocks=num_blocks, mixing_policy=policy, bos_token_id=1,
                         eos_token_id=2)
    model = MHLAForCausalLM(cfg)
    if arch == "linear":  # plain causal linear attention: every block weighted 1, frozen
        for layer in model.model.layers:
            layer.attn.mixing_matrix.data.fill_(1.0)
            layer.attn.mixing_matrix.requires_grad_(False)
    return model


def is_mhla(model) -> bool:
    """An mhla-stream model (GLA's blocks have an ``attn`` too: ask the config, not the modules)."""
    return getattr(model.config, "model_type", None) == "mhla"


def context_of(model) -> int:
    c = model.config
    return c.max_position_embeddings if hasattr(c, "max_position_embeddings") else c.block_size * c.num_blocks


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder block's activations in the backward pass instead of storing them."""
    if not is_mhla(model):  # transformers' own per-layer checkpointing
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    for layer in model.model.layers:
        plain = layer.forward

        @functools.wraps(plain)
        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
        layer.forward = forward  # an instance attribute: parameter names and state dicts are unchanged


class LossModule(torch.nn.Module):
    """``forward(windows)`` -> mean next-token loss of ``windows`` [B, T + 1]. DDP wraps this module.

    ``attn_backend`` (MHLA): "auto" trains with the Triton forward + backward of the operator on
    CUDA and the torch chunk form elsewhere; "torch" forces the torch form; "triton" forces Triton
    (on the CPU only under TRITON_INTERPRET=1)."""

    def __init__(self, lm, fused_loss: bool, loss_chunk: int = 4096, attn_backend: str = "auto"):
        super().__init__()
        self.lm, self.fused, self.loss_chunk, self.attn_backend = lm, fused_loss, loss_chunk, attn_backend

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        inputs, targets = windows[:, :-1], windows[:, 1:]
        mhla = is_mhla(self.lm)
        # the plan's train_backend picks the operator once the model sees gradients (plan_for_call)
        plan = make_plan(inputs.device, self.lm.dtype, inputs.shape[0], backend=self.attn_backend) if mhla else None
        if not self.fused:
            logits = (self.lm(input_ids=inputs, plan=plan) if mhla else self.lm(input_ids=inputs, use_cache=False)).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return fused_linear_cross_entropy(decoder_hidden(self.lm, inputs, plan), self.lm.get_output_embeddings().weight,
                                          targets, self.loss_chunk)


def decoder_hidden(lm, inputs: torch.Tensor, plan=None) -> torch.Tensor:
    """The decoder stack's last hidden state (after its final norm), the LM head's input, for any of
    the archs: MHLA's stack returns the tensor; transformers' and fla's return an output object."""
    if is_mhla(lm):
        return lm.model(input_ids=inputs, plan=plan)
    return lm.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state  # transformers' accessor
