"""Hostile shapes for the split-K tensor-core skinny form: BN=128, SPLIT=8 (empty splits), two row
blocks, K not a power of two, group norm with GS = V. Launch shapes forced through the
interpreter's fixed-shape launch, so CPU only (the GPU tunes its own)."""
import pytest
import torch
import torch.nn.functional as F
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
