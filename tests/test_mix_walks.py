"""The chunk prefill's mix pass has two walks over the in-call sources: the unrolled one of long calls
and the short one (``SHORT_SIZE``) of calls of a few blocks, the server's prompts and pieces. Every
case runs under both, against the definition, so neither is tested only by the shapes that happen to
choose it. Also: the pass never reads a ring slot that holds no block (a fresh or young state)."""
import pytest
import torch
from conftest import TOL, calls, rand_qkv, rel_err

from mhla_stream import POLICIES, mhla_attention, mhla_reference
from mhla_stream.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (TRITON_INTERPRET=1 on a CPU)")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
SHAPE = (4, 128, 256, 32) if GPU else (2, 16, 32, 3)   # (H, K, V, L)
C = 64 if GPU else 16
WALKS = {"short": 1 << 30, "unrolled": 0}


@pytest.fixture(params=sorted(WALKS))
def walk(request, monkeypatch):
    from mhla_stream.kernels import triton_chunk
    monkeypatch.setattr(triton_chunk, "SHORT_SIZE", WALKS[request.param])
    return request.param


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("policy", POLICIES)
def test_walks_match_definition(walk, dtype, policy):
    """Stateless (1 token, one block less one, L + 4 blocks), then prefills carried across calls:
    from mid-block, across the trained edge, a one-block call and a long one."""
    H, K, V, L = SHAPE
    for T in (1, C - 1, C * (L + 4) + 5):
        q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=T, device=DEV)
        ref = mhla_reference(q, k, v, m, block_size=C, policy=policy)
        out = mhla_attention(q, k, v, m, block_size=C, backend="triton", policy=policy)
        assert rel_err(out, ref) < TOL[dtype], T
    T = C * (L + 6) + 7
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=5, device=DEV)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy)
    cuts = [C // 2 + 3, C, 2 * C + 1, 1, C * (L + 2)]
    cuts.append(T - sum(cuts))
    out, _ = calls(q, k, v, m, cuts, "triton", C, policy)
    assert rel_err(out, ref) < TOL[dtype]


def test_walks_different_lengths(walk):
    H, K, V, L = SHAPE
    q, k, v, m = rand_qkv(2, 3 * C + 20, H, K, V, L, seed=2, device=DEV)
    ref = mhla_reference(q, k, v, m, block_size=C)
    n = torch.tensor([C // 2 + 1, 3 * C + 20], device=DEV)
    out = mhla_attention(q, k, v, m, block_size=C, backend="triton", lengths=n)
    assert rel_err(out[0, :C // 2 + 1], ref[0, :C // 2 + 1]) < TOL[torch.float32]
    assert rel_err(out[1], ref[1]) < TOL[torch.float32]


@pytest.mark.parametrize("done", (0, 1))
def test_empty_ring_slots_are_not_read(walk, done):
    """NaN in the slots of blocks before the sequence's start changes nothing: after ``done`` completed
    blocks (0: a fresh state, as each admitted prompt is) the prefill reads only the filled slots."""
    H, K, V, L = SHAPE
    W = L - 1
    assert done < W
    T = done * C + C // 2 + 4 * C
    q, k, v, m = rand_qkv(1, T, H, K, V, L, seed=9, device=DEV)
    head = done * C + C // 2
    outs = []
    for poison in (False, True):
        _, state = calls(q, k, v, m, [head], "triton", C, None)
        if poison:
            state.ring[:, :, done:].fill_(float("nan"))   # block j lives in slot j % W: slots >= done are empty
        out, state = calls(q[:, head:], k[:, head:], v[:, head:], m, [T - head], "triton", C, None, state)
        outs.append((out, state.ring[:, :, :done + 4].clone()))
    assert torch.isfinite(outs[1][0]).all()
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def _ragged_calls(seqs, m, plan, policy, state_dtype):
    """Calls on a batch whose rows take ``plan``'s own token counts (``lengths=``); before each call
    the ring slots that hold no block yet are filled with NaN. Outputs per row."""
    B, (_, H, K), V = len(seqs), seqs[0][0].shape, seqs[0][2].shape[-1]
    pos, outs, state = [0] * B, [[] for _ in range(B)], None
    for ns in plan:
        T = max(ns)
        q, k, v = (torch.zeros(B, T, H, d, device=DEV) for d in (K, K, V))
        for b, (x, n) in enumerate(zip(seqs, ns)):
            for dst, src in zip((q, k, v), x):
                dst[b, :n] = src[pos[b]:pos[b] + n]
        if state is not None:
            for b in range(B):
                state.ring[b, :, pos[b] // C:].fill_(float("nan"))   # empty slots (none once pos // C >= W)
        o, state = mhla_attention(q, k, v, m, block_size=C, state=state, return_state=True, backend="triton",
                                  policy=policy, state_dtype=state_dtype, lengths=torch.tensor(ns, device=DEV))
        for b, n in enumerate(ns):
            outs[b].append(o[b, :n])
            pos[b] += n
    return [torch.cat(x) for x in outs]


@pytest.mark.parametrize("policy, variant, state_dtype", [("window+far", "lean", torch.bfloat16),
                                                          ("window", "base", torch.float32)])
def test_walks_rows_at_different_positions(walk, policy, variant, state_dtype, monkeypatch):
    """One batch whose rows carry states at different places (fresh, young i0 < W, i0 == W mid-block,
    past the trained edge) and take calls of their own lengths: 0 tokens, one token that completes a
    block (r0 = C - 1), a few that complete none, several blocks. The per-row choices of the pass
    (ring read only when i0 > 0 and only filled slots; no coefficient for targets past a row's nc)
    must not leak between rows; empty slots hold NaN."""
    from mhla_stream.kernels import triton_chunk
    monkeypatch.setattr(triton_chunk, "_variant", variant)
    H, K, V, L = SHAPE
    W = L - 1
    plan = [[0, 2 * C - 1, W * C + 3, (L + 2) * C + 5],
            [1, 1, C + 2, 2 * C],
            [2 * C + 2, C // 2, 1, C - 1]]
    g = torch.Generator().manual_seed(11)
    seqs = [(torch.rand(n, H, K, generator=g), torch.rand(n, H, K, generator=g), torch.randn(n, H, V, generator=g))
            for n in (sum(col) for col in zip(*plan))]
    seqs = [tuple(x.to(DEV) for x in s) for s in seqs]
    m = (torch.rand(L, L, generator=g) * 1.2 - 0.1).to(DEV)
    outs = _ragged_calls(seqs, m, plan, policy, state_dtype)
    for b, (q, k, v) in enumerate(seqs):
        ref = mhla_reference(q[None], k[None], v[None], m, block_size=C, policy=policy, state_dtype=state_dtype)
        assert rel_err(outs[b][None], ref) < TOL[torch.float32], b


def test_sequence_table_takes_any_integer_lengths_and_no_state():
    """The one-launch [B, 3] table (offset in the first block, first block, tokens) from int32 or int64
    lengths, with or without a state: the same outputs; a row of length 0 writes no output."""
    H, K, V, L = SHAPE
    q, k, v, m = rand_qkv(3, 2 * C + 3, H, K, V, L, seed=4, device=DEV)
    outs = [mhla_attention(q, k, v, m, block_size=C, backend="triton",
                           lengths=torch.tensor([2 * C + 3, 0, C + 1], dtype=dt, device=DEV))
            for dt in (torch.int64, torch.int32)]
    assert torch.equal(outs[0], outs[1])
    assert not outs[0][1].any() and not outs[0][2, C + 1:].any()
    ref = mhla_reference(q[2:, :C + 1], k[2:, :C + 1], v[2:, :C + 1], m, block_size=C)
    assert rel_err(outs[0][2:, :C + 1], ref) < TOL[torch.float32]
    from mhla_stream.kernels.triton_chunk import sequence_table
    pos = torch.tensor([0, C - 1, 5 * C + 2], device=DEV)
    table = sequence_table(pos, torch.tensor([3, 1, 0], dtype=torch.int32), 3, 7, C, torch.device(DEV))
    assert table.dtype == torch.int32
    assert table.tolist() == [[0, 0, 3], [C - 1, 0, 1], [2, 5, 0]]
    assert sequence_table(None, None, 2, 7, C, torch.device(DEV)).tolist() == [[0, 0, 7], [0, 0, 7]]


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32))
def test_sequence_table_reads_strided_lengths(dtype):
    """``lengths`` a strided [B] view (a column of a [B, 2] table): the table kernel reads element b at
    offset b, so the launcher makes it dense; the outputs are those of the same lengths given dense."""
    H, K, V, L = SHAPE
    q, k, v, m = rand_qkv(3, 2 * C + 3, H, K, V, L, seed=6, device=DEV)
    table = torch.tensor([[2 * C + 3, 1], [0, 1], [C + 1, 1]], dtype=dtype, device=DEV)
    assert not table[:, 0].is_contiguous()
    strided = mhla_attention(q, k, v, m, block_size=C, backend="triton", lengths=table[:, 0])
    dense = mhla_attention(q, k, v, m, block_size=C, backend="triton", lengths=table[:, 0].contiguous())
    assert torch.equal(strided, dense)


def test_each_walk_takes_its_own_tiles_at_one_size(monkeypatch):
    """The same call (same autotune SIZE) under both walks: the short walk runs the short tiles (BI =
    SHORT_BI), the unrolled one its layout's; a walk must not reuse the tile the other cached (the
    autotuner's cache is looked up before the prune, so SHORT is in its key)."""
    from mhla_stream.kernels import triton_chunk
    H, K, V, L = SHAPE
    q, k, v, m = rand_qkv(1, 3 * C, H, K, V, L, seed=7, device=DEV)
    tiles = {}
    for walk in ("short", "unrolled", "short"):
        monkeypatch.setattr(triton_chunk, "SHORT_SIZE", WALKS[walk])
        mhla_attention(q, k, v, m, block_size=C, backend="triton")
        tiles.setdefault(walk, set()).add(triton_chunk._mix_kernel.best_config.kwargs["BI"])
    assert tiles["short"] == {triton_chunk.SHORT_BI}
    assert triton_chunk.SHORT_BI not in tiles["unrolled"]


def test_prefill_into_a_strided_state_equals_the_torch_backend():
    """A state that is every other row of a larger one (``select`` with a step): the Triton prefill
    advances those rows (positions, ring, prefixes), not the first ones, and reads their own prefixes;
    states and outputs as the torch backend's, the rows between untouched."""
    from mhla_stream import MHLAState
    H, K, V, L = SHAPE
    q, k, v, m = rand_qkv(2, 3 * C + 1, H, K, V, L, seed=8, device=DEV)
    got = {}
    for backend in ("torch", "triton"):
        big = MHLAState.empty(4, H, K, V, block_size=C, num_blocks=L, policy="window+far", device=DEV)
        rows = big.select(slice(0, 4, 2))
        outs = [mhla_attention(q[:, a:b], k[:, a:b], v[:, a:b], m, block_size=C, state=rows, backend=backend)
                for a, b in ((0, C + 3), (C + 3, 3 * C + 1))]
        got[backend] = (torch.cat(outs, 1), big)
    (o_ref, s_ref), (o, s) = got["torch"], got["triton"]
    assert rel_err(o, o_ref) < TOL[torch.float32]
    assert s.pos.tolist() == s_ref.pos.tolist() == [3 * C + 1, 0, 3 * C + 1, 0]
    for n in MHLAState.TENSORS:
        torch.testing.assert_close(getattr(s, n), getattr(s_ref, n), rtol=1e-4, atol=1e-4)
