"""Session 24 probe (offline, no GPU needed: compiles for sm_90a): can Triton reduce split-K
partials through a cluster's distributed shared memory instead of global memory? At 32 rows a
split product's tile waits three dependent L2 trips after its MMA (the partial's store, the
ticket's atomic, the partials' load); a cluster of the SPLIT programs could meet in distributed
shared memory. Gluon (Triton's layout-explicit dialect) lets a layout spread a tensor over the
CTAs of a cluster (``cga_layout``, ``num_ctas``). Two forms of "sum over a dimension spread over
4 CTAs": (a) ``gl.sum`` over it directly, (b) ``gl.convert_layout`` to a layout spread over the
other dimension first (data moved between CTAs), then a sum inside each CTA.
Outcome with triton 3.6 (session 24): (a) asserts ``isReduceWithinCTA`` in ReduceOpToLLVM; (b)
emits ``nvvm.mapa`` (distributed shared memory) and fails verification ("result must be LLVM
pointer in address space 0 or 7, got ptr<3>"). So not with this Triton: the form needs CUDA, or
a later Triton. Run: python .ci/cluster_reduce_probe.py a|b (each may abort the process)."""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

@gluon.jit
def direct(x_ptr, y_ptr, R: gl.constexpr, C: gl.constexpr):
    L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [2, 2], [1, 0], [[1, 0], [2, 0]])  # CTA bits -> dim 0 (the K splits)
    r = gl.arange(0, R, layout=gl.SliceLayout(1, L))[:, None]
    c = gl.arange(0, C, layout=gl.SliceLayout(0, L))[None, :]
    s = gl.sum(gl.load(x_ptr + r * C + c), axis=0)                       # over the CTAs
    gl.store(y_ptr + c, s[None, :])


@gluon.jit
def moved(x_ptr, y_ptr, R: gl.constexpr, C: gl.constexpr):
    L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [2, 2], [1, 0], [[1, 0], [2, 0]])  # CTA bits -> dim 0 (the K splits)
    L2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [2, 2], [1, 0], [[0, 1], [0, 2]])  # CTA bits -> dim 1
    r = gl.arange(0, R, layout=gl.SliceLayout(1, L))[:, None]
    c = gl.arange(0, C, layout=gl.SliceLayout(0, L))[None, :]
    s = gl.sum(gl.convert_layout(gl.load(x_ptr + r * C + c), L2), axis=0)  # moved between CTAs, then summed in each
    c2 = gl.arange(0, C, layout=gl.SliceLayout(0, L2))[None, :]
    gl.store(y_ptr + c2, s[None, :])


fn = {"a": direct, "b": moved}[sys.argv[1] if len(sys.argv) > 1 else "b"]
src = gluon._runtime.GluonASTSource(fn=fn, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "R": "constexpr",
                                                      "C": "constexpr"}, constexprs={"R": 64, "C": 256})
try:
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_ctas": 4})
    print("compiled:", [ln.strip() for ln in ck.asm["ptx"].splitlines() if "cluster" in ln or "mapa" in ln][:12])
except Exception as e:
    print("failed:", type(e).__name__, str(e)[:300])
