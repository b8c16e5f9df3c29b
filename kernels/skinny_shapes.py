"""Launch shapes of the skinny products (``triton_skinny``): the tuners' configurations and the
rules for which shape fits which launch (the norm groups of the late norm and of statistics, the
split-K workspace's limits, the program counts worth timing). Plain Python: no kernels here."""
import functools

import triton

# LATE is part of the key: a shape tuned without it may not fit the late norm's groups
_KEY = ["BM", "N", "K", "GS", "NORM", "GATE", "SWIGLU", "RESIDUAL", "LATE", "STATS_IN"]
# few configurations: each costs a compile at the first decode step of a new model shape. No row
# tiles of 16: alone (weight in L2) they tie with 8, in the step they were 4% slower (session 19)
_GEMV = [triton.Config({"BN": bn, "BK": bk, "SPLIT": 1}, num_warps=w, num_stages=3)
         for bn in (2, 4, 8) for bk, w in ((512, 4), (1024, 8))]
# the shapes that won on the 340M shapes at 32 rows, timed over 24 weights from HBM (session 15,
# .ci/gpu_skinny_sweep.py; 16-row tiles of 256 columns won the output projection once)
_DOT = [triton.Config({"BN": bn, "BK": bk, "SPLIT": sp}, num_warps=4, num_stages=3)
        for bn, bk, sp in [(64, 64, 1), (64, 64, 2), (64, 64, 4), (64, 64, 8), (64, 128, 1), (64, 128, 2),
                           (64, 128, 4), (64, 128, 8), (128, 128, 4), (128, 128, 8), (16, 256, 4)]]
_MAX_SPLIT, _MAX_BN = 8, 128


def whole_slice_shapes(K: int, GS: int, swiglu: bool) -> list[tuple]:
    """Tensor-core launch shapes (BN, BK, num_warps, num_stages, maxnreg, SPLIT) whose programs hold
    one BK tile each (each split one tile), so that a program requests all of its weight before it
    waits on the previous kernel, as the one-row products do; the tuner's shapes loop over 2-16
    tiles and request only the first early. In the fused decode step at 8 and 32 rows they won
    every product (mhla-340m, H100, session 22: 793 -> 727 and 1,373 -> 1,078 us a step). Splits
    stay inside a norm group narrower than the row; a tile holds at most 32K weights (two with
    SwiGLU's gate and up rows)."""
    if GS < K:
        tiles = [(GS, K // GS), (GS // 2, 2 * K // GS)]
    else:  # one tile, or 2-8 tiles of a power-of-two width (the last split may be short)
        bk = triton.next_power_of_2(K)
        tiles = [(bk, 1)] + [(bk >> i, -(-K // (bk >> i))) for i in (1, 2, 3)]
    rows = 2 if swiglu else 1
    return [(bn, bk, w, 1, None, sp) for bk, sp in tiles if 16 <= bk and bk & (bk - 1) == 0 and 1 <= sp <= _MAX_SPLIT
            for bn in (16, 32, 64, 128) if bn * bk * rows <= 32768 for w in (4, 8)]


@functools.lru_cache(maxsize=None)
def _some_late_fits(K: int, GS: int, stats: bool = False) -> bool:
    """Whether any tuned tensor-core shape fits the late norm, or with ``stats`` the statistics'
    scaling (asked every tuned call: cached)."""
    fits = _stats_fit_shape if stats else _late_fits
    return any(fits(K, GS, c.kwargs["BK"], c.kwargs["SPLIT"]) for c in _DOT)


# the launch shape without tuning (the interpreter, or a fixed ``split``)
_FIXED_SHAPE = {"BN": 64, "BK": 64}


def _split_cols(K: int, BK: int, split: int) -> int:
    """The K columns of each split (a multiple of BK); the kernel's ``ks``."""
    return triton.cdiv(triton.cdiv(K, split), BK) * BK


def _late_fits(K: int, GS: int, BK: int, split: int) -> bool:
    """Whether the late norm can run: every split lies inside one norm group, or holds whole
    groups whose ends fall on tile ends (or the row is one group)."""
    ks = _split_cols(K, BK, split)
    return GS == K or GS % ks == 0 or ((ks % GS == 0 or ks >= K) and GS % BK == 0)


def _stats_fit_shape(K: int, GS: int, BK: int, split: int) -> bool:
    """Whether norm statistics can scale this launch shape's sums: every split inside one group."""
    return GS == K or GS % _split_cols(K, BK, split) == 0


def _waves(configs, named_args, **kwargs):
    """The tensor-core launch shapes that give 48-640 programs (a third of a wave to about five on
    an H100), and with LATE only those that fit the norm groups."""
    N, K, M, bm = named_args["N"], named_args["K"], named_args["M"], kwargs.get("BM", 16)
    progs = lambda c: triton.cdiv(N, c.kwargs["BN"]) * c.kwargs["SPLIT"] * triton.cdiv(M, bm)  # noqa: E731
    fits = _stats_fit_shape if kwargs.get("STATS_IN") else _late_fits
    if kwargs.get("LATE"):  # only the shapes that fit the norm groups
        configs = [c for c in configs if fits(K, named_args["GS"], c.kwargs["BK"], c.kwargs["SPLIT"])]
    keep = [c for c in configs if 48 <= progs(c) <= 640 and c.kwargs["BK"] * c.kwargs["SPLIT"] <= max(K, c.kwargs["BK"])]
    return keep or [min(configs, key=lambda c: abs(progs(c) - 132))]


def _fits_rows(cfg, named_args, kwargs) -> bool:
    """Whether a tensor-core launch shape (a step pick) fits this launch: the workspace's tile and
    split limits, and with LATE / STATS_IN the norm groups."""
    bn, bk, sp = cfg.kwargs["BN"], cfg.kwargs["BK"], cfg.kwargs["SPLIT"]
    K = named_args["K"]
    fits = _stats_fit_shape if kwargs.get("STATS_IN") else _late_fits
    # the tuner's rule (BK x SPLIT <= K: empty splits allowed, the kernel skips them), or every split
    # holding columns with a short last one (K 2816 as three splits of one 1024 tile: whole-slice shapes)
    splits_fit = bk * sp <= max(K, bk) or (sp - 1) * _split_cols(K, bk, sp) < K
    return (16 <= bn <= _MAX_BN and 16 <= bk and 1 <= sp <= _MAX_SPLIT and splits_fit
            and (not kwargs.get("LATE") or fits(K, named_args["GS"], bk, sp)))


def _one_split(cfg, named_args, kwargs) -> bool:
    return cfg.kwargs["SPLIT"] == 1  # (any row tile and column tile fits one row)
