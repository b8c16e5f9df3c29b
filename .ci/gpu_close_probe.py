"""Probe (GPU): the decode kernel per layer at the 340M shape, mid-block and at block closes, from
CUDA graphs of 24 launches (one per layer, each on its own state: HBM traffic as in a real step).

Scenarios (positions are not moved by the launches, so every replay repeats the same work):
  mid       every sequence 32 tokens into its block (no close)
  close_all every sequence closes its block (the bench's case: equal prompt lengths)
  close_one sequence 0 closes, the others are mid-block (a server's case: staggered sequences)

KERNELS: comma-separated modules with ``decode_into`` (default: the shipped one, at each close-item
shape (rows x columns [x register cap]) of CLOSE_SHAPES, and session 16's copy in .ci/ab). Prints a
table and writes close_probe.json under $OUT."""
import importlib.util
import json
import os

import torch
from triton.testing import do_bench_cudagraph

from mhla_stream import MHLAForCausalLM, preset_config
from mhla_stream.kernels.triton_decode import TOKENS_FROM


def load(spec):
    if spec == "shipped":
        from mhla_stream.kernels.triton_decode import decode_into
        return decode_into
    path = os.path.join(os.path.dirname(__file__), "ab", spec + ".py")
    mod = importlib.util.spec_from_file_location(spec, path)
    m = importlib.util.module_from_spec(mod)
    mod.loader.exec_module(m)
    return m.decode_into


def main():
    cfg = preset_config("mhla-340m", vocab_size=32000)
    model = MHLAForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    H, K, V, C = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.block_size
    mix = model.model.layers[0].attn.mixing_matrix
    kernels = {}
    for spec in os.environ.get("KERNELS", "shipped,triton_decode_s16").split(","):
        fn = load(spec)
        if spec == "shipped":
            for shape in os.environ.get("CLOSE_SHAPES", "16x32").split(","):  # rows x columns [x register cap]
                rc, bvc, *cap = (int(x) for x in shape.split("x"))
                kw = dict(close_shape=(rc, bvc), maxnreg=cap[0] if cap else None)
                kernels[f"shipped {shape}"] = (lambda f, kw: lambda *a, **k: f(*a, **kw, **k))(fn, kw)
        else:
            kernels[spec] = fn
    scen = os.environ.get("SCENARIOS", "mid,close_all,close_one").split(",")
    rows = []
    for B in (int(b) for b in os.environ.get("BATCHES", "1,8,32,128").split(",")):
        states = model.new_state(B)
        for s in states:
            s.ring.normal_()
            s.prefix.normal_()
            s.open_keys.normal_()
            s.open_values.normal_()
        qkv = torch.randn(B, 2 * H * K + H * V, device="cuda", dtype=torch.bfloat16)
        q, k = qkv[:, :H * K].view(B, H, K), qkv[:, H * K:2 * H * K].view(B, H, K)
        v = qkv[:, 2 * H * K:].view(B, H, V)
        o = torch.empty(B, H, V, device="cuda", dtype=torch.bfloat16)
        cs = torch.rand(B, K // 2, device="cuda")
        for sc in scen:
            for s in states:  # 100 blocks in (ring full), each batch's form of the open block
                s.pos.fill_(100 * C + (C - 1 if sc == "close_all" else 32))
                if sc == "close_one":
                    s.pos[0] = 100 * C + C - 1
                s.partial.zero_()
                s.partial_end.zero_()  # the token form (batch 32+): the block's tokens are buffered
                if B < TOKENS_FROM:    # the R form: R holds them
                    s.mark_settled_()
            for name, fn in kernels.items():
                def step():
                    for s in states:
                        fn(o, q, k, v, mix, s, K ** -0.5, rope=(cs, cs))
                try:
                    step()
                    us = do_bench_cudagraph(step, rep=int(os.environ.get("REP", "40"))) * 1e3 / len(states)
                except Exception as e:
                    print(f"B={B} {sc} {name}: {type(e).__name__} {str(e)[:200]}", flush=True)
                    continue
                rows.append(dict(kernel=name, batch=B, scenario=sc, us=us))
                print(f"B={B:4d} {sc:9s} {name:18s} {us:9.2f} us/layer", flush=True)
        del states
        torch.cuda.empty_cache()
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "close_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
