"""Decode kernel launch shapes at the 340M shape (GPU): per-launch time of the decode kernel for
value-column blocks BV and warp counts at several batches, from CUDA graphs of 24 launches (one
per layer, each on its own state, so the state traffic comes from HBM as in a real step), with
the GB/s of its per-token state traffic (read P, read + write R)."""
import json
import os

import torch
from triton.testing import do_bench_cudagraph

from mhla_stream import MHLAForCausalLM, preset_config
from mhla_stream.kernels.triton_decode import decode_into


def main():
    cfg = preset_config("mhla-340m", vocab_size=32000)
    model = MHLAForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    mix = model.model.layers[0].attn.mixing_matrix
    rows = []
    for B in (int(b) for b in os.environ.get("BATCHES", "8,32,64,128").split(",")):
        states = model.new_state(B)
        for s in states:
            s.pos.fill_(5)  # mid-block: no block close in the timed launches
        qkv = torch.randn(B, 2 * H * K + H * V, device="cuda", dtype=torch.bfloat16)
        q, k = qkv[:, :H * K].view(B, H, K), qkv[:, H * K:2 * H * K].view(B, H, K)
        v = qkv[:, 2 * H * K:].view(B, H, V)
        o = torch.empty(B, H, V, device="cuda", dtype=torch.bfloat16)
        cs = torch.rand(B, K // 2, device="cuda")
        traffic = 3 * B * H * K * V * 4
        for bv in (16, 32, 64):
            for w in (4, 8):
                def step():
                    for s in states:
                        decode_into(o, q, k, v, mix, s, K ** -0.5, rope=(cs, cs), block_v=bv, num_warps=w)
                step()
                us = do_bench_cudagraph(step, rep=50) * 1e3 / len(states)
                rows.append(dict(batch=B, BV=bv, warps=w, us=us, GBps=traffic / us / 1e3))
                print(f"B={B:4d} BV={bv:3d} warps={w}  {us:8.2f} us  {traffic / us / 1e3:7.0f} GB/s", flush=True)
        del states
        torch.cuda.empty_cache()
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "decode_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
