"""Hostile shapes for the split-K tensor-core skinny form: BN=128, SPLIT=8 (empty splits), two row
blocks, K not a power of two, group norm with GS = V. Launch shapes forced through the
interpreter's fixed-shape launch, so CPU only (the GPU tunes its own)."""
import functools

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import rel_err

from mhla_stream.fused import gated_norm, rms_norm, swiglu
from mhla_stream.kernels import triton_common, triton_skinny
from mhla_stream.kernels.triton_skinny import skinny_linear

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="forces the interpreter's launch shapes")


class _Forced:
    """The kernel launched with ``cfg`` overriding the launcher's fixed shape."""
    def __init__(self, kern, cfg):
        self.kern, self.cfg = kern, cfg

    def __getitem__(self, grid):
        def go(*a, **kw):
            kw.update(self.cfg)
            return self.kern[grid](*a, **kw)
        return go


class _Record(_Forced):
    """The kernel as launched, noting each launch's LATE flag in ``seen``."""
    def __init__(self, kern, seen):
        super().__init__(kern, {})
        self.seen = seen

    def __getitem__(self, grid):
        go = super().__getitem__(grid)
        return lambda *a, **kw: (self.seen.append(kw["LATE"]), go(*a, **kw))[1]


def _r(*s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*s, generator=g)


@pytest.mark.parametrize("cfg", [dict(BN=128, BK=64, SPLIT=8), dict(BN=64, BK=128, SPLIT=4)])
@pytest.mark.parametrize("M,K,N", [(70, 160, 40), (5, 96, 130)])
def test_split_edges(cfg, M, K, N, monkeypatch):
    monkeypatch.setattr(triton_skinny, "_skinny_kernel", _Forced(triton_skinny._skinny_kernel, cfg))
    V, eps = 32, 1e-6
    x, w = _r(M, K, seed=1), _r(N, K, seed=2) / K ** 0.5
    nw, gw, g, res = _r(K, seed=3), _r(V, seed=4), _r(M, K, seed=5), _r(M, N, seed=6)
    ref = res + F.linear(gated_norm(x.view(M, K // V, V), gw, g.view(M, K // V, V), eps).reshape(M, K), w)
    out = skinny_linear(x, w, norm_weight=gw, group=V, eps=eps, gate=g, residual=res)
    assert rel_err(out, ref) < 2e-5
    wgu = _r(2 * N, K, seed=7) / K ** 0.5
    xn = rms_norm(x, nw, eps)
    ref = swiglu(F.linear(xn, wgu[:N]), F.linear(xn, wgu[N:]))
    out = skinny_linear(x, wgu, norm_weight=nw, eps=eps, swiglu=True)
    assert rel_err(out, ref) < 2e-5
    assert int(triton_common._workspaces[("cpu", None)][1].abs().sum()) == 0


@pytest.mark.parametrize("cfg, K, V, late", [(dict(BN=64, BK=32, SPLIT=8), 256, 64, True),    # two splits a head
                                             (dict(BN=64, BK=64, SPLIT=4), 256, 64, True),    # one split a head
                                             (dict(BN=128, BK=32, SPLIT=8), 160, 32, True),   # three empty splits
                                             (dict(BN=64, BK=64, SPLIT=1), 256, 64, True),    # all heads in one split
                                             (dict(BN=16, BK=32, SPLIT=2), 256, 64, True),    # two heads a split
                                             (dict(BN=64, BK=64, SPLIT=2), 96, 32, False)])   # tiles across heads
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_late_norm_matches_the_prologue(cfg, K, V, late, dtype, monkeypatch):
    """The norm as a row scale after the product (LATE): per-head gated norm and the layer norm,
    70 rows in two row blocks, a zero row; checked against the unfused model and the prologue."""
    seen = []
    monkeypatch.setattr(triton_skinny, "_skinny_kernel", _Record(triton_skinny._skinny_kernel, seen))
    monkeypatch.setattr(triton_skinny, "_FIXED_SHAPE", dict(BN=cfg["BN"], BK=cfg["BK"]))
    M, N, eps = 70, 48, 1e-6
    x = _r(M, K, seed=11).to(dtype)
    x[3] = 0
    w, wgu = (_r(N, K, seed=12) / K ** 0.5).to(dtype), (_r(2 * N, K, seed=13) / K ** 0.5).to(dtype)
    nw, gw, g, res = (_r(*s, seed=14 + i).to(dtype) for i, s in enumerate([(K,), (V,), (M, K), (M, N)]))
    tol = 2e-5 if dtype == torch.float32 else 1e-2

    def both():
        lin = functools.partial(skinny_linear, split=cfg["SPLIT"])
        gated = lin(x, w, norm_weight=gw, group=V, eps=eps, gate=g, residual=res)
        return gated, lin(x, wgu, norm_weight=nw, eps=eps, swiglu=True)

    fused = both()
    assert seen == [late, True]
    monkeypatch.setattr(triton_skinny, "LATE_NORM", False)
    early = both()
    assert seen[2:] == [False, False]
    ref_g = res + F.linear(gated_norm(x.view(M, K // V, V), gw, g.view(M, K // V, V), eps).reshape(M, K), w)
    xn = rms_norm(x, nw, eps)
    ref_s = swiglu(F.linear(xn, wgu[:N]), F.linear(xn, wgu[N:]))
    for out, ref, other in zip(fused, (ref_g, ref_s), early):
        assert rel_err(out, ref) < tol and rel_err(other, ref) < tol
        assert out.dtype == dtype and torch.equal(out[3], other[3])  # the zero row: residual / zeros alike
    assert int(triton_common._workspaces[("cpu", None)][1].abs().sum()) == 0


@pytest.mark.parametrize("cfg, K, V", [(dict(BN=128, BK=32, SPLIT=8), 160, 32),   # empty splits, whole heads
                                       (dict(BN=64, BK=32, SPLIT=8), 160, 160)])  # empty splits inside the row's group
def test_late_norm_with_eps_zero_and_empty_splits(cfg, K, V, monkeypatch):
    """An empty split has no rows' squares: with eps = 0 its 1/rms would be inf, and inf times its
    zero partial NaN in every row. It takes no scale."""
    monkeypatch.setattr(triton_skinny, "_FIXED_SHAPE", dict(BN=cfg["BN"], BK=cfg["BK"]))
    M, N = 5, 40
    x, w, gw = _r(M, K, seed=31), _r(N, K, seed=32) / K ** 0.5, _r(V, seed=33)
    out = skinny_linear(x, w, norm_weight=gw, group=V, eps=0.0, split=cfg["SPLIT"])
    ref = F.linear(rms_norm(x.view(M, K // V, V), gw, 0.0).reshape(M, K), w)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-5


def test_late_norm_leaves_fp16_to_the_prologue(monkeypatch):
    """fp16's range: x * w unnormed (2e4 * 4) would overflow where the normed value does not."""
    seen = []
    monkeypatch.setattr(triton_skinny, "_skinny_kernel", _Record(triton_skinny._skinny_kernel, seen))
    x = torch.full((4, 64), 2e4, dtype=torch.float16)
    w, nw = (_r(16, 64, seed=41) / 8).half(), torch.full((64,), 4.0, dtype=torch.float16)
    out = skinny_linear(x, w, norm_weight=nw, eps=1e-6, split=2)
    assert seen == [False] and torch.isfinite(out).all()
    assert rel_err(out.float(), F.linear(rms_norm(x.float(), nw.float(), 1e-6), w.float())) < 2e-3
@pytest.mark.parametrize("cfg", [dict(BN=64, BK=64, SPLIT=2), dict(BN=16, BK=32, SPLIT=1), dict(BN=128, BK=32, SPLIT=8)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_norm_statistics_from_the_previous_product(cfg, dtype, monkeypatch):
    """A residual product writes its output rows' square sums (``stats_out``: 16-column slots, the
    tile's unused slots zeroed, N = 130 leaving a partial slot and a last tile past the buffer);
    the next product takes its layer norm from them as a scale of its sums, with the norm weight
    folded into its weight (``stats_in``), and gives the unfused norm + product."""
    monkeypatch.setattr(triton_skinny, "_FIXED_SHAPE", dict(BN=cfg["BN"], BK=cfg["BK"]))
    lin = functools.partial(skinny_linear, split=cfg["SPLIT"])
    M, K, N, eps = 70, 96, 130, 1e-6
    x, res = _r(M, K, seed=21).to(dtype), _r(M, N, seed=22).to(dtype)
    w, w2 = (_r(N, K, seed=23) / K ** 0.5).to(dtype), (_r(2 * 48, N, seed=24) / N ** 0.5).to(dtype)
    nw = _r(N, seed=25).to(dtype)
    stats = triton_skinny.norm_stats(M, N, x.device).fill_(float("nan"))  # every slot must be written
    h = lin(x, w, residual=res, stats_out=stats)
    assert torch.equal(h, lin(x, w, residual=res))
    assert rel_err(stats, triton_skinny.row_stats(h)) < 1e-6  # each slot its own 16 columns
    folded = (w2.float() * nw.float()).to(dtype)
    with_stats = lin(h, folded, eps=eps, swiglu=True, stats_in=stats)
    hn = rms_norm(h, nw, eps)
    ref = swiglu(F.linear(hn, w2[:48]), F.linear(hn, w2[48:]))
    assert rel_err(with_stats, ref) < (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("cfg", [dict(BN=64, BK=64, SPLIT=8), dict(BN=16, BK=32, SPLIT=4), dict(BN=128, BK=16, SPLIT=8)])
def test_norm_statistics_per_head_groups(cfg, monkeypatch):
    """The output projection's per-head norm (groups of 32 of 128 columns) from statistics: each
    split inside one group, scaled by the tile's last program (a split a group, two a group, and a
    shape that fits only with narrower tiles: BK 64 -> 32), with a zero row. One split over several
    groups has nothing to scale it by: refused."""
    monkeypatch.setattr(triton_skinny, "_FIXED_SHAPE", dict(BN=cfg["BN"], BK=cfg["BK"]))
    M, K, N, V, eps = 19, 128, 72, 32, 1e-6
    x, w, gw, res = _r(M, K, seed=31), _r(N, K, seed=32) / K ** 0.5, _r(V, seed=33), _r(M, N, seed=34)
    x[3] = 0.0
    ref = res + F.linear(rms_norm(x.view(M, K // V, V), gw, eps).reshape(M, K), w)
    lin = functools.partial(skinny_linear, x, w * gw.repeat(K // V), group=V, eps=eps, residual=res,
                            stats_in=triton_skinny.row_stats(x))
    out = lin(split=cfg["SPLIT"])
    assert rel_err(out, ref) < 2e-5 and torch.isfinite(out).all()
    with pytest.raises(AssertionError, match="no launch shape fits"):
        lin(split=1)
    # statistics from a product whose tiles (64 columns) are wider than the groups read them
    st = triton_skinny.norm_stats(M, K, x.device).fill_(float("nan"))
    x2 = skinny_linear(_r(M, 40, seed=35), _r(K, 40, seed=36), residual=x, stats_out=st, split=2)
    ref = res + F.linear(rms_norm(x2.view(M, K // V, V), gw, eps).reshape(M, K), w)
    out = skinny_linear(x2, w * gw.repeat(K // V), group=V, eps=eps, residual=res, split=cfg["SPLIT"], stats_in=st)
    assert rel_err(out, ref) < 2e-5


def test_norm_statistics_with_eps_zero_an_empty_split_and_padded_groups(monkeypatch):
    """Three heads (norm groups padded to four) over four splits: the last split is empty and its
    group a padding one, whose 1/rms with eps = 0 is inf. Each split scales its own sums, so the
    empty one must take no scale (inf times its zero sums: NaN in every row)."""
    monkeypatch.setattr(triton_skinny, "_FIXED_SHAPE", dict(BN=16, BK=32))
    M, K, N, V = 5, 96, 40, 32
    x, w, gw, res = _r(M, K, seed=41), _r(N, K, seed=42) / K ** 0.5, _r(V, seed=43), _r(M, N, seed=44)
    out = skinny_linear(x, w * gw.repeat(K // V), group=V, eps=0.0, residual=res, split=4,
                        stats_in=triton_skinny.row_stats(x))
    ref = res + F.linear(rms_norm(x.view(M, K // V, V), gw, 0.0).reshape(M, K), w)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-5


def test_norm_statistics_refuse_what_does_not_fit():
    x, w = _r(4, 32, seed=1), _r(48, 32, seed=2)
    with pytest.raises(AssertionError, match="norm_stats"):
        skinny_linear(x, w, residual=_r(4, 48, seed=3), stats_out=torch.zeros(2, 4))
    with pytest.raises(AssertionError, match="norm_stats"):
        skinny_linear(x[:1], w, residual=_r(1, 48, seed=3), stats_out=triton_skinny.norm_stats(1, 48, "cpu"))
    with pytest.raises(AssertionError, match="folded"):  # a norm weight as well as statistics
        skinny_linear(x, w, norm_weight=_r(32, seed=4), stats_in=triton_skinny.norm_stats(4, 32, "cpu"))
    with pytest.raises(AssertionError, match="folded"):  # one row
        skinny_linear(x[:1], w, stats_in=triton_skinny.norm_stats(1, 32, "cpu"))
    with pytest.raises(AssertionError, match="multiple of 16"):
        skinny_linear(x, w, group=8, stats_in=triton_skinny.norm_stats(4, 32, "cpu"))
    with pytest.raises(AssertionError, match="norm_stats"):  # statistics of another width
        skinny_linear(x, w, stats_in=triton_skinny.norm_stats(4, 48, "cpu"))
    with pytest.raises(AssertionError, match="alias"):
        st = triton_skinny.norm_stats(4, 32, "cpu")
        skinny_linear(x, _r(32, 32, seed=6), residual=x, stats_in=st, stats_out=st)
    with pytest.raises(AssertionError, match="fp16"):
        skinny_linear(x.half(), w.half(), stats_in=triton_skinny.norm_stats(4, 32, "cpu"))
    assert not triton_skinny.stats_fit(160, 16) and not triton_skinny.stats_fit(64, 0)  # 10 groups > 8 splits
    assert triton_skinny.stats_fit(1024, 256) and triton_skinny.stats_ready("cpu", 4, 32)
    x40 = _r(4, 40, seed=5)
    assert rel_err(triton_skinny.row_stats(x40).sum(0), x40.pow(2).sum(1)) < 1e-6
    assert not triton_skinny.stats_fit(40, 8) and triton_skinny.stats_fit(128, 32)


def test_tuned_configs_reports_each_tuners_picks(monkeypatch):
    """mhla-bench records the products' tuned launch shapes (``tuned_configs``): every tuner's
    cache, the one-row tuners included, by tuner and key."""
    import triton
    from mhla_stream.kernels import triton_skinny as ts
    monkeypatch.setattr(ts._gemm, "cache", {(32, 1024): triton.Config({"BN": 64, "BK": 128, "SPLIT": 2})})
    one_row = ts._gemv(2048)
    monkeypatch.setattr(one_row, "cache", {(1, 2048): triton.Config({"BN": 4, "BK": 2048, "SPLIT": 1})})
    got = ts.tuned_configs()
    assert "BN: 64" in got["rows: (32, 1024)"] and "SPLIT: 2" in got["rows: (32, 1024)"]
    assert "BK: 2048" in got["one row, K 2048: (1, 2048)"]


@pytest.mark.parametrize("K, V", [(96, 32), (144, 48), (64, 64), (160, 32), (128, 16)])  # 3 heads, 48-column heads, ...
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_one_row_group_norm_from_one_load(K, V, dtype):
    """One row: every group's 1/rms from one load of the row (groups padded to a power of two in
    number and width), with the gate and the residual; the layer norm (one group) with SwiGLU;
    eps = 0."""
    N = 40
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    x, w = _r(1, K, seed=1).to(dtype), (_r(N, K, seed=2) / K ** 0.5).to(dtype)
    gw, g, res, nw = _r(V, seed=4).to(dtype), _r(1, K, seed=5).to(dtype), _r(1, N, seed=6).to(dtype), _r(K, seed=3).to(dtype)
    for eps in (1e-6, 0.0):
        ref = res.float() + F.linear(gated_norm(x.view(1, K // V, V), gw, g.view(1, K // V, V), eps).reshape(1, K).float(),
                                     w.float())
        out = skinny_linear(x, w, norm_weight=gw, group=V, eps=eps, gate=g, residual=res)
        assert out.dtype == dtype and rel_err(out.float(), ref) < tol, eps
    wgu = (_r(2 * N, K, seed=7) / K ** 0.5).to(dtype)
    xn = rms_norm(x, nw, 1e-6)
    ref = swiglu(F.linear(xn, wgu[:N]), F.linear(xn, wgu[N:]))
    out = skinny_linear(x, wgu, norm_weight=nw, eps=1e-6, swiglu=True)
    assert rel_err(out.float(), ref.float()) < tol


@pytest.mark.parametrize("M", (8, 32))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_whole_slice_shapes_one_tile_a_program(M, dtype, monkeypatch):
    """The shipped rows picks' form (``skinny_shapes.whole_slice_shapes``), scaled down: each
    program one weight tile, all of it requested before the wait. The fused step's four products:
    q/k/v/g and gate/up with the layer norm from statistics (one tile of the whole row; two splits
    of one tile), the output projection with per-head groups (a split a head, one tile each), and
    the down projection with K not a power of two as three one-tile splits, the last short (176 =
    64 + 64 + 48: allowed by ``_fits_rows``, which the old ``BK x SPLIT <= K`` rule refused)."""
    from mhla_stream.kernels.skinny_shapes import _fits_rows, whole_slice_shapes
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    K, V, I, eps = 128, 32, 176, 1e-6
    x, res = _r(M, K, seed=51).to(dtype), _r(M, K, seed=52).to(dtype)
    nw, gw = _r(K, seed=53).to(dtype), _r(V, seed=54).to(dtype)
    w_qkv, w_o = (_r(96, K, seed=55) / K ** 0.5).to(dtype), (_r(K, K, seed=56) / K ** 0.5).to(dtype)
    w_gu, w_d = (_r(2 * I, K, seed=57) / K ** 0.5).to(dtype), (_r(K, I, seed=58) / I ** 0.5).to(dtype)

    def forced(bn, bk, sp):
        monkeypatch.setattr(triton_skinny, "_FIXED_SHAPE", dict(BN=bn, BK=bk))
        return functools.partial(skinny_linear, split=sp)
    stats = triton_skinny.row_stats(x)
    xn = rms_norm(x, nw, eps)
    for bn, bk, sp in [(16, 128, 1), (32, 64, 2)]:  # one tile of the row; two splits of one tile
        lin = forced(bn, bk, sp)
        out = lin(x, (w_qkv.float() * nw.float()).to(dtype), eps=eps, stats_in=stats)
        assert rel_err(out, F.linear(xn, w_qkv)) < tol, (bn, bk, sp)
        out = lin(x, (w_gu.float() * nw.float()).to(dtype), eps=eps, swiglu=True, stats_in=stats)
        assert rel_err(out, swiglu(F.linear(xn, w_gu[:I]), F.linear(xn, w_gu[I:]))) < tol, (bn, bk, sp)
    out = forced(64, V, K // V)(x, (w_o.float() * gw.float().repeat(K // V)).to(dtype), group=V, eps=eps,
                                residual=res, stats_in=stats)
    ref = res + F.linear(rms_norm(x.view(M, K // V, V), gw, eps).reshape(M, K), w_o)
    assert rel_err(out, ref) < tol
    a = _r(M, I, seed=59).to(dtype)
    assert _fits_rows(triton.Config(dict(BN=16, BK=64, SPLIT=3)), {"K": I}, {})
    assert not _fits_rows(triton.Config(dict(BN=16, BK=64, SPLIT=4)), {"K": I}, {})  # a split with no columns
    st = triton_skinny.norm_stats(M, K, x.device).fill_(float("nan"))
    out = forced(16, 64, 3)(a, w_d, residual=res, stats_out=st)
    assert rel_err(out, res + F.linear(a, w_d)) < tol
    assert rel_err(st, triton_skinny.row_stats(out)) < 1e-6
    assert (32, 1024, 4, 1, None, 1) in whole_slice_shapes(1024, 1024, False)  # (32K weights a tile at most)
    assert {(bk, sp) for _, bk, _, _, _, sp in whole_slice_shapes(2816, 2816, False)} == {(2048, 2), (1024, 3), (512, 6)}
    assert all(bk == 256 and sp == 4 or bk == 128 and sp == 8 for _, bk, *_, sp in whole_slice_shapes(1024, 256, False))
