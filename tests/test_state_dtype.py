"""State storage (``state_dtype``): a ring of completed block summaries in bf16.

The rule every form follows: a completed summary is rounded to bf16 when it completes, and every
later use (mixed prefixes, far sum) reads the rounded value. So each form is checked tightly
against the definition under that rule (``mhla_reference(..., state_dtype="bf16")``), and
loosely against the plain fp32 definition (the measured cost of the option).

TOL_RING: a summary whose fp32 value lies within fp32 noise of a bf16 rounding boundary may
round the other way in another summation order (one bf16 ulp in one element); that moves the
output by up to ~2e-5 relative at these shapes, still 10x below the effect of the rounding itself.
"""
import random

import pytest
import torch
from conftest import TOL, rand_qkv, rel_err

from mhla_stream import POLICIES, MHLAState, mhla_attention, mhla_reference

TOL_RING = 5e-5
TOL_VS_FP32 = 3e-3  # bf16 ring against the fp32 definition (observed 3e-4 .. 6e-4 here)
C, L = 16, 4        # 4 trained blocks of 16: the trained edge is at 64 tokens
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"  # the Triton tests: natively on a GPU, else under TRITON_INTERPRET


def same_stored_values(a, b):
    """Two bf16 rings hold the same summaries: equal, except where a sum near a rounding boundary
    went the other way in another summation order (one bf16 ulp, in under 1% of the elements; the
    absolute term covers sums near 0, where fp32 noise of the whole sum is larger than one ulp)."""
    a, b = a.float(), b.float()
    assert a.shape == b.shape
    assert bool(((a - b).abs() <= b.abs() * 2 ** -7 + 1e-5 * b.abs().max()).all())
    assert float((a != b).float().mean()) < 0.01


def calls(q, k, v, m, cuts, backend, policy, state_dtype="bf16", lengths=None):
    state, outs, t = None, [], 0
    for n in cuts:
        o, state = mhla_attention(q[:, t:t + n], k[:, t:t + n], v[:, t:t + n], m, block_size=C, state=state,
                                  return_state=True, backend=backend, policy=policy, state_dtype=state_dtype)
        outs.append(o)
        t += n
    assert t == q.shape[1]
    return torch.cat(outs, 1), state


def cut_patterns(T, seed):
    rng = random.Random(seed)
    random_cuts = []
    while sum(random_cuts) < T:
        random_cuts.append(min(rng.choice([1, 2, C - 1, C, C + 1, 3 * C + 5, 37]), T - sum(random_cuts)))
    head = min(C // 2 + 3, T)                     # mid-block, then one token at a time through block closes
    ones = max(min(T, 90) - head, 0)
    tail = [T - head - ones] if T > head + ones else []
    return [[T], random_cuts, [head] + [1] * ones + tail]


# -- the state object --------------------------------------------------------------------------
@pytest.mark.parametrize("given,want", [(None, torch.float32), ("fp32", torch.float32), ("float32", torch.float32),
                                        (torch.float32, torch.float32), ("bf16", torch.bfloat16),
                                        ("bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_state_dtype_names(given, want):
    st = MHLAState.empty(2, 2, 4, 4, num_blocks=3, policy="window+far", state_dtype=given)
    assert st.state_dtype == st.ring.dtype == want
    assert all(getattr(st, n).dtype == torch.float32 for n in ("far", "prefix", "partial"))


@pytest.mark.parametrize("bad", ["fp16", "float16", torch.float16, torch.float64, "BF16", "bf 16", "", 16, 1.5,
                                 "torch.bfloat16", ["bf16"], "x" * 500])
def test_bad_state_dtype_is_one_clear_line(bad):
    with pytest.raises(ValueError, match="state_dtype must be torch.float32 or torch.bfloat16") as e:
        MHLAState.empty(1, 1, 4, 4, num_blocks=3, policy="window", state_dtype=bad)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_nbytes_and_whole_state_operations_keep_the_ring_dtype():
    # the mhla-340m layer shape: the ring is 31 of the 34 (window+far) K x V tensors
    fp32 = MHLAState.empty(1, 4, 128, 256, num_blocks=32, policy="window+far")
    bf16 = MHLAState.empty(1, 4, 128, 256, num_blocks=32, policy="window+far", state_dtype="bf16")
    kv = 4 * 128 * 256
    rest = 4 * 64 * (128 + 256) * 4 + 3 * 8  # the open buffers (fp32), pos and partial_end
    assert fp32.nbytes == rest + kv * (31 + 3) * 4 and bf16.nbytes == rest + kv * (31 * 2 + 3 * 4)
    st = MHLAState.empty(3, 2, 4, 4, num_blocks=3, policy="window+far", state_dtype="bf16")
    st.ring.normal_()
    for other in (st.clone(), st.to("cpu"), st.select(slice(1, 3))):
        assert other.state_dtype == torch.bfloat16 and other.far.dtype == torch.float32
    assert torch.equal(st.clone().ring, st.ring)
    target = MHLAState.empty(3, 2, 4, 4, num_blocks=3, policy="window+far")
    with pytest.raises(ValueError, match="ring is bfloat16 into one whose ring is float32"):
        target.copy_(st)
    assert not target.ring.any() and target.state_dtype == torch.float32  # nothing was copied
    same = MHLAState.empty(3, 2, 4, 4, num_blocks=3, policy="window+far", state_dtype="bf16")
    assert torch.equal(same.copy_(st).ring, st.ring)


def test_attention_state_dtype_argument_is_checked():
    q, k, v, m = rand_qkv(1, 5, 1, 4, 4, L)
    _, st = mhla_attention(q, k, v, m, block_size=C, return_state=True, state_dtype="bf16")
    with pytest.raises(ValueError, match="state_dtype float32 differs from the state's bfloat16"):
        mhla_attention(q, k, v, m, block_size=C, state=st, state_dtype="fp32")
    with pytest.raises(ValueError, match="state_dtype must be"):
        mhla_attention(q, k, v, m, block_size=C, state_dtype="fp16")
    assert st.pos.tolist() == [5]


# -- every form against the definition under the rounding rule -----------------------------------
@pytest.mark.parametrize("T", (1, 63, 64, 65, 1000))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", ("torch", "numba"))
def test_cpu_forms_follow_the_rounding_rule_for_any_cutting(T, policy, backend):
    q, k, v, m = rand_qkv(2, T, 2, 16, 8, L, seed=T)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy, state_dtype="bf16")
    ref32 = mhla_reference(q, k, v, m, block_size=C, policy=policy)
    for cuts in cut_patterns(T, T):
        out, state = calls(q, k, v, m, cuts, backend, policy)
        assert state.state_dtype == torch.bfloat16 and state.pos.tolist() == [T, T]
        err = rel_err(out, ref)
        assert err < TOL_RING, cuts
        assert rel_err(out, ref32) < TOL_VS_FP32
        if T > C:  # the rounding did happen: the fp32 definition is much further away
            assert rel_err(out, ref32) > 10 * err


def test_states_agree_whatever_the_cutting():
    """The stored ring is the same bf16 values (to one ulp flip) however the calls were cut."""
    q, k, v, m = rand_qkv(1, 300, 2, 16, 8, L, seed=3)
    _, whole = calls(q, k, v, m, [300], "torch", "window+far")
    for cuts in cut_patterns(300, 1)[1:]:
        _, st = calls(q, k, v, m, cuts, "torch", "window+far")
        same_stored_values(st.ring, whole.ring)
        assert rel_err(st.far, whole.far) < 1e-5 and rel_err(st.prefix, whole.prefix) < 1e-5


def test_batch_with_different_lengths_and_positions():
    q, k, v, m = rand_qkv(2, 90, 2, 8, 8, L, seed=4)
    ref = mhla_reference(q, k, v, m, block_size=C, state_dtype="bf16")
    o1, st = mhla_attention(q[:, :50], k[:, :50], v[:, :50], m, block_size=C, return_state=True, backend="torch",
                            lengths=torch.tensor([37, 50]), state_dtype="bf16")
    assert rel_err(o1[0, :37], ref[0, :37]) < TOL_RING and rel_err(o1[1], ref[1, :50]) < TOL_RING
    take = lambda x: torch.stack([x[0, 37:77], x[1, 50:90]])  # noqa: E731
    o2 = mhla_attention(take(q), take(k), take(v), m, block_size=C, state=st, backend="torch")
    assert rel_err(o2[0], ref[0, 37:77]) < TOL_RING and rel_err(o2[1], ref[1, 50:90]) < TOL_RING


def test_low_precision_inputs_with_a_bf16_ring():
    q, k, v, m = rand_qkv(2, 150, 2, 16, 8, L, dtype=torch.bfloat16, seed=3)
    ref = mhla_reference(q, k, v, m, block_size=C, state_dtype="bf16")
    out, state = calls(q, k, v, m, [40, 1, 1, 60, 48], "torch", "window")
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < TOL[torch.bfloat16]
    assert state.far.dtype == state.prefix.dtype == state.partial.dtype == torch.float32


@pytest.mark.parametrize("policy", POLICIES)
def test_triton_prefill_and_decode_follow_the_rounding_rule(policy):
    """Triton (under TRITON_INTERPRET on a CPU): starts mid-block, crosses the trained edge, decodes
    through block closes; the state equals the torch form's."""
    H, K, V = 2, 16, 32
    T = C * (L + 5) + 7
    q, k, v, m = rand_qkv(2, T, H, K, V, L, seed=1, device=DEV)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy, state_dtype="bf16")
    cuts = [C // 2 + 3, 1, C * 2, 5, 1, C - 1]
    cuts.append(T - sum(cuts) - C - 3)
    cuts += [1] * (C + 3)
    out, state = calls(q, k, v, m, cuts, "triton", policy)
    assert rel_err(out, ref) < TOL_RING
    assert rel_err(out, mhla_reference(q, k, v, m, block_size=C, policy=policy)) > 10 * rel_err(out, ref)
    _, state_t = calls(q, k, v, m, cuts, "torch", policy)
    state, state_t = state.settled(), state_t.settled()  # the decode kernel keeps its open block as tokens
    assert state.state_dtype == torch.bfloat16
    same_stored_values(state.ring.cpu(), state_t.ring.cpu())
    for name in ("far", "prefix", "partial"):
        a, b = getattr(state, name), getattr(state_t, name)
        assert a.numel() == 0 or rel_err(a, b) < TOL[torch.float32]
    # one stateless-start call with lengths: the prefill's own summaries are rounded too
    o1, st = mhla_attention(q, k, v, m, block_size=C, return_state=True, backend="triton", policy=policy,
                            state_dtype="bf16", lengths=torch.tensor([T, T - 20], device=DEV))
    assert rel_err(o1[0], ref[0]) < TOL_RING and rel_err(o1[1, :T - 20], ref[1, :T - 20]) < TOL_RING
    assert st.pos.tolist() == [T, T - 20]


def test_fused_decode_with_a_bf16_ring_gives_the_unfused_logits():
    """The model's fused decode (relu + RoPE and the block close inside the Triton decode kernel)
    against the unfused path, both with bf16 rings, through block closes and the trained edge."""
    from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny", mixing_policy="window+far")).to(DEV).eval()
    unfused = model.make_plan(1, backend="triton", fused_decode=False, batched_decode=False, state_dtype="bf16")
    fused = model.make_plan(1, backend="triton", fused_decode=True, state_dtype="bf16")
    ids = torch.randint(3, 256, (1, 34), device=DEV)
    with torch.inference_mode():
        caches = [MHLACache(model.new_state(1, state_dtype="bf16")) for _ in range(2)]
        for cache, plan in zip(caches, (unfused, fused)):
            model(ids[:, :13], past_key_values=cache, plan=plan)
        for t in range(13, 34):  # C = 8, L = 4: closes at 16, 24, 32 (the trained edge: block 0 goes far)
            a = model(ids[:, t:t + 1], past_key_values=caches[0], plan=unfused).logits
            b = model(ids[:, t:t + 1], past_key_values=caches[1], plan=fused).logits
            assert rel_err(b, a) < TOL_RING, t  # (the fp32-ring test holds 1e-5: here add one ulp flips)
    for s_ref, s_fused in zip(caches[0].states, caches[1].states):
        assert s_fused.ring.dtype == torch.bfloat16 and torch.equal(s_ref.pos, s_fused.pos)
        same_stored_values(s_fused.ring, s_ref.ring)
