"""Model FLOPs per trained token and the device's peak, for tokens/s and MFU in the training log."""
from __future__ import annotations

import torch

GLA_CHUNK = 64  # fla's chunk length in GLA's chunk mode

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name(); the first hit wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM, "H100 80GB HBM3"
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)


def peak_bf16_flops(device: torch.device) -> float | None:
    """The peak for this device, or None (CPU, or a GPU not in the table: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def matmul_params(model) -> int:
    """Parameters that take part in a matrix product per token: all of them, less an untied
    embedding table (a lookup). With tied embeddings the table is the LM head, which is a product."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb is head else total - emb.numel()


def attention_flops_per_token(config, arch: str) -> float:
    """Forward FLOPs per token of the attention operator itself (not its projections), all layers."""
    layers, context = config.num_hidden_layers, None
    if arch == "transformer":  # causal softmax attention: q.k and p.v over on average context/2 keys
        context = config.max_position_embeddings
        return layers * 2 * 2 * config.hidden_size * context / 2
    if arch == "gla":  # fla's chunk form: the same products, over its own 64-token chunks
        H, C = config.num_heads, GLA_CHUNK
        K, V = int(config.hidden_size * config.expand_k) // H, int(config.hidden_size * config.expand_v) // H
    else:
        H, K, V, C = config.num_heads, config.head_k_dim, config.head_v_dim, config.block_size
    # chunk form: intra-block scores and their product with v over a C-token block (computed in full),
    # the query against the mixed prefix, and the key-value summary; the mixing itself is O(L/C) smaller
    return layers * H * (2 * C * (K + V) + 2 * K * V + 2 * K * V)


def train_flops_per_token(model, arch: str) -> float:
    """6 N (forward + backward of the products) plus three times the attention's forward FLOPs."""
    return 6 * matmul_params(model) + 3 * attention_flops_per_token(model.config, arch)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world: int = 1) -> float | None:
    """Model FLOPs utilisation of ``world`` devices, each with ``peak`` FLOP/s."""
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * world)
