"""Probe (GPU): the decode kernel's two forms of the open block (``kernels/triton_decode.py``),
R (read and written every token) against tokens (keys and values buffered, P plus the filled
slots read), per launch shape, from CUDA graphs of 24 launches, one per layer, each on its own
state (HBM traffic as in a real step), at the 340M shape, ``SLOT`` tokens into a block.

Session 14's `call3` ran an earlier, standalone copy of the token kernel (git history of this
file); this version times the kernel the package ships."""
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
    slot = int(os.environ.get("SLOT", "32"))
    rows = []
    for B in (int(b) for b in os.environ.get("BATCHES", "1,8,32,128").split(",")):
        states = model.new_state(B)
        for s in states:
            s.pos.fill_(slot)
            s.open_keys.normal_()
            s.open_values.normal_()
        qkv = torch.randn(B, 2 * H * K + H * V, device="cuda", dtype=torch.bfloat16)
        q, k = qkv[:, :H * K].view(B, H, K), qkv[:, H * K:2 * H * K].view(B, H, K)
        v = qkv[:, 2 * H * K:].view(B, H, V)
        o = torch.empty(B, H, V, device="cuda", dtype=torch.bfloat16)
        cs = torch.rand(B, K // 2, device="cuda")
        runs = [("R", False, None, 4, 3 * B * H * K * V * 4)]
        new_bytes = B * H * 4 * (K * V + slot * (K + V) + K + V)
        runs += [("tokens", True, bv, w, new_bytes) for bv in (32, 64) for w in (4, 8)]
        for name, tokens, bv, w, traffic in runs:
            for s in states:  # the launches never move pos, so this holds for every timed launch:
                if tokens:    # slot tokens buffered and R holding none,
                    s.partial_end.zero_()
                else:         # or R holding the block so far and nothing buffered
                    s.mark_settled_()

            def step():
                for s in states:
                    decode_into(o, q, k, v, mix, s, K ** -0.5, rope=(cs, cs), block_v=bv, num_warps=w, tokens=tokens)
            try:
                step()
                us = do_bench_cudagraph(step, rep=50) * 1e3 / len(states)
            except Exception as e:  # a shape the kernel cannot compile: noted, skipped
                print(f"B={B} {name} BV={bv} w={w}: {type(e).__name__} {str(e)[:100]}", flush=True)
                continue
            rows.append(dict(form=name, batch=B, slot=slot, BV=bv, warps=w, us=us, GBps=traffic / us / 1e3))
            print(f"B={B:4d} {name:6s} BV={str(bv):>4s} w={w} {us:8.2f} us {traffic / us / 1e3:7.0f} GB/s", flush=True)
        del states
        torch.cuda.empty_cache()
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "tokens_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
