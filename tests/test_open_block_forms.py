"""The open block's two forms (``state.py``): R (the sum k v^T, updated every token) and tokens (keys
and values in buffers, summed once a block). The Triton decode kernel writes the token form from
``TOKENS_FROM`` sequences on and R below; a stream may move between them at any token (a server's
batch changes), and every other path (prefill, torch and numba decode, state files) reads R after
``settle_``. Each case is checked against the plain reference, token by token, with sequences at
different positions, across block closes and the trained edge."""
import os

import pytest
import torch
from conftest import TOL, rand_qkv, rel_err

from mhla_stream import mhla_attention
from mhla_stream.kernels import triton_available
from mhla_stream.reference import mhla_reference
from mhla_stream.state import MHLAState
from mhla_stream.state_io import StateFileError, StateLayout, validate_state

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V, L, C = 2, 16, 32, 4, 8
STARTS = [11, 8, 16]                  # the prefill leaves the rows mid-block, at a block start, a block later
STEPS = C * (L + 1) + 3               # crosses several closes and the trained edge


def _decode(q, k, v, m, state, forms, policy):
    """Prefill ``STARTS[b]`` tokens of each row (lengths), then one token per row per step, the form of
    step n being ``forms(n)`` (True: tokens); returns the decode outputs [B, STEPS, H, V]."""
    from mhla_stream.kernels.triton_decode import decode_into
    B = q.shape[0]
    T0 = max(STARTS)
    mhla_attention(q[:, :T0], k[:, :T0], v[:, :T0], m, block_size=C, state=state, backend="triton",
                   lengths=torch.tensor(STARTS, device=DEV))
    outs = []
    rows = torch.arange(B, device=DEV)
    for n in range(STEPS):
        at = state.pos.clone()
        o = torch.empty(B, H, V, device=DEV, dtype=q.dtype)
        decode_into(o, q[rows, at], k[rows, at], v[rows, at], m, state, K ** -0.5, tokens=forms(n))
        state.pos += 1
        outs.append(o)
    return torch.stack(outs, 1)


def _expected(q, k, v, m, policy, state_dtype=None):
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy, state_dtype=state_dtype)
    return torch.stack([ref[b, s:s + STEPS] for b, s in enumerate(STARTS)])


FORMS = {"R": lambda n: False, "tokens": lambda n: True, "switching": lambda n: (n * 7 // 5) % 3 == 1,
         "tokens then R": lambda n: n < C + 5}


@pytest.mark.parametrize("forms, dtype, policy", [
    *[(f, torch.float32, "window") for f in FORMS],
    ("switching", torch.bfloat16, "window+far"), ("tokens", torch.bfloat16, "window"),
    ("switching", torch.float32, "window+far")])
def test_each_form_and_switching_between_them_give_the_reference(forms, dtype, policy):
    q, k, v, m = rand_qkv(3, max(STARTS) + STEPS, H, K, V, L, dtype=dtype, seed=4, device=DEV)
    state = MHLAState.empty(3, H, K, V, block_size=C, num_blocks=L, policy=policy, device=DEV)
    out = _decode(q, k, v, m, state, FORMS[forms], policy)
    assert rel_err(out, _expected(q, k, v, m, policy)) < TOL[dtype]
    assert state.pos.tolist() == [s + STEPS for s in STARTS]


def test_a_bf16_ring_rounds_each_summary_once_in_either_form():
    q, k, v, m = rand_qkv(3, max(STARTS) + STEPS, H, K, V, L, seed=5, device=DEV)
    got = {}
    for name in ("R", "switching"):
        state = MHLAState.empty(3, H, K, V, block_size=C, num_blocks=L, policy="window", device=DEV, state_dtype="bf16")
        got[name] = _decode(q, k, v, m, state, FORMS[name], "window")
        assert rel_err(got[name], _expected(q, k, v, m, "window", "bf16")) < TOL[torch.float32]


@pytest.mark.parametrize("then", ["triton", "torch"])
def test_a_prefill_after_token_form_steps_continues_the_stream(then):
    """Prefill (and the torch form) read R: the buffered tokens are folded in first, and the settled
    state equals the one the torch form reaches on its own."""
    q, k, v, m = rand_qkv(3, max(STARTS) + STEPS + 13, H, K, V, L, seed=6, device=DEV)
    state = MHLAState.empty(3, H, K, V, block_size=C, num_blocks=L, policy="window", device=DEV)
    _decode(q, k, v, m, state, FORMS["tokens"], "window")
    assert bool(state.buffered_slots().any())
    t0 = [s + STEPS for s in STARTS]
    piece = [torch.stack([x[b, t:t + 13] for b, t in enumerate(t0)]) for x in (q, k, v)]
    o = mhla_attention(*piece, m, block_size=C, state=state, backend=then)
    ref = mhla_reference(q, k, v, m, block_size=C, policy="window")
    assert rel_err(o, torch.stack([ref[b, t:t + 13] for b, t in enumerate(t0)])) < TOL[torch.float32]
    assert not bool(state.buffered_slots().any())
    # the same stream through the torch form alone
    alone = MHLAState.empty(3, H, K, V, block_size=C, num_blocks=L, policy="window", device=DEV)
    for b, t in enumerate(t0):
        row = alone.select(slice(b, b + 1))
        mhla_attention(q[b:b + 1, :t + 13], k[b:b + 1, :t + 13], v[b:b + 1, :t + 13], m, block_size=C,
                       state=row, backend="torch")
    a, b_ = state.settled(), alone.settled()
    for name in ("ring", "prefix", "partial", "pos"):
        assert rel_err(getattr(a, name).double(), getattr(b_, name).double()) < TOL[torch.float32], name


def test_settle_is_idempotent_and_settled_states_compare_equal():
    q, k, v, m = rand_qkv(3, max(STARTS) + STEPS, H, K, V, L, seed=7, device=DEV)
    s1 = MHLAState.empty(3, H, K, V, block_size=C, num_blocks=L, policy="window", device=DEV)
    s2 = MHLAState.empty(3, H, K, V, block_size=C, num_blocks=L, policy="window", device=DEV)
    _decode(q, k, v, m, s1, FORMS["tokens"], "window")
    _decode(q, k, v, m, s2, FORMS["R"], "window")
    once = s1.clone().settle_()
    twice = once.clone().settle_()
    assert torch.equal(once.partial, twice.partial) and torch.equal(once.partial_end, twice.partial_end)
    a, b = s1.settled(), s2.settled()
    for name in MHLAState.TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (torch.equal(x, y) if not x.is_floating_point() else rel_err(x.double(), y.double()) < 1e-5), name


def test_partial_end_outside_the_position_is_refused():
    st = MHLAState.empty(1, H, K, V, block_size=C, num_blocks=L, policy="window")
    layout = StateLayout.of([st], 256, "f")
    st.pos.fill_(5)
    tensors = {f"layers.0.{n}": getattr(st, n) for n in st.TENSORS}
    tensors["history"] = torch.zeros(0, dtype=torch.int64)
    tensors["logits"] = torch.zeros(256)
    st.partial_end.fill_(5)
    validate_state(layout, tensors, 5)
    for bad in (6, -1):
        st.partial_end[0, 1] = bad
        with pytest.raises(StateFileError, match="partial_end"):
            validate_state(layout, tensors, 5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and DEV == "cpu", reason="interpreter or GPU")
def test_the_token_form_is_the_default_from_tokens_from_sequences():
    from mhla_stream.kernels import triton_decode
    B = triton_decode.TOKENS_FROM
    q, k, v, m = rand_qkv(B, 3, H, K, V, L, seed=8, device=DEV)
    st = MHLAState.empty(B, H, K, V, block_size=C, num_blocks=L, policy="window", device=DEV)
    for t in range(3):
        mhla_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], m, block_size=C, state=st, backend="triton")
    slots = st.buffered_slots()
    assert bool(slots[:, :3].all()) and not bool(slots[:, 3:].any())
    assert not bool(st.partial.any())  # R untouched in the token form
