"""Batched-decode products at the 340M shapes (GPU): cuBLAS (``F.linear``) against the split-K
kernel (tuned) per batch, from CUDA graphs of 24 launches, each on its own weight copy (as the
24 layers: the weights come from HBM, not L2), with the GB/s of the weight read. Prints a
table and writes JSON to $OUT/splitk_probe.json."""
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from mhla_stream.kernels import triton_splitk
from mhla_stream.kernels.triton_splitk import splitk_linear

SHAPES = {"qkvg": (3072, 1024), "o": (1024, 1024), "gate_up": (5632, 1024), "down": (1024, 2816)}


def main():
    rows = []
    batches = [int(b) for b in os.environ.get("BATCHES", "8,16,32,64").split(",")]
    for name, (N, K) in SHAPES.items():
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(24)]
        for M in batches:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0])
            got = splitk_linear(x, ws[0])  # tunes this shape
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            best = triton_splitk._tuned.best_config
            per = {}
            for label, fn in (("cublas", lambda: [F.linear(x, w) for w in ws]),
                              ("splitk", lambda: [splitk_linear(x, w) for w in ws])):
                per[label] = do_bench_cudagraph(fn, rep=50) * 1e3 / len(ws)  # us a launch
            gbs = {k: N * K * 2 / (t * 1e-6) / 1e9 for k, t in per.items()}
            rows.append(dict(shape=name, N=N, K=K, M=M, cublas_us=per["cublas"], splitk_us=per["splitk"],
                             cublas_gbs=gbs["cublas"], splitk_gbs=gbs["splitk"], rel_err=err,
                             config=str(best)))
            print(f"{name:8s} M={M:4d}  cuBLAS {per['cublas']:6.2f} us {gbs['cublas']:6.0f} GB/s   "
                  f"split-K {per['splitk']:6.2f} us {gbs['splitk']:6.0f} GB/s  x{per['cublas'] / per['splitk']:.2f}"
                  f"  err {err:.1e}  {best}", flush=True)
    for M in batches:  # a whole layer's four products
        c = sum(r["cublas_us"] for r in rows if r["M"] == M)
        s = sum(r["splitk_us"] for r in rows if r["M"] == M)
        print(f"layer M={M:4d}: cuBLAS {c:6.2f} us, split-K {s:6.2f} us ({c / s:.2f}x)")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "splitk_probe.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
