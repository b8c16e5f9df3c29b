"""Every torch form of the operator against the definition (the oracle)."""
import random

import pytest
import torch
from conftest import TOL, rand_qkv, rel_err

from mhla_stream import POLICIES, MHLAState, extend_mixing, mhla_attention, mhla_reference

CASES = [(T, C) for T in (1, 63, 64, 65, 200, 1000) for C in (16, 64)]


def run_in_calls(q, k, v, m, cuts, **kw):
    """Feed the sequence through ``mhla_attention`` in calls of the given sizes, carrying state."""
    state, outs, t = None, [], 0
    for n in cuts:
        o, state = mhla_attention(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], m, state=state, return_state=True, **kw)
        outs.append(o)
        t += n
    assert t == q.shape[1]
    return torch.cat(outs, 1), state


def random_cuts(T, C, rng):
    cuts = []
    while sum(cuts) < T:
        cuts.append(min(rng.choice([1, 2, C - 1, C, C + 1, 3 * C + 5, 37]), T - sum(cuts)))
    return cuts


@pytest.mark.parametrize("T,C", CASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_form_matches_definition(T, C, policy):
    L = 8 if C == 16 else 32  # C=16 crosses the trained edge at T > 128
    q, k, v, m = rand_qkv(2, T, 2, 16, 8, L, seed=T + C)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy)
    out = mhla_attention(q, k, v, m, block_size=C, policy=policy, backend="torch")
    assert out.dtype == torch.float32 and out.shape == (2, T, 2, 8)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("T,C", [c for c in CASES if c[0] <= 200])
@pytest.mark.parametrize("policy", POLICIES)
def test_any_cutting_matches_definition(T, C, policy):
    rng = random.Random(T * 7 + C)
    q, k, v, m = rand_qkv(2, T, 2, 16, 8, 4, seed=T)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy)
    kw = dict(block_size=C, policy=policy, backend="torch")
    for cuts in (random_cuts(T, C, rng), random_cuts(T, C, rng), [1] * T, [C // 2] * (T // (C // 2)) + [T % (C // 2)]):
        cuts = [c for c in cuts if c]
        out, state = run_in_calls(q, k, v, m, cuts, **kw)
        assert rel_err(out, ref) < TOL[torch.float32], cuts
        assert state.pos.tolist() == [T, T]


def test_long_stream_across_trained_edge_one_token_at_a_time():
    # L = 3 blocks of 4: 200 tokens is 50 blocks, far past the trained edge, in both policies.
    for policy in POLICIES:
        q, k, v, m = rand_qkv(1, 200, 1, 4, 3, 3, seed=5)
        ref = mhla_reference(q, k, v, m, block_size=4, policy=policy)
        out, _ = run_in_calls(q, k, v, m, [1] * 200, block_size=4, policy=policy, backend="torch")
        assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    q, k, v, m = rand_qkv(2, 150, 2, 16, 8, 4, dtype=dtype, seed=3)
    ref = mhla_reference(q, k, v, m, block_size=16)
    out = mhla_attention(q, k, v, m, block_size=16, backend="torch")
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    out2, state = run_in_calls(q, k, v, m, [40, 1, 1, 60, 48], block_size=16, backend="torch")
    assert rel_err(out2, ref) < TOL[dtype]
    assert all(getattr(state, n).dtype == torch.float32 for n in ("ring", "far", "prefix", "partial"))


def test_state_after_long_prompt_is_what_decoding_needs():
    """The reference code's chunk path returns no state, so a prompt > 64 tokens is forgotten.
    Here a 130-token prompt, then 40 decoded tokens, equal one full pass."""
    q, k, v, m = rand_qkv(2, 170, 2, 16, 8, 32, seed=11)
    ref = mhla_reference(q, k, v, m)
    out, state = run_in_calls(q, k, v, m, [130] + [1] * 40, backend="torch")
    assert rel_err(out[:, 130:], ref[:, 130:]) < TOL[torch.float32]
    # The state holds the two completed blocks and the partial third one.
    assert state.pos.tolist() == [170, 170]
    s0 = torch.einsum("bthk,bthv->bhkv", k[:, :64], v[:, :64])
    assert torch.allclose(state.ring[:, :, 0], s0, rtol=1e-5, atol=1e-4)


def test_decode_uses_the_right_coefficients_from_the_second_block_on():
    """The reference decode path pairs coefficients with the wrong block; compare one-token decode
    against the definition with a strongly non-uniform mixing matrix."""
    L = 6
    m = torch.tril(torch.rand(L, L)) * torch.linspace(0.1, 1, L)[None]
    q, k, v, _ = rand_qkv(1, 4 * L, 1, 4, 4, L, seed=2)
    ref = mhla_reference(q, k, v, m, block_size=4)
    out, _ = run_in_calls(q, k, v, m, [1] * (4 * L), block_size=4, backend="torch")
    assert rel_err(out, ref) < TOL[torch.float32]


def test_batch_with_different_lengths_and_positions():
    q, k, v, m = rand_qkv(2, 90, 2, 8, 8, 4, seed=4)
    C, kw = 16, dict(block_size=16, backend="torch")
    ref = mhla_reference(q, k, v, m, block_size=C)
    # First call: sequence 0 takes 37 tokens, sequence 1 takes 50 (right-padded).
    o1, state = mhla_attention(q[:, :50], k[:, :50], v[:, :50], m, state=None, return_state=True,
                               lengths=torch.tensor([37, 50]), **kw)
    assert state.pos.tolist() == [37, 50]
    assert rel_err(o1[0, :37], ref[0, :37]) < 1e-5 and rel_err(o1[1], ref[1, :50]) < 1e-5
    # Second call: each continues from its own position.
    qa = torch.stack([q[0, 37:77], q[1, 50:90]])
    ka = torch.stack([k[0, 37:77], k[1, 50:90]])
    va = torch.stack([v[0, 37:77], v[1, 50:90]])
    o2 = mhla_attention(qa, ka, va, m, state=state, **kw)
    assert rel_err(o2[0], ref[0, 37:77]) < 1e-5 and rel_err(o2[1], ref[1, 50:90]) < 1e-5
    # One token each, at positions 77 and 90 (different blocks, different offsets).
    o3 = mhla_attention(q[:, 77:78], k[:, 77:78], v[:, 77:78], m, state=state, **kw)
    assert rel_err(o3[0, 0], ref[0, 77]) < 1e-5


def test_extended_matrix_is_exact_inside_trained_blocks():
    m = torch.rand(5, 5) * 2 - 0.5
    prepared = m.clamp(1e-5, 1).tril()
    for policy in POLICIES:
        ext = extend_mixing(m, 12, policy)
        assert torch.equal(ext[:5, :5], prepared)
        assert torch.equal(ext[7, 3:8], prepared[4, :5])  # window: last trained row by distance
        assert float(ext[7, 0]) == pytest.approx(0.0 if policy == "window" else float(prepared[4, 0]) / 3)


def test_state_memory_is_bounded():
    st = MHLAState.empty(1, 4, 128, 256, num_blocks=32, policy="window+far")
    # ring, far, prefix, partial; the open buffers (64 slots of keys and values); pos and partial_end
    assert st.nbytes == 4 * (31 + 3) * 128 * 256 * 4 + 4 * 64 * (128 + 256) * 4 + 3 * 8
    q, k, v, m = rand_qkv(1, 64 * 40, 1, 4, 4, 3, seed=0)
    _, state = run_in_calls(q, k, v, m, [64 * 40], backend="torch")
    assert state.nbytes == MHLAState.empty(1, 1, 4, 4, num_blocks=3, policy=state.policy).nbytes
