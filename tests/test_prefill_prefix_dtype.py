"""Triton prefill: 16-bit inputs store the mixed prefixes P in the input dtype (``prefix_dtype``).

The output pass rounds P to the input dtype before its product anyway, so storing P rounded must
give the outputs of the fp32-P path exactly; the reference here is that path (``prefix_dtype``
patched to fp32). Under TRITON_INTERPRET both paths round through ``round_to`` (on the bits for
bf16: the interpreter's fp32 -> bf16 cast truncates) and widen back for the fp32 dots (F32_DOT),
so they agree bit for bit. The state's prefix must stay exact fp32: with a state, the mix kernel
keeps block nc's fp32 prefix apart, and it equals what the fp32-P path copies out of P.

On a GPU the two runs tune their launch configurations separately (P's dtype is part of the
tuning key), and another configuration may move an fp32 sum of the mix kernel by its last bit:
there the outputs may differ by one ulp of their dtype and the prefix by fp32 rounding. The
summaries (and so the ring, far sum and partial) do not depend on P: equal everywhere.
"""
import pytest
import torch
from conftest import TOL, rand_qkv, rel_err

from mhla_stream import POLICIES, mhla_attention
from mhla_stream.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
H, K, V, L, C = 2, 16, 32, 3, 16
T = 5 * C + 9                       # crosses the trained edge (L blocks) within the second call
N0 = (C // 2 + 3, C + 5)            # first call: each sequence stops mid-block, at its own position


def run(q, k, v, m, policy, backend="triton", state_dtype=None):
    """A call without a state; a call from position 0 that returns a state, with lengths; then a
    call from mid-block with other lengths. Returns the outputs (valid rows only) and the state."""
    o0 = mhla_attention(q, k, v, m, block_size=C, backend=backend, policy=policy,
                        lengths=torch.tensor((T, T - C - 5), device=DEV))
    o1, st = mhla_attention(q[:, :max(N0)], k[:, :max(N0)], v[:, :max(N0)], m, block_size=C, return_state=True,
                            backend=backend, policy=policy, lengths=torch.tensor(N0, device=DEV),
                            state_dtype=state_dtype)
    a0, a1 = N0
    n = T - max(N0)
    take = lambda x: torch.stack([x[0, a0:a0 + n], x[1, a1:a1 + n]])  # noqa: E731
    lens = (n, n - C - 2)
    o2 = mhla_attention(take(q), take(k), take(v), m, block_size=C, state=st, backend=backend,
                        lengths=torch.tensor(lens, device=DEV))
    outs = [o0[0], o0[1, :T - C - 5], o1[0, :a0], o1[1, :a1], o2[0, :lens[0]], o2[1, :lens[1]]]
    return outs, st


@pytest.fixture
def fp32_prefix(monkeypatch):
    """The reference path: P stored in fp32 whatever the inputs (the code before this change)."""
    from mhla_stream.kernels import triton_chunk
    monkeypatch.setattr(triton_chunk, "prefix_dtype", lambda dtype: torch.float32)


@pytest.fixture
def seen_p(monkeypatch):
    """Records P's dtype at each state advance."""
    from mhla_stream.kernels import triton_chunk
    seen, advance = [], triton_chunk.advance_state

    def spy(state, S, P, *rest):
        seen.append(P.dtype)
        return advance(state, S, P, *rest)
    monkeypatch.setattr(triton_chunk, "advance_state", spy)
    return seen


def test_prefix_dtype_rule():
    from mhla_stream.kernels.triton_chunk import prefix_dtype
    assert prefix_dtype(torch.bfloat16) == torch.bfloat16 and prefix_dtype(torch.float16) == torch.float16
    assert prefix_dtype(torch.float32) == torch.float32


# the state's ring in fp32 or bf16 (summaries rounded as they complete): P is formed from either
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                               (torch.bfloat16, "bf16")], ids=["bf16", "fp16", "bf16-ring"])
@pytest.mark.parametrize("policy", POLICIES)
def test_16bit_prefix_gives_the_fp32_prefix_outputs_and_state(dtype, state_dtype, policy, seen_p, request):
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=7, device=DEV)
    outs, st = run(q, k, v, m, policy, state_dtype=state_dtype)
    assert seen_p == [dtype, dtype]                     # P really stored in the input dtype
    request.getfixturevalue("fp32_prefix")
    ref_outs, ref_st = run(q, k, v, m, policy, state_dtype=state_dtype)
    assert seen_p[2:] == [torch.float32, torch.float32]
    for o, r in zip(outs, ref_outs):
        assert o.dtype == dtype
        if GPU:  # one ulp (see the module docstring)
            o, r = o.float(), r.float()
            assert bool(((o - r).abs() <= torch.finfo(dtype).eps * r.abs() + torch.finfo(dtype).tiny).all())
        else:
            assert torch.equal(o, r)
    for name in ("ring", "far", "partial", "pos"):
        assert torch.equal(getattr(st, name), getattr(ref_st, name)), name
    assert st.prefix.dtype == torch.float32
    assert rel_err(st.prefix, ref_st.prefix) < 1e-6 if GPU else torch.equal(st.prefix, ref_st.prefix)


@pytest.mark.parametrize("policy", POLICIES)
def test_state_prefix_after_a_bf16_call_is_the_torch_forms(policy):
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=torch.bfloat16, seed=8, device=DEV)
    _, st = run(q, k, v, m, policy)
    _, st_t = run(q, k, v, m, policy, backend="torch")
    assert st.pos.tolist() == st_t.pos.tolist() == [N0[0] + T - max(N0), N0[1] + T - max(N0) - C - 2]
    for name in ("prefix", "partial", "ring", "far"):
        a, b = getattr(st, name), getattr(st_t, name)
        assert a.dtype == b.dtype == torch.float32
        # on a GPU the torch form's bf16 products run on tensor cores in another order: bf16 tolerance
        assert a.numel() == 0 or rel_err(a, b) < TOL[torch.bfloat16 if GPU else torch.float32], name
