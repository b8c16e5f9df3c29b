"""Conventions shared by the Triton kernels: the interpreter and PDL switches, the mixing
coefficient (SPEC section 2) with its clamp bounds, the autotuners' timer and tile sizes."""
import torch
import triton
import triton.language as tl

from ..mixing import CLAMP_MAX, CLAMP_MIN
from ..switches import switches

INTERPRET = switches().interpret  # TRITON_INTERPRET=1: kernels run on the CPU, one program at a time
TUNE = switches().tune and not INTERPRET  # MHLA_STREAM_TUNE=0: one launch configuration per kernel
# the kernels read the raw mixing parameter and clamp it on load to the bounds of mixing.py
MIX_LO: tl.constexpr = tl.constexpr(CLAMP_MIN)
MIX_HI: tl.constexpr = tl.constexpr(CLAMP_MAX)


def _pdl_supported() -> bool:
    """Programmatic dependent launch (Hopper+): a kernel starts while its predecessor drains and
    reads its weights before waiting for the predecessor's outputs. Off under the interpreter,
    on older Triton, or with MHLA_STREAM_PDL=0."""
    if INTERPRET or not switches().pdl or not torch.cuda.is_available():
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return (hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
                and torch.cuda.get_device_capability()[0] >= 9)
    except Exception:
        return False


PDL = _pdl_supported()
# where a decode kernel triggers its successor's launch: at its first instruction (the successor's
# programs then load their weights while this kernel runs; their reads of this kernel's outputs
# still wait for its completion in gdc_wait), or after its main loop (MHLA_STREAM_PDL_EARLY=0)
PDL_EARLY = PDL and switches().pdl_early


@triton.jit
def ring_block(last, w, W):
    """The block held by ring slot ``w`` when ``last`` is the newest completed block (< 0: empty
    slot). Block ``j`` lives in slot ``j % W``; ``torch_ops.ring_blocks`` is the same rule."""
    return last - (((last - w) % W) + W) % W


@triton.jit
def window_coef(m_ptr, L, i, j):
    """``M_ext[i, j]`` of the ``window`` part (0 for j > i, j < 0 or i - j >= L beyond the trained
    blocks). ``i`` and ``j`` are integer tensors that broadcast; the far part is added separately."""
    d = i - j
    beyond = i >= L
    row = tl.minimum(i, L - 1)
    col = tl.where(beyond, L - 1 - d, j)
    ok = (d >= 0) & (j >= 0) & (col >= 0)
    col = tl.minimum(tl.maximum(col, 0), L - 1)
    # the raw parameter is read: clamp here (tril holds by construction, since col <= row)
    m = tl.load(m_ptr + tl.maximum(row, 0) * L + col, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, tl.minimum(tl.maximum(m, MIX_LO), MIX_HI), 0.0)


@triton.jit
def band_coef(m_ptr, L, d, LO: tl.constexpr):
    """``M_ext[i, i - d]`` of the window part for query blocks ``i >= L`` (past the trained blocks it
    depends on the distance alone): the clamped ``M[L-1, L-1-d]`` for ``LO <= d < L``, else 0. Equal to
    ``window_coef`` there, in a third of its integer work over a tile (the mix pass's tiles)."""
    ok = (d >= LO) & (d < L)
    m = tl.load(m_ptr + L * L - 1 - d, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, tl.minimum(tl.maximum(m, MIX_LO), MIX_HI), 0.0)


@triton.jit
def far_coef(m_ptr, L, i):
    """Weight of the *sum* of the blocks older than the window for query block ``i`` (window+far)."""
    count = (i - L + 1).to(tl.float32)
    edge = tl.minimum(tl.maximum(tl.load(m_ptr + (L - 1) * L).to(tl.float32), MIX_LO), MIX_HI)
    return tl.where(count > 0, edge / tl.maximum(count, 1.0), 0.0)


@triton.jit
def ext_coef(m_ptr, L, i, j, FAR: tl.constexpr):
    """Full ``M_ext[i, j]``: the window part plus, under window+far, the per-block share of the far mean."""
    c = window_coef(m_ptr, L, i, j)
    if FAR:
        c += tl.where((j >= 0) & (i - j >= L), far_coef(m_ptr, L, i), 0.0)
    return c


@triton.jit
def round_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), kept in fp32: what a bf16 ring
    stores. Done on the bits because the interpreter's fp32 -> bf16 cast truncates (triton 3.9);
    the result converts to bf16 exactly on every backend. A NaN stays a NaN (quiet, sign kept):
    adding the rounding bias to the GPU's canonical NaN 0x7FFFFFFF would carry into the sign
    and give -0.0, hiding an overflow in the activations that round_to rounds."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    bits = tl.where(x != x, (bits | 0x00400000) & 0xFFFF0000, rounded)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` in ``dtype``, rounded to nearest even as the GPU's cast does. fp32 -> bf16 goes
    through ``round_bf16`` because the interpreter's cast truncates; fp16 (numpy rounds) and a
    value already in ``dtype`` take the plain cast."""
    if dtype == tl.bfloat16:
        if x.dtype == tl.float32:
            x = round_bf16(x)
    return x.to(dtype)


def graph_bench(fn, quantiles=None):
    """The autotuners' timer: CUDA-graph replays, so that a slow host's launch overhead (100+ us
    a launch seen on the GPU machine) does not drown the difference between configurations."""
    from triton.testing import do_bench_cudagraph  # the testing module is needed only when tuning
    # do_bench_cudagraph launches on a fresh stream that is not ordered after the caller's: wait for
    # the kernels in flight there first, since the split-K products share their workspace and tile
    # counters (a launch racing another one on a counter leaves it off zero for every later launch)
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=20, quantiles=quantiles)


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


_workspaces: dict = {}  # (device type, index) -> (partials, counters)
_retired: list = []     # outgrown pairs, kept alive: a captured graph may still point at them


def splitk_workspace(device, parts: int, counters: int):
    """(fp32 partials, int32 tile counters) of at least these sizes for the split-K products,
    shared by every launch on ``device`` (launches on one stream are ordered; the library
    decodes on one stream per device). Grown on demand; None when growing would happen inside a
    CUDA-graph capture (a buffer made there is zeroed only when the graph replays): the caller
    then launches without a split."""
    key = (device.type, device.index)
    have = _workspaces.get(key)
    if have is not None and have[0].numel() >= parts and have[1].numel() >= counters:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:
        _retired.append(have)
        parts, counters = max(parts, have[0].numel()), max(counters, have[1].numel())
    made = (torch.empty(parts, device=device, dtype=torch.float32),
            torch.zeros(counters, device=device, dtype=torch.int32))
    _workspaces[key] = made
    return made
