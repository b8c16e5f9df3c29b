"""Writes reference-layout (fla GLA, attn_extends mhla) checkpoints with random weights, and an
independent plain forward of SPEC section 3 written from the text, for the model tests."""
import json
import math
import os

import torch

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, expand_k=0.5, expand_v=1.0,
             hidden_ratio=4, norm_eps=1e-6, L=4, C=8)


def reference_state_dict(cfg=SMALL, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, H = cfg["hidden_size"], cfg["num_heads"]
    Kt, Vt = int(d * cfg["expand_k"]), int(d * cfg["expand_v"])
    inter = 256 * math.ceil(int(d * cfg["hidden_ratio"] * 2 / 3) / 256)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"model.embeddings.weight": r(cfg["vocab_size"], d), "model.norm.weight": 1 + r(d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "attn_norm.weight": 1 + r(d), p + "attn.q_proj.weight": r(Kt, d), p + "attn.k_proj.weight": r(Kt, d),
                   p + "attn.v_proj.weight": r(Vt, d), p + "attn.g_proj.weight": r(Vt, d), p + "attn.o_proj.weight": r(d, Vt),
                   p + "attn.g_norm_swish_gate.weight": 1 + r(Vt // H),
                   # raw values outside [1e-5, 1] and above the diagonal: the loader must clamp and mask
                   p + "attn.mixing_matrix": (torch.rand(cfg["L"], cfg["L"], generator=g) * 1.4 - 0.2).view(cfg["L"], cfg["L"], 1, 1, 1, 1),
                   p + "mlp_norm.weight": 1 + r(d), p + "mlp.gate_proj.weight": r(inter, d), p + "mlp.up_proj.weight": r(inter, d),
                   p + "mlp.down_proj.weight": r(d, inter)})
    return sd


def reference_config(cfg=SMALL):
    return {"model_type": "gla", "attn_extends": "mhla", "feature_map": "relu", "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_hidden_layers"], "num_heads": cfg["num_heads"],
            "expand_k": cfg["expand_k"], "expand_v": cfg["expand_v"], "hidden_ratio": cfg["hidden_ratio"],
            "norm_eps": cfg["norm_eps"], "use_short_conv": False, "tie_word_embeddings": True, "block_size": cfg["C"],
            "bos_token_id": 1, "eos_token_id": 2, "attn_mode": "chunk", "max_position_embeddings": cfg["L"] * cfg["C"]}


def write_reference_checkpoint(directory, sd, fmt="safetensors", shards=1):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(reference_config(), f)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"

    def save(part, name):
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in part.items()}, os.path.join(directory, name))
        else:
            torch.save(part, os.path.join(directory, name))

    if shards == 1:
        save(sd, f"{base}.{ext}")
        return
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"{base}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in keys[s::shards]}
        save(part, name)
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, f"{base}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def plain_forward(sd, ids, cfg=SMALL):
    """SPEC section 3 in a few lines of float64 tensor algebra, independent of the package."""
    sd = {k: v.double() for k, v in sd.items()}
    eps, H, C = cfg["norm_eps"], cfg["num_heads"], cfg["C"]
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    x = sd["model.embeddings.weight"][ids]
    B, T, _ = x.shape
    t = torch.arange(T)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "attn_norm.weight"])
        q = torch.relu(h @ sd[p + "attn.q_proj.weight"].T).view(B, T, H, -1)
        k = torch.relu(h @ sd[p + "attn.k_proj.weight"].T).view(B, T, H, -1)
        v = (h @ sd[p + "attn.v_proj.weight"].T).view(B, T, H, -1)
        g = (h @ sd[p + "attn.g_proj.weight"].T).view(B, T, H, -1)
        K = q.shape[-1]
        freq = 10000.0 ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
        ang = t[:, None].double() * freq
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        rot = lambda z: torch.cat([-z[..., K // 2:], z[..., : K // 2]], -1)  # noqa: E731
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        L = cfg["L"]
        M = sd[p + "attn.mixing_matrix"].view(L, L).clamp(1e-5, 1).tril()
        b = t // C
        w = M[b[:, None], b[None, :]] * (t[:, None] >= t[None, :])
        o = torch.einsum("bthk,bshk,ts,bshv->bthv", q, k, w, v) * K ** -0.5
        o = rms(o, sd[p + "attn.g_norm_swish_gate.weight"]) * torch.nn.functional.silu(g)
        x = x + o.reshape(B, T, -1) @ sd[p + "attn.o_proj.weight"].T
        h = rms(x, sd[p + "mlp_norm.weight"])
        mlp = (torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T))
        x = x + mlp @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["model.embeddings.weight"].T
