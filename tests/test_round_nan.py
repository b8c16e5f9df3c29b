"""round_to must keep a NaN a NaN: the GPU's canonical NaN (0x7FFFFFFF, what inf - inf or 0 * inf
give in an MMA or an FMA) must not round to -0.0 in the skinny products' bf16 roundings."""
import pytest
import torch
import triton
import triton.language as tl

from mhla_stream.kernels.triton_common import round_to


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(y_ptr + r, round_to(tl.load(x_ptr + r), tl.bfloat16))


@pytest.mark.parametrize("bits", (0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000))  # -1: 0xFFFFFFFF
def test_round_to_keeps_nan(bits):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.full((16,), bits, dtype=torch.int32, device=dev).view(torch.float32)
    assert torch.isnan(x).all()
    y = torch.empty(16, dtype=torch.bfloat16, device=dev)
    _round_kernel[(1,)](x, y, N=16)
    assert torch.isnan(y).all(), y[:2]
