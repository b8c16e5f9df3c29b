"""The models ``mhla-train`` builds, and the module whose forward is the training loss.

The loss module reads the causal LM from outside: the plain path calls the model's own forward,
the fused path runs the decoder stack (``model.model``) and hands its hidden states to the fused
head + cross-entropy, so the full logits never exist. Activation checkpointing wraps each block's
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


def build_model(arch: str, vocab: int, hidden: int, layers: int, heads: int, block_size: int, num_blocks: int,
                policy: str, preset: str | None = None):
    from mhla_stream import MHLAConfig, MHLAForCausalLM
    from mhla_stream.configuration import PRESETS, mlp_intermediate_size
    if preset is not None:  # the preset's architecture; the vocabulary is the data's tokenizer's
        p = PRESETS[preset]
        hidden, layers, heads = p["hidden_size"], p["num_hidden_layers"], p["num_heads"]
        block_size, num_blocks = p["block_size"], p["num_blocks"]
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
    return hasattr(model.model.layers[0], "attn")


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
            logits = (self.lm(input_ids=inputs, plan=plan) if mhla else self.lm(input_ids=inputs)).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if mhla:  # MHLA: the decoder stack
            hidden = self.lm.model(input_ids=inputs, plan=plan)
        else:
            hidden = self.lm.model(input_ids=inputs).last_hidden_state
        return fused_linear_cross_entropy(hidden, self.lm.get_output_embeddings().weight, targets, self.loss_chunk)
