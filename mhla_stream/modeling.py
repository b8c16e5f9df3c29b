"""The MHLA decoder language model (SPEC section 3), a transformers ``PreTrainedModel``.

Parameter names follow the reference (fla GLA) layout, so a reference state dict maps 1:1
except for the mixing matrix's shape ([L, L] here, [L, L, 1, 1, 1, 1] there).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import mhla_attention
from .cache import MHLACache
from .checkpoint import CheckpointError
from .configuration import MHLAConfig
from .fused import add_rms_norm_fast, gated_norm_fast, relu_rope_fast, rms_norm_fast, rope_at_fast, swiglu_fast
from .kernels import triton_available
from .mixing import init_mixing
from .plan import ExecutionPlan, make_plan, one_row_step, rows_picked
from .state import MHLAState
from .weights import ConcatenatedWeight

if triton_available():  # optional: the fused CUDA inference paths
    from .kernels.triton_decode import decode_into
    from .kernels.triton_features import relu_rope_qk
    from .kernels.triton_skinny import norm_stats, row_stats, skinny_linear, stats_fit, stats_ready


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm_fast(x, self.weight, self.eps)


class MHLAAttention(nn.Module):
    def __init__(self, config: MHLAConfig):
        super().__init__()
        self.config = config
        H, K, V = config.num_heads, config.head_k_dim, config.head_v_dim
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.q_proj = nn.Linear(config.hidden_size, H * K, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, H * K, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, H * V, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, config.hidden_size, bias=False)
        self.g_norm_swish_gate = RMSNorm(V, config.norm_eps)
        self.mixing_matrix = nn.Parameter(init_mixing(config.num_blocks))  # raw: clamped where it is read
        self.qkvg_weight = ConcatenatedWeight(self.q_proj, self.k_proj, self.v_proj, self.g_proj)
        # the fused step from two rows: the output norm's weight in the output projection's columns
        self.o_normed_weight = ConcatenatedWeight(self.o_proj, norm=self.g_norm_swish_gate, repeat=H)

    def forward(self, x, rope, state: MHLAState | None, lengths, plan: ExecutionPlan):
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        cos, sin = rope
        if plan.triton_features:
            # one product for q, k, v, g; one launch for relu + RoPE of q and k, read in place
            qk, v, g = F.linear(x, self.qkvg_weight.get()).split([2 * H * K, H * V, H * V], -1)
            qk = relu_rope_qk(qk, cos, sin, H, K)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            if plan.fused_projections:
                q, k, v, g = F.linear(x, self.qkvg_weight.get()).split([H * K, H * K, H * V, H * V], -1)
            else:
                q, k, v, g = (lin(x) for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj))
            q = relu_rope_fast(q.reshape(B, T, H, K), cos, sin)
            k = relu_rope_fast(k.reshape(B, T, H, K), cos, sin)
        v = v.reshape(B, T, H, V)
        g = g.reshape(B, T, H, V)
        o = mhla_attention(q, k, v, self.mixing_matrix, block_size=self.config.block_size, state=state,
                           backend=plan.backend_for(T, state is not None),
                           policy=None if state is not None else self.config.mixing_policy, lengths=lengths)
        o = gated_norm_fast(o, self.g_norm_swish_gate.weight, g, self.g_norm_swish_gate.eps)
        return self.o_proj(o.reshape(B, T, H * V))


class MHLAMLP(nn.Module):
    def __init__(self, config: MHLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight = ConcatenatedWeight(self.gate_proj, self.up_proj)

    def forward(self, x, plan: ExecutionPlan):
        if plan.fused_projections:
            gate, up = F.linear(x, self.gate_up_weight.get()).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu_fast(gate, up))


class MHLABlock(nn.Module):
    def __init__(self, config: MHLAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = MHLAAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MHLAMLP(config)
        # the fused step from two rows: each layer norm's weight folded into the product after it
        a, m = self.attn, self.mlp
        self.qkvg_normed_weight = ConcatenatedWeight(a.q_proj, a.k_proj, a.v_proj, a.g_proj, norm=self.attn_norm)
        self.gate_up_normed_weight = ConcatenatedWeight(m.gate_proj, m.up_proj, norm=self.mlp_norm)

    def forward(self, x, rope, state, lengths, plan: ExecutionPlan):
        h = x + self.attn(self.attn_norm(x), rope, state, lengths, plan)
        return h + self.mlp(self.mlp_norm(h), plan)

    def decode_step(self, x, cos, sin, state: MHLAState, stats=None):
        """One token per sequence through the block in five launches (CUDA inference, Triton):

            qkvg = RMSNorm(x) W_qkvg^T                         skinny product, norm in its prologue
            o    = MHLA decode(relu+RoPE(q), relu+RoPE(k), v)  state update and block close in one kernel
            h    = x + (RMSNorm_V(o) * silu(g)) W_o^T          gated output norm in the prologue, residual
            a    = silu(RMSNorm(h) W_gate^T) * (RMSNorm(h) W_up^T)
            out  = h + a W_down^T

        against about 17 launches of ``forward``. x [B, 1, D] -> ([B, 1, D], stats); cos, sin [B, K/2]
        fp32. ``state`` is advanced except its position: the caller moves every layer's at once
        (``MHLAState.advance_positions``). Numerics follow ``forward``: the same values are rounded
        to the activation dtype; only summation order differs.

        From two rows (the tensor-core products) no product touches x element by element: the norms
        become scales of the fp32 sums (``skinny_linear``'s stats_in), their weights are folded into
        the weights (``*_normed_weight``), the decode kernel applies the gate and writes o's per-head
        square sums, and each residual product writes its output's square sums for the next norm
        (``stats`` in: x's, None: summed here; out: the block output's). The difference to
        ``forward``: the norm weights are rounded into the weights and the gate applies before the
        output norm's rounding (bf16-sized; fp32 unaffected). fp16 keeps the per-element norms.
        """
        attn, mlp = self.attn, self.mlp
        B = x.shape[0]
        H, K, V = attn.num_heads, attn.head_k_dim, attn.head_v_dim
        # the checks mhla_attention makes on the other path (host-side shapes only: no sync)
        state.check_compatible(B, H, K, V, attn.config.block_size, attn.mixing_matrix.shape[0])
        x2 = x.reshape(B, -1)
        hk, hv, D = H * K, H * V, x2.shape[1]
        # (one row: the norm is one load, nothing to spare; fp16: o * silu(g), unnormed, could overflow)
        # (a CUDA-graph capture before any eager step has no split-K workspace to scale in)
        rows = (B > 1 and x.dtype != torch.float16 and self._scales_fit(D, hv, V)
                and stats_ready(x.device, B, max(2 * hk + 2 * hv, mlp.gate_proj.out_features, D)))
        if rows:
            qkvg = skinny_linear(x2, self.qkvg_normed_weight.get(), eps=self.attn_norm.eps,
                                 stats_in=stats if stats is not None else row_stats(x2))
        else:
            qkvg = skinny_linear(x2, attn.qkvg_weight.get(), norm_weight=self.attn_norm.weight,
                                 eps=self.attn_norm.eps)
        q = qkvg[:, :hk].view(B, H, K)
        k = qkvg[:, hk:2 * hk].view(B, H, K)
        v = qkvg[:, 2 * hk:2 * hk + hv].view(B, H, V)
        g = qkvg[:, 2 * hk + hv:]
        o = torch.empty(B, H, V, device=x.device, dtype=x.dtype)
        gn = attn.g_norm_swish_gate
        if rows:
            o_stats, h_stats, out_stats = (norm_stats(B, n, x.device) for n in (hv, D, D))
            # raw mixing: clamped in-kernel; the state is read before the wait (no kernel of this step writes it)
            decode_into(o, q, k, v, attn.mixing_matrix, state, K ** -0.5, rope=(cos, sin), state_early=True,
                        gate=g.view(B, H, V), stats=o_stats)
            h = skinny_linear(o.view(B, hv), attn.o_normed_weight.get(), group=V, eps=gn.eps, stats_in=o_stats,
                              residual=x2, stats_out=h_stats)
            a = skinny_linear(h, self.gate_up_normed_weight.get(), eps=self.mlp_norm.eps, swiglu=True,
                              stats_in=h_stats)
            out = skinny_linear(a, mlp.down_proj.weight, residual=h, stats_out=out_stats)
            return out.view(B, 1, -1), out_stats
        decode_into(o, q, k, v, attn.mixing_matrix, state, K ** -0.5, rope=(cos, sin), state_early=True)
        h = skinny_linear(o.view(B, hv), attn.o_proj.weight, norm_weight=gn.weight, group=V, eps=gn.eps, gate=g,
                          residual=x2)
        a = skinny_linear(h, mlp.gate_up_weight.get(), norm_weight=self.mlp_norm.weight, eps=self.mlp_norm.eps,
                          swiglu=True)
        return skinny_linear(a, mlp.down_proj.weight, residual=h).view(B, 1, -1), None

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _scales_fit(D: int, hv: int, V: int) -> bool:
        """Whether the norms can run as scales of the sums at these widths (``stats_fit``)."""
        return V % 16 == 0 and stats_fit(D, D) and stats_fit(hv, V)

    def decode_step_batched(self, x, xn, cos, sin, state: MHLAState, next_norm):
        """One token per sequence where the decode is not fused (CUDA batches > 1 by default):
        x [B, D] and xn = its attention norm -> (out, out normed by ``next_norm``, the next block's
        attention norm or the final one). The products stay cuBLAS's (faster than the fused step's
        split-K tensor-core products at batch 8 and 32: README, decode); around them, relu + RoPE
        run inside the decode kernel and each residual sum shares its launch with the norm after
        it, so a layer takes 10 launches instead of 14 (counting cuBLAS's split-K reduction). The state is
        advanced except its position (the caller moves every layer's at once)."""
        attn, mlp = self.attn, self.mlp
        B = x.shape[0]
        H, K, V = attn.num_heads, attn.head_k_dim, attn.head_v_dim
        state.check_compatible(B, H, K, V, attn.config.block_size, attn.mixing_matrix.shape[0])
        qkvg = F.linear(xn, attn.qkvg_weight.get())
        hk, hv = H * K, H * V
        q = qkvg[:, :hk].view(B, H, K)
        k = qkvg[:, hk:2 * hk].view(B, H, K)
        v = qkvg[:, 2 * hk:2 * hk + hv].view(B, H, V)
        g = qkvg[:, 2 * hk + hv:].view(B, H, V)
        o = torch.empty(B, H, V, device=x.device, dtype=x.dtype)
        decode_into(o, q, k, v, attn.mixing_matrix, state, K ** -0.5, rope=(cos, sin))  # raw mixing: clamped in-kernel
        gn = attn.g_norm_swish_gate
        o = gated_norm_fast(o, gn.weight, g, gn.eps)
        attn_out = F.linear(o.reshape(B, hv), attn.o_proj.weight)
        h, hn = add_rms_norm_fast(x, attn_out, self.mlp_norm.weight, self.mlp_norm.eps)
        gate, up = F.linear(hn, mlp.gate_up_weight.get()).chunk(2, -1)
        m = F.linear(swiglu_fast(gate, up), mlp.down_proj.weight)
        return add_rms_norm_fast(h, m, next_norm.weight, next_norm.eps)


class MHLAPreTrainedModel(PreTrainedModel):
    config_class = MHLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["MHLABlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MHLAAttention):
            init.copy_(module.mixing_matrix, init_mixing(self.config.num_blocks))


class MHLAModel(MHLAPreTrainedModel):
    def __init__(self, config: MHLAConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MHLABlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids=None, inputs_embeds=None, states: list[MHLAState] | None = None,
                lengths=None, plan: ExecutionPlan | None = None, head: nn.Linear | None = None):
        """``plan``: how to run (``plan.make_plan``); None: the default for these inputs.
        ``head`` (an LM head without bias), only where the one-row fused step runs (``one_row_step``):
        return its logits instead, the final norm folded into its product (launched behind the last
        layer's with programmatic dependent launch, before the position update)."""
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        plan = plan_for_call(plan, x, self.training, self.config)
        if head is not None and not one_row_step(plan, states, lengths, x):
            raise ValueError("head= is for the one-row fused decode step only (one_row_step)")
        if head is not None and head.bias is not None:
            raise ValueError("head=: a head without bias (its product has no bias term)")
        start = states[0].pos[:, None] if states is not None else torch.zeros(B, 1, dtype=torch.long, device=x.device)
        rope = rope_at_fast(start, T, self.config.head_k_dim, self.config.rope_theta)  # once for all layers
        if plan.fused_decode and states is not None and lengths is None and T == 1:  # (B == 1: one_row_step)
            cos, sin = (t.reshape(B, -1) for t in rope)
            stats = None
            for layer, state in zip(self.layers, states):
                x, stats = layer.decode_step(x, cos, sin, state, stats)
            if head is not None:
                try:  # (the positions move even if the head fails: the layers' states hold the token)
                    logits = skinny_linear(x.view(1, -1), head.weight, norm_weight=self.norm.weight,
                                           eps=self.norm.eps)
                finally:
                    MHLAState.advance_positions(states)
                return logits.view(1, 1, -1)
            MHLAState.advance_positions(states)
            return self.norm(x)
        if plan.batched_decode and states is not None and lengths is None and T == 1:
            cos, sin = (t.reshape(B, -1) for t in rope)
            x = x.reshape(B, -1)
            norms = [layer.attn_norm for layer in self.layers[1:]] + [self.norm]
            xn = rms_norm_fast(x, self.layers[0].attn_norm.weight, self.layers[0].attn_norm.eps)
            for layer, state, norm in zip(self.layers, states, norms):
                x, xn = layer.decode_step_batched(x, xn, cos, sin, state, norm)
            MHLAState.advance_positions(states)
            return xn.view(B, 1, -1)  # the last layer's sum went through the final norm
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if states is None else states[i], lengths, plan)
        return self.norm(x)


def _shifted_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def _one_cache(past_key_values, cache):
    """The cache given under either name (transformers renamed ``past_key_values`` to ``cache`` in
    5.24); two different MHLA caches at once are a mistake. A transformers cache beside an MHLA one
    is generate's own (transformers before 5.24 does not know ``cache``: it passes the user's
    through and makes a DynamicCache as past_key_values); this model cannot use it: the MHLA
    cache is the stream (found on the GPU machine's transformers 5.17, session 21)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        if isinstance(cache, MHLACache) and not isinstance(past_key_values, MHLACache):
            return cache
        raise ValueError("pass the cache as past_key_values or as cache, not two different ones")
    return cache


# the one-row fused step's LM head as a skinny product with the final norm folded in (False: A/B runs)
FOLD_HEAD = True


def _hooked(*modules: nn.Module, pre: bool = True) -> bool:
    """Whether a call of these modules runs more than their class's ``forward``: forward hooks (with
    ``pre``, pre-hooks too) on them or global ones, or a ``forward`` set on an instance (accelerate's
    hooks wrap it so)."""
    g = nn.modules.module
    return bool(g._global_forward_hooks or (pre and g._global_forward_pre_hooks)) or any(
        m._forward_hooks or (pre and m._forward_pre_hooks) or "forward" in m.__dict__ for m in modules)


def plan_for_call(plan: ExecutionPlan | None, x: torch.Tensor, training: bool, config=None) -> ExecutionPlan:
    """The given plan, or the default one for ``x``'s device, dtype and batch (and ``config``'s
    widths: ``rows_picked``); while gradients flow, without the inference-only paths."""
    if plan is None:
        picked = config is not None and rows_picked(config, x.device, x.dtype, x.shape[0])
        plan = make_plan(x.device, x.dtype, x.shape[0], rows_picked=picked)
    return plan.with_gradients(training) if torch.is_grad_enabled() else plan


class MHLAForCausalLM(MHLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MHLAConfig):
        super().__init__(config)
        self.model = MHLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def new_state(self, batch_size: int = 1, policy: str | None = None, device=None,
                  state_dtype=None, stacked: bool = False) -> list[MHLAState]:
        """Fresh per-layer streaming states (preallocated) for ``batch_size`` sequences: fp32, except
        the completed block summaries (the ring) in ``state_dtype`` (None = fp32, or bf16). ``stacked``:
        the layers' tensors are slices of one tensor per field (``MHLAState.empty_layers``)."""
        c = self.config
        device = device if device is not None else self.device
        args = (c.num_heads, c.head_k_dim, c.head_v_dim)
        kwargs = dict(block_size=c.block_size, num_blocks=c.num_blocks, policy=policy or c.mixing_policy,
                      device=device, state_dtype=state_dtype)
        if stacked:
            return MHLAState.empty_layers(c.num_hidden_layers, batch_size, *args, **kwargs)
        return [MHLAState.empty(batch_size, *args, **kwargs) for _ in range(c.num_hidden_layers)]

    def make_plan(self, batch_size: int = 1, **options) -> ExecutionPlan:
        """An execution plan for this model's device and dtype (options: see ``plan.make_plan``;
        ``rows_picked`` is asked of the step picks here unless given)."""
        if "rows_picked" not in options:
            options["rows_picked"] = rows_picked(self.config, self.device, self.dtype, batch_size)
        return make_plan(self.device, self.dtype, batch_size, **options)

    def prepare_inference(self) -> "MHLAForCausalLM":
        """Makes the concatenated projection weights now (on CUDA) rather than at the first call.
        They follow later weight changes by themselves; this only moves the work to load time."""
        if self.device.type == "cuda":
            for layer in self.model.layers:
                layer.attn.qkvg_weight.get()
                layer.mlp.gate_up_weight.get()
        return self

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep: int = 0, plan: ExecutionPlan | None = None, cache=None, **kwargs):
        """Causal LM forward. With ``past_key_values`` (an ``MHLACache``; ``cache``, transformers
        5.24's name for it, is the same argument) the call continues the stream; with ``use_cache``
        and no cache a new one is made and returned. ``attention_mask`` [B, T] may pad on either
        side: padded tokens neither move positions nor enter the state. ``plan``: how to run this
        call (``make_plan``); None: the default for the inputs' device, dtype and batch."""
        past_key_values = _one_cache(past_key_values, cache)
        cache = past_key_values if isinstance(past_key_values, MHLACache) else None
        x = self.model.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if cache is None and (use_cache or past_key_values is not None):
            cache = MHLACache(self.new_state(B, device=x.device))
        states = cache.states if cache is not None else None
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -T:].to(device=x.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None
        plan = plan_for_call(plan, x, self.training, self.config)
        if mask is None and one_row_step(plan, states, None, x) and self._head_folds(x):
            # batch 1: the final norm and the LM head as one skinny product behind the last layer's,
            # instead of a norm kernel and cuBLAS after a drain
            logits = self.model(inputs_embeds=x, states=states, plan=plan, head=self.lm_head)
            return CausalLMOutputWithPast(loss=None if labels is None else _shifted_loss(logits, labels),
                                          logits=logits, past_key_values=cache)
        if mask is None:
            hidden = self.model(inputs_embeds=x, states=states, plan=plan)
        else:  # move each row's real tokens to the front, run with lengths, move them back
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
            packed = x.gather(1, order[..., None].expand_as(x))
            lengths = mask.sum(1)
            hidden = self.model(inputs_embeds=packed, states=states, lengths=lengths, plan=plan)
            hidden = torch.empty_like(hidden).scatter_(1, order[..., None].expand_as(hidden), hidden)
            if cache is not None:
                cache.add_padding(T - lengths)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None if labels is None else _shifted_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _head_folds(self, x) -> bool:
        """Whether the one-row step may run the final norm and the LM head as one skinny product: the
        model's own modules as built (a plain Linear without bias, a contiguous [V, D] weight in x's
        dtype on x's device, the RMSNorm) and nothing the fold would bypass or change: hooks (on the
        head, the norm, global ones; forward hooks on the base model, which would see logits instead
        of hidden states) or a ``forward`` set on an instance."""
        head, norm = self.lm_head, self.model.norm
        w = head.weight if type(head) is nn.Linear else None
        return (FOLD_HEAD and w is not None and head.bias is None and type(norm) is RMSNorm
                and w.is_contiguous() and w.dtype == x.dtype == norm.weight.dtype and w.device == x.device
                and w.shape[1] == x.shape[-1] and not _hooked(head, norm) and not _hooked(self.model, pre=False))

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      use_cache=True, cache=None, **kwargs):
        # (transformers 5.24 hands generate's cache over as ``cache``; earlier ones as past_key_values)
        past_key_values = _one_cache(past_key_values, cache)
        cache = past_key_values if isinstance(past_key_values, MHLACache) else None
        seen = cache.seen if cache is not None else 0
        inputs = {"past_key_values": cache, "use_cache": use_cache, "attention_mask": attention_mask,
                  "plan": kwargs.get("plan")}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path="mhla-stories-17m", *args, dtype=None, device=None,
                        weights=None, **kwargs):
        """Loads a checkpoint folder (this project's layout or the reference layout, SPEC section 3), a
        shipped name (``mhla-stories-17m``), ``mhla-340m`` (with ``weights``) or a Hub id already in the
        huggingface_hub cache. Never touches the network. ``dtype``: a torch dtype, a name such as
        ``"bfloat16"``, or ``"auto"`` (the stored dtype); default float32."""
        from .hub import HUB_ID, resolve_model
        from .loading import check_kwargs, load_local
        if args:
            raise TypeError("MHLAForCausalLM.from_pretrained takes one positional argument (name or path)")
        dtype = kwargs.pop("torch_dtype", None) or dtype
        check_kwargs(kwargs)
        path = os.fspath(pretrained_model_name_or_path)
        looks_like_path = path.startswith((".", "/", "~")) or (os.sep in path and not HUB_ID.fullmatch(path))
        if not os.path.isdir(path) and (os.path.exists(path) or looks_like_path):
            raise CheckpointError(f"{path}: not a checkpoint directory")
        return load_local(cls, resolve_model(path, weights), dtype=dtype, device=device)

    def save_pretrained(self, save_directory, *args, tokenizer_model=None, **kwargs):
        """transformers' save plus the files that let plain transformers load the folder: shims named in
        ``auto_map``, ``tokenizer.json`` (from ``tokenizer_model`` or the tokenizer of the folder this
        model was loaded from) and ``generation_config.json``."""
        from .loading import save_with_hf_files

        def save_base(directory, **kw):
            return super(MHLAForCausalLM, self).save_pretrained(directory, *args, **kw)
        save_with_hf_files(self, save_directory, save_base, tokenizer_model, **kwargs)


def _register_with_transformers() -> None:
    from . import register_auto_classes
    register_auto_classes()


_register_with_transformers()  # importing the model classes makes AutoModelForCausalLM know "mhla"
