"""Probe (GPU): every launch shape of the skinny tensor-core product on the 340M decode shapes,
timed as the model meets them: CUDA graphs of 24 launches, each on its own weight (so weights
stream from HBM, not from L2 as in the tuner's timing of one launch), with the model's folded
norm, gate, SwiGLU and residual. Prints each shape's best launch shapes and the tuner's pick
(timed the same way); JSON to $OUT."""
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from mhla_stream import preset_config
from mhla_stream.kernels import triton_skinny
from mhla_stream.kernels.triton_skinny import _late_fits, skinny_linear


def main():
    cfg = preset_config("mhla-340m", vocab_size=32000)
    D, H, K, V, F_ = cfg.hidden_size, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.intermediate_size
    dev, dt = "cuda", torch.bfloat16
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt) / s[-1] ** 0.5  # noqa: E731
    shapes = {  # name: (weight shape, K, kwargs builder)
        "qkvg": ((2 * H * K + 2 * H * V, D), D, lambda M: dict(norm_weight=torch.ones(D, device=dev, dtype=dt))),
        "o": ((D, H * V), H * V, lambda M: dict(norm_weight=torch.ones(V, device=dev, dtype=dt), group=V,
                                               gate=r(M, H * V), residual=r(M, D))),
        "gate_up": ((2 * F_, D), D, lambda M: dict(norm_weight=torch.ones(D, device=dev, dtype=dt), swiglu=True)),
        "down": ((D, F_), F_, lambda M: dict(residual=r(M, D))),
    }
    grid = [(bn, bk, sp) for bn in (16, 32) for bk in (128, 256) for sp in (1, 2, 4)]
    grid += [(bn, bk, sp) for bn in (64, 128) for bk in (64, 128) for sp in (1, 2, 4, 8)]
    rows = []
    for M in (int(m) for m in os.environ.get("ROWS", "32").split(",")):
        for name, (wshape, Kdim, kw) in shapes.items():
            ws = [r(*wshape) for _ in range(24)]
            x, extra = r(M, Kdim), kw(M)
            gs = extra.get("group", Kdim)

            def run(split=None):
                for w in ws:
                    skinny_linear(x, w, split=split, **extra)
            results = []
            for bn, bk, sp in grid:
                triton_skinny._FIXED_SHAPE = {"BN": bn, "BK": bk}
                try:
                    run(sp)
                    us = do_bench_cudagraph(lambda: run(sp), rep=30) * 1e3 / len(ws)
                except Exception as e:
                    print(f"M={M} {name} BN={bn} BK={bk} SPLIT={sp}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    continue
                late = "norm_weight" in extra and _late_fits(Kdim, gs, bk, sp)
                results.append(dict(rows=M, shape=name, BN=bn, BK=bk, SPLIT=sp, late=late, us=us))
            run()  # the tuner's pick
            tuned = do_bench_cudagraph(run, rep=30) * 1e3 / len(ws)
            pick = [str(c) for c in triton_skinny._gemm.cache.values()]
            best = sorted(results, key=lambda d: d["us"])
            bw = ws[0].numel() * 2 / (best[0]["us"] * 1e3)
            cub = do_bench_cudagraph(lambda: [F.linear(x, w) for w in ws], rep=30) * 1e3 / len(ws)
            print(f"M={M:3d} {name:8s} tuned {tuned:6.2f} us | cuBLAS plain {cub:6.2f} | best "
                  + ", ".join(f"{d['BN']}/{d['BK']}/{d['SPLIT']}{'L' if d['late'] else ''} {d['us']:.2f}" for d in best[:4])
                  + f" ({bw:.0f} GB/s)", flush=True)
            rows += results + [dict(rows=M, shape=name, tuned_us=tuned, cublas_us=cub, tuner_cache=pick[-3:])]
            triton_skinny._FIXED_SHAPE = {"BN": 64, "BK": 64}
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "skinny_sweep.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
