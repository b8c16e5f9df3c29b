"""The split-K product of the batched decode step against ``F.linear``: ragged shapes, every split
count (empty splits included), repeated launches (the tile counters must reset), a deterministic
sum, and the cases it declines. Runs under TRITON_INTERPRET=1 on a CPU, natively on a GPU (where
the default launch shape is also the tuned one)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from mhla_stream.kernels import triton_splitk
from mhla_stream.kernels.triton_splitk import splitk_linear, splitk_supported

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("M,N,K,split,bn,bk", [
    (2, 64, 64, 1, 64, 64),      # no split: stored directly
    (8, 100, 100, 3, 64, 32),    # ragged N and K, odd split
    (33, 200, 256, 4, 64, 64),   # rows past a power of two
    (64, 130, 96, 2, 128, 64),   # the widest batch, a wide tile
    (5, 64, 40, 16, 64, 16),     # more splits than K steps: empty splits add zeros
])
def test_splitk_matches_linear(dtype, M, N, K, split, bn, bk):
    x, w = _rand(M, K, dtype=dtype, seed=M), _rand(N, K, dtype=dtype, seed=N) / K ** 0.5
    exact = F.linear(x.double(), w.double())
    first = splitk_linear(x, w, split=split, block_n=bn, block_k=bk)
    assert first.shape == (M, N) and first.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(first, exact) < 1e-6
    else:  # one rounding of an fp32 sum, as cuBLAS: within one bf16 step of the exact value
        assert ((first.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    for _ in range(2):  # the counters reset: later launches give the same bits
        assert torch.equal(splitk_linear(x, w, split=split, block_n=bn, block_k=bk), first)
    assert int(triton_splitk._workspaces[x.device.index if GPU else -1][1].abs().sum()) == 0


@pytest.mark.skipif(not GPU, reason="the tuned launch shapes need a GPU")
@pytest.mark.parametrize("M", (8, 32, 64))
def test_splitk_tuned_on_model_shapes(M):
    for N, K in ((3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816)):
        x, w = _rand(M, K, dtype=torch.bfloat16, seed=M), _rand(N, K, dtype=torch.bfloat16, seed=N) / K ** 0.5
        ref = F.linear(x, w)
        out = splitk_linear(x, w)
        assert rel_err(out, ref) < 1e-2
        assert torch.equal(splitk_linear(x, w), out)


def test_splitk_declines_what_it_does_not_cover():
    w = _rand(64, 32, dtype=torch.float32, seed=0)
    assert not splitk_supported(_rand(1, 32, dtype=torch.float32, seed=1), w)    # one row: the GEMV
    assert not splitk_supported(_rand(65, 32, dtype=torch.float32, seed=1), w)   # past 64 rows: cuBLAS
    assert not splitk_supported(_rand(4, 32, dtype=torch.bfloat16, seed=1), w)   # mixed dtypes
    assert not splitk_supported(_rand(32, 4, dtype=torch.float32, seed=1).t(), w)  # strided rows
    assert not splitk_supported(_rand(4, 32, dtype=torch.float32, seed=1), w.t().contiguous().t())
    assert splitk_supported(_rand(4, 32, dtype=torch.float32, seed=1), w)
