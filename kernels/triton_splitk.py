"""Split-K products for batched decode: ``y[M, N] = x[M, K] @ W[N, K]^T`` with 2 <= M <= 64.

At 8-64 rows a decode product is bound by reading W once, and cuBLAS moves it at about 1 TB/s
on the 340M shapes (H100): its tiles leave most SMs idle on a 1024-column output. Here every
program streams a [BN, K / SPLIT] slab of W, so an output of 1024 columns still spreads over
128+ programs. The weight is the tensor-core product's left operand ("swap AB"): its rows fill
the 64-row MMA tile, and the few batch rows are the narrow side.

The SPLIT partial sums of a tile are combined without a second launch and without atomics on
the values: each program writes its fp32 partial to a workspace, then takes a ticket from the
tile's counter; the program that draws the last ticket adds the SPLIT partials in split order
(the same sum whichever program finished last: the result is deterministic), rounds once to the
output dtype as cuBLAS does, stores it and resets the counter for the next launch.

The workspace and counters are per device and shared by every call: launches on one device are
ordered by its stream. Two streams running these products at once on one device would share them
(the library runs decode on one stream).
"""
import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, graph_bench, pow2, round_to

_MAX_SPLIT, _MIN_BN, _MAX_BM = 16, 64, 64
_KEY = ["BM", "N", "K"]


def _prune(configs, named_args, **kwargs):
    """Keep the launch shapes that give roughly one to four waves of programs on an H100."""
    N, K = named_args["N"], named_args["K"]
    keep = [c for c in configs
            if 96 <= triton.cdiv(N, c.kwargs["BN"]) * c.kwargs["SPLIT"] <= 640
            and c.kwargs["BK"] * c.kwargs["SPLIT"] <= max(K, c.kwargs["BK"])]
    return keep or configs[:1]


_CONFIGS = [triton.Config({"BN": bn, "BK": bk, "SPLIT": s}, num_warps=4, num_stages=3)
            for bn in (64, 128) for bk in (64, 128) for s in (1, 2, 4, 8, 16)]


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, sx, sy,
                   F32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   SPLIT: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)                  # weight rows: output columns
    rm = tl.arange(0, BM)                               # batch rows
    mn, mm = rn < N, rm < M
    ks = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK            # columns of K per split, whole BK steps
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k0 in range(pid_s * ks, pid_s * ks + ks, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)   # [BN, BK]
        xt = tl.load(x_ptr + rm[None, :] * sx + rk[:, None], mask=mk[:, None] & mm[None, :], other=0.0)  # [BK, BM]
        if F32_DOT:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, xt.to(w.dtype))
    DT: tl.constexpr = y_ptr.dtype.element_ty
    y_at = y_ptr + rm[None, :] * sy + rn[:, None]                                                   # [BN, BM]
    om = mn[:, None] & mm[None, :]
    if SPLIT == 1:
        tl.store(y_at, round_to(acc, DT), mask=om)
    else:
        tiles = tl.num_programs(0)
        tile = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]                          # [BN, BM]
        tl.store(part_ptr + (pid_s * tiles + pid_n) * BN * BM + tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:  # the last program of this tile: the others' partials are visible
            total = tl.zeros([BN, BM], dtype=tl.float32)
            for s in range(SPLIT):  # split order, not arrival order: a deterministic sum
                total += tl.load(part_ptr + (s * tiles + pid_n) * BN * BM + tile, cache_modifier=".cg")
            tl.store(y_at, round_to(total, DT), mask=om)
            tl.store(cnt_ptr + pid_n, 0)  # the next launch starts its count at zero


_tuned = triton.autotune(configs=_CONFIGS, key=_KEY, do_bench=graph_bench,
                         prune_configs_by={"early_config_prune": _prune})(_splitk_kernel)
_workspaces: dict = {}


def _workspace(device, n: int, bm: int):
    """(partials, counters) for an output of ``n`` columns at ``bm`` rows, grown on demand;
    None when a larger one would have to be made during CUDA-graph capture (the caller falls
    back to cuBLAS: a buffer made in a capture would not be zeroed outside it)."""
    parts = _MAX_SPLIT * (n + 2 * _MIN_BN) * bm
    counters = triton.cdiv(n, _MIN_BN)
    key = device.index if device.type == "cuda" else -1
    have = _workspaces.get(key)
    if have is not None and have[0].numel() >= parts and have[1].numel() >= counters:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:  # grow: keep the old pair alive, a captured graph may still point at it
        _workspaces.setdefault("retired", []).append(have)
        parts, counters = max(parts, have[0].numel()), max(counters, have[1].numel())
    made = (torch.empty(parts, device=device, dtype=torch.float32),
            torch.zeros(counters, device=device, dtype=torch.int32))
    _workspaces[key] = made
    return made


def splitk_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (2 <= x.shape[0] <= _MAX_BM and x.dim() == 2 and x.stride(-1) == 1 and weight.is_contiguous()
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def splitk_linear(x: torch.Tensor, weight: torch.Tensor, *, split=None, block_n=None, block_k=None):
    """``F.linear(x, weight)`` for 2 <= M <= 64 rows (``splitk_supported``): x [M, K], weight [N, K]
    -> [M, N] in x's dtype, fp32 accumulation. ``split`` / ``block_n`` / ``block_k`` fix the launch
    shape (tests, probes); default: tuned per shape on a GPU. None if a workspace cannot be made
    now (inside a CUDA-graph capture before any eager call of this size)."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K and splitk_supported(x, weight)
    bm = pow2(M, 16)
    ws = _workspace(x.device, N, bm)
    if ws is None:
        return None
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, weight, y, ws[0], ws[1], M, N, K, x.stride(0), y.stride(0))
    f32 = INTERPRET or x.dtype == torch.float32
    if split or block_n or block_k or INTERPRET or not x.is_cuda:
        bn, s = block_n or _MIN_BN, split or 2
        _splitk_kernel[(triton.cdiv(N, bn), s)](*args, F32_DOT=f32, BM=bm, BN=bn, BK=block_k or 64, SPLIT=s)
    else:
        _tuned[lambda meta: (triton.cdiv(N, meta["BN"]), meta["SPLIT"])](*args, F32_DOT=f32, BM=bm)
    return y
