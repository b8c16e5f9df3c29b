"""RoPE at any position: angles exact (float64, reduced modulo each period) on every path, so the
model is as translation-invariant far out in a stream as it is near its start.

What translation-invariant means here: attention scores depend on RoPE only through relative
positions, and past the trained blocks (``window`` policy) the mixing depends only on block
distances. So the same tokens fed at two block-aligned offsets past the trained context, each
into an empty state (zero summaries), must give the same logits, whatever the offsets."""
from decimal import Decimal, getcontext

import pytest
import torch

from mhla_stream import StreamingMHLA
from mhla_stream.fused import relu_rope, rope_angles, rope_at, rope_frequencies, rope_tables
from mhla_stream.hub import PACKAGED

OFFSETS = [10 ** 7, 2 ** 24, 10 ** 8, 2 ** 31, 2 ** 40]
PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628620899")


def test_angles_match_exact_arithmetic_up_to_2_pow_40():
    getcontext().prec = 80
    dim, theta = 64, 10000.0
    f = rope_frequencies(dim, theta)
    positions = [0, 1, 63, 1023, *OFFSETS, 2 ** 40 + 12345, 2 ** 40 - 1]
    ang = rope_angles(torch.tensor([positions]), dim, theta)[0]
    worst = 0.0
    for row, p in enumerate(positions):
        for i in range(dim // 2):
            exact = (Decimal(p) * Decimal(float(f[i]))) % (2 * PI)
            got = Decimal(float(ang[row, i])) % (2 * PI)
            d = abs(got - exact)
            worst = max(worst, float(min(d, 2 * PI - d)))
    assert worst < 1e-9


def test_tables_are_the_small_position_tables_shifted():
    """cos/sin at P + t are those at t rotated by P's angle: checked through q.k scores."""
    torch.manual_seed(0)
    H, K, T = 2, 32, 40
    q, k = torch.randn(1, T, H, K), torch.randn(1, T, H, K)

    def scores(offset):
        cos, sin = rope_at(torch.tensor([[offset]]), T, K, 10000.0)
        return torch.einsum("bthd,bshd->bhts", relu_rope(q, cos, sin).double(), relu_rope(k, cos, sin).double())

    base = scores(0)
    for offset in OFFSETS:
        assert (scores(offset) - base).abs().max() < 1e-4, offset


def test_fp32_angles_would_fail_this_test():
    """The guard is real: fp32 ``pos * freq`` (the old code) is far off at these offsets."""
    p = torch.tensor([[10 ** 8 + 7]])
    old = p.float()[..., None] * rope_frequencies(64, 10000.0).float()
    new = rope_angles(p, 64, 10000.0)
    assert ((old.double() - new + torch.pi) % (2 * torch.pi) - torch.pi).abs().max() > 0.1


def test_rope_tables_shape_and_dtype():
    cos, sin = rope_tables(torch.tensor([[0, 5, 2 ** 40]]), 16, 10000.0)
    assert cos.shape == (1, 3, 1, 8) and cos.dtype == torch.float32 and sin.dtype == torch.float32


@pytest.fixture(scope="module")
def shipped():
    return StreamingMHLA.from_pretrained(PACKAGED / "mhla-stories-17m", backend="auto")


def logits_at(s, ids, offset, one_by_one=False):
    """Logits of ``ids`` fed into an empty state whose position is ``offset``."""
    s.reset()
    for st in s.cache.states:
        st.pos.fill_(offset)
    if one_by_one:  # the decode path (numba on the CPU; fused kernels / CUDA graphs on a GPU)
        out = []
        for t in ids:
            s.feed([t])
            out.append(s._logits.clone())
        return torch.stack(out)
    out = s.model(input_ids=torch.tensor([ids]), past_key_values=s.cache, use_cache=True).logits[0]
    return out.float()


@torch.inference_mode()
def test_shipped_model_gives_the_same_logits_far_out(shipped):
    c = shipped.model.config
    base = 4 * c.trained_context  # block aligned and past the trained blocks
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, c.vocab_size, (160,), generator=g).tolist()  # crosses two block boundaries
    ref = logits_at(shipped, ids, base)
    for offset in (10 ** 7, 2 ** 31 + 2 ** 20, 2 ** 40):  # fp32 angles were off by up to 3.6 logits here
        aligned = offset - offset % c.block_size
        diff = (logits_at(shipped, ids, aligned) - ref).abs().max().item()
        assert diff < 2e-3, (offset, diff)
    greedy = ref.argmax(-1)
    assert torch.equal(logits_at(shipped, ids, 2 ** 40).argmax(-1), greedy)


@torch.inference_mode()
def test_decode_path_is_exact_far_out_too(shipped):
    c = shipped.model.config
    ids = torch.randint(3, c.vocab_size, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = logits_at(shipped, ids, 4 * c.trained_context, one_by_one=True)
    far = logits_at(shipped, ids, 2 ** 40, one_by_one=True)
    assert (far - ref).abs().max().item() < 2e-3
    prefill = logits_at(shipped, ids, 2 ** 40)
    assert (prefill - far).abs().max().item() < 2e-3
