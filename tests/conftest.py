import os

import pytest
import torch

SHARED = os.environ.get("MHLA_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


def rand_qkv(B, T, H, K, V, L, *, dtype=torch.float32, seed=0, device="cpu"):
    """Non-negative q, k (as after relu) and signed v; a raw mixing matrix with entries outside [1e-5, 1]
    so the clamp is exercised."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, H, K, generator=g)
    k = torch.rand(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    m = torch.rand(L, L, generator=g) * 1.2 - 0.1
    return (*(x.to(device=device, dtype=dtype) for x in (q, k, v)), m.to(device))


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED
