"""Compiles the decode-side kernels that carry the L2 prefetch (the skinny products with and without
PF_LINES, the prefetch kernel) for sm_90 on a machine without a GPU, and checks that the PTX holds
``prefetch.global.L2`` exactly where it should. The interpreter cannot run inline PTX, so this is
the CPU's only check of that path.

    env -u TRITON_INTERPRET python .ci/compile_decode_sm90.py
"""
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mhla_stream.kernels import triton_prefetch, triton_skinny


def ptx(fn, consts, types):
    sig = {n: "constexpr" if n in consts else types(n) for n in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4}).asm["ptx"]


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")
    ptrs = {n: "*bf16" for n in ("x_ptr", "w_ptr", "y_ptr", "nw_ptr", "g_ptr", "res_ptr", "pf_ptr")}
    ptrs["eps"] = "fp32"
    for pf in (0, 64):
        for swiglu in (False, True):
            for dot, bm in ((False, 1), (True, 16)):
                consts = dict(PF_LINES=pf, PF_STRIDE=64, NORM=True, GATE=False, SWIGLU=swiglu, RESIDUAL=not swiglu,
                              DOT=dot, F32_DOT=False, BM=bm, NG=1, BGS=1024, PDL=True, BN=16 if dot else 4,
                              BK=256 if dot else 1024)
                n = ptx(triton_skinny._skinny_kernel, consts, lambda a: ptrs.get(a, "i32")).count("prefetch.global.L2")
                assert (n > 0) == (pf > 0), (consts, n)
                print(f"ok  skinny PF_LINES={pf} swiglu={swiglu} dot={dot}: {n} prefetch instruction(s)")
    n = ptx(triton_prefetch._prefetch_kernel, dict(STRIDE=64, LINES=triton_prefetch.LINES),
            lambda a: "*bf16" if a.startswith("p") else "i32").count("prefetch.global.L2")
    assert n > 0
    print(f"ok  prefetch kernel: {n} prefetch instruction(s)")


if __name__ == "__main__":
    main()
