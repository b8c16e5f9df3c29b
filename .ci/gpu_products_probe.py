"""Probe (GPU): a layer's four decode products at 8-64 rows, from CUDA graphs of 24 layers (each
layer its own weights, so they stream from HBM), chained as in the fused step (x -> q/k/v/g with
the layer norm; the gated per-head norm and the residual into the output projection; norm and
SwiGLU into gate/up; the down projection with the residual). Forms: the skinny products with
the late norm (``LATE_NORM``), with the norm prologue, and cuBLAS's plain products (no norms, a
lower bound for the batched step's four products). Microseconds a layer; JSON to $OUT."""
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from mhla_stream import preset_config
from mhla_stream.kernels import triton_skinny
from mhla_stream.kernels.triton_skinny import norm_stats, row_stats, skinny_linear


def main():
    cfg = preset_config("mhla-340m", vocab_size=32000)
    D, H, K, V, F_ = cfg.hidden_size, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.intermediate_size
    hk, hv, dev, dt = H * K, H * V, "cuda", torch.bfloat16
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt) / s[-1] ** 0.5  # noqa: E731
    layers = [dict(qkvg=r(2 * hk + 2 * hv, D), o=r(D, hv), gu=r(2 * F_, D), down=r(D, F_),
                   n1=torch.ones(D, device=dev, dtype=dt), gn=torch.ones(V, device=dev, dtype=dt),
                   n2=torch.ones(D, device=dev, dtype=dt)) for _ in range(24)]
    rows = []
    for M in (int(m) for m in os.environ.get("ROWS", "8,32,64").split(",")):
        x0, o_in = torch.randn(M, D, device=dev, dtype=dt), torch.randn(M, hv, device=dev, dtype=dt)

        def fused():
            x = x0
            for w in layers:
                qkvg = skinny_linear(x, w["qkvg"], norm_weight=w["n1"])
                h = skinny_linear(o_in, w["o"], norm_weight=w["gn"], group=V, gate=qkvg[:, 2 * hk + hv:], residual=x)
                a = skinny_linear(h, w["gu"], norm_weight=w["n2"], swiglu=True)
                x = skinny_linear(a, w["down"], residual=h)
            return x

        o_st = row_stats(o_in)

        def scaled():  # the fused step's form from two rows: norms as scales of the sums, from statistics
            x, st = x0, row_stats(x0)  # (norm weights of ones: the folded weights are the weights)
            for w in layers:
                skinny_linear(x, w["qkvg"], stats_in=st)  # (its gate goes to the decode kernel)
                h_st, st = norm_stats(M, D, dev), norm_stats(M, D, dev)
                h = skinny_linear(o_in, w["o"], group=V, stats_in=o_st, residual=x, stats_out=h_st)
                a = skinny_linear(h, w["gu"], swiglu=True, stats_in=h_st)
                x = skinny_linear(a, w["down"], residual=h, stats_out=st)
            return x

        def ogate():  # norm-free products except the output projection's gated per-head norm
            x = x0
            for w in layers:
                qkvg = skinny_linear(x, w["qkvg"])
                h = skinny_linear(o_in, w["o"], norm_weight=w["gn"], group=V, gate=qkvg[:, 2 * hk + hv:], residual=x)
                a = skinny_linear(h, w["gu"], swiglu=True)
                x = skinny_linear(a, w["down"], residual=h)
            return x

        def plain():  # the same products without the norms and the gate (where their cost shows)
            x = x0
            for w in layers:
                qkvg = skinny_linear(x, w["qkvg"])
                h = skinny_linear(o_in, w["o"], residual=x)
                a = skinny_linear(h, w["gu"], swiglu=True)
                x = skinny_linear(a, w["down"], residual=h)
            return x

        def cublas():
            x = x0
            for w in layers:
                qkvg = F.linear(x, w["qkvg"])
                h = F.linear(o_in * qkvg[:, 2 * hk + hv:], w["o"])
                gate, up = F.linear(h, w["gu"]).chunk(2, -1)
                x = F.linear(gate * up, w["down"])
            return x

        forms = (("late", fused, True), ("prologue", fused, False), ("scaled", scaled, True), ("ogate", ogate, True), ("plain", plain, None), ("cublas", cublas, None))
        for name, fn, late in (f for f in forms if f[0] in os.environ.get("FORMS", "late,prologue,scaled,ogate,plain,cublas")):
            triton_skinny.LATE_NORM = bool(late)
            fn()
            torch.cuda.synchronize()
            us = do_bench_cudagraph(fn, rep=100) * 1e3 / len(layers)
            rows.append(dict(rows=M, form=name, us_per_layer=us))
            print(f"M={M:3d} {name:9s} {us:7.2f} us a layer", flush=True)
        triton_skinny.LATE_NORM = True
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "products_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
