"""Compiles the Triton prefill kernels for sm_90 on a machine without a GPU (front end, PTX and
Triton's bundled ptxas), for each input dtype, with and without a state, both policies.

The interpreter runs the kernels' arithmetic but not the compiler's typing: a variable whose type
differs between the branches of an ``if``, or a constexpr used as a value, fails only here.

    env -u TRITON_INTERPRET python .ci/compile_prefill_sm90.py [fp32,bf16,fp16] [--ptx DIR]

``--ptx DIR`` writes each kernel's PTX (to diff two versions of the kernels).
"""
import argparse
import hashlib
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mhla_stream.kernels import triton_chunk as tc
from mhla_stream.kernels.triton_chunk import prefix_dtype

# the 340M layer: H = 4, K = 128, V = 256, C = 64, L = 32
H, K, V, BT, BK, BV, BW = 4, 128, 256, 64, 128, 64, 32
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # under the autotuner
        kernel = kernel.fn
    return kernel


def build(kernel, pointers, consts, ptx_dir):
    """Compiles one specialization; arguments not named in ``pointers`` or ``consts`` are i32."""
    fn = jit_function(kernel)
    sig = {name: "constexpr" if name in consts else pointers.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    if ptx_dir:
        tag = hashlib.md5(repr((sorted(sig.items()), sorted(consts.items()))).encode()).hexdigest()[:8]
        with open(os.path.join(ptx_dir, f"{fn.__name__}_{tag}.ptx"), "w") as f:
            f.write(compiled.asm["ptx"])
    print(f"ok  {fn.__name__:16s} {consts}")


def main(dtypes, ptx_dir):
    import torch
    for dt in dtypes:
        p = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            prefix_dtype(getattr(torch, TORCH_NAMES[dt]))]
        prec = "ieee" if dt == "fp32" else "tf32"
        print(f"== inputs {dt}, P stored in {p}")
        fp32 = dict(ring_ptr="*fp32", far_ptr="*fp32", seq_ptr="*i32")
        for state in (False, True):
            # S as each layout stores it (lean: bf16 for stateless 16-bit inputs)
            for variant, (bi, bcol) in (("base", (64, 128)), ("lean", (128, 128)), ("lean", (64, 256)),
                                        ("lean", (64, 128))):
                lean = variant == "lean"
                s = "fp32" if variant == "base" or state or dt == "fp32" else "bf16"
                for far in (False, True):
                    build(tc._mix_kernel, dict(s_ptr="*" + s, cum_ptr="*fp32", p_ptr="*" + p, pn_ptr="*fp32",
                                               m_ptr="*fp32", **fp32),
                          dict(H=H, KV=K * V, W=BW - 1, HAS_STATE=state, FAR=far, TILES=variant, LEAN=lean,
                               SPLIT16=lean and prec == "tf32" and s == "bf16", BI=bi, BJ=32, BW=BW, BCOL=bcol,
                               PREC=prec, F32_DOT=False), ptx_dir)
                io = {f"{x}_ptr": "*" + dt for x in "qkvo"}
                for vprog in (BV, V):  # one program per BV value columns, or all of V in one program
                    build(tc._output_kernel, dict(p_ptr="*" + p, p0_ptr="*fp32", r_ptr="*fp32", m_ptr="*fp32",
                                                  seq_ptr="*i32", scale="fp32", **io),
                          dict(H=H, K=K, V=V, HAS_STATE=state, BT=BT, BK=BK, BV=BV, VPROG=vprog, PREC=prec,
                               F32_DOT=False), ptx_dir)
                    build(tc._summary_kernel, dict(k_ptr="*" + dt, v_ptr="*" + dt, s_ptr="*" + s, r_ptr="*fp32",
                                                   seq_ptr="*i32"),
                          dict(H=H, K=K, V=V, HAS_STATE=state, ROUND=False, BT=BT, BK=BK, BV=BV, VPROG=vprog,
                               PREC=prec, F32_DOT=False), ptx_dir)
        for far in (False, True):
            build(tc._advance_kernel, dict(s_ptr="*fp32", p_ptr="*" + p, pn_ptr="*fp32", r_ptr="*fp32",
                                           p0_ptr="*fp32", pos_ptr="*i64", **fp32),
                  dict(H=H, KV=K * V, FAR=far, BCOL=512), ptx_dir)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dtypes", nargs="?", default="fp32,bf16,fp16")
    ap.add_argument("--ptx", default=None, help="folder for the PTX of each kernel")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")
    if args.ptx:
        os.makedirs(args.ptx, exist_ok=True)
    main(args.dtypes.split(","), args.ptx)
