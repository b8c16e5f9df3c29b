"""Triton and numba kernels against the definition. On a CPU the Triton kernels run under
TRITON_INTERPRET=1 at small shapes; with CUDA the same sweep runs on the GPU at full shapes."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, calls, rand_qkv, rel_err

from mhla_stream import POLICIES, mhla_attention, mhla_reference

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# (H, K, V, L): small under the interpreter, the 340M layout on a GPU
SHAPE = (4, 128, 256, 32) if GPU else (2, 16, 32, 3)
C_SMALL = 64 if GPU else 16
TS = (1, 63, 64, 65, 300) if not GPU else (1, 63, 64, 65, 300, 2100, 5000)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_triton_prefill_stateless(T, dtype, policy):
    H, K, V, L = SHAPE
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=T, device=DEV)
    # the float64 oracle at T = 5000 on the CPU: on an H100 shared with other test processes its
    # [2, 4, 5000, 5000] float64 products came back with zero rows (twice), while the kernel agreed
    # with it run alone (.ci/results/2026-11-23-h100/session4)
    big = T > 4096
    ref = mhla_reference(*(x.cpu() if big else x for x in (q, k, v, m)), block_size=C_SMALL, policy=policy).to(DEV)
    out = mhla_attention(q, k, v, m, block_size=C_SMALL, backend="triton", policy=policy)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_triton_prefill_then_decode_with_state(dtype, policy):
    """Starts mid-block, crosses the trained edge (L blocks), decodes through block boundaries."""
    H, K, V, L = SHAPE
    C = C_SMALL
    T = C * (L + 6) + 7
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=1, device=DEV)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy)
    cuts = [C // 2 + 3, 1, C * 2, 5, 1, 1, C - 1]
    cuts.append(T - sum(cuts) - 2 * C - 3)
    cuts += [1] * (2 * C + 3)
    out, state = calls(q, k, v, m, cuts, "triton", C, policy)
    assert rel_err(out, ref) < TOL[dtype]
    out_t, state_t = calls(q, k, v, m, cuts, "torch", C, policy)
    state, state_t = state.settled(), state_t.settled()  # the decode kernel keeps its open block as tokens
    for name in ("ring", "far", "prefix", "partial"):
        assert rel_err(getattr(state, name), getattr(state_t, name)) < TOL[dtype] or getattr(state, name).numel() == 0
    assert torch.equal(state.pos, state_t.pos)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_batch_different_lengths_and_positions(dtype):
    H, K, V, L = SHAPE
    C = C_SMALL
    q, k, v, m = rand_qkv(2, 3 * C + 20, H, K, V, L, dtype=dtype, seed=2, device=DEV)
    ref = mhla_reference(q, k, v, m, block_size=C)
    n0, n1 = C // 2 + 1, 2 * C + 3
    o1, st = mhla_attention(q[:, :n1], k[:, :n1], v[:, :n1], m, block_size=C, state=None, return_state=True,
                            lengths=torch.tensor([n0, n1], device=DEV), backend="triton")
    assert st.pos.tolist() == [n0, n1]
    assert rel_err(o1[0, :n0], ref[0, :n0]) < TOL[dtype] and rel_err(o1[1], ref[1, :n1]) < TOL[dtype]
    # one token each, at different positions, then a chunk each from its own position
    step = torch.stack([q[0, n0], q[1, n1]])[:, None], torch.stack([k[0, n0], k[1, n1]])[:, None], \
        torch.stack([v[0, n0], v[1, n1]])[:, None]
    o2 = mhla_attention(*step, m, block_size=C, state=st, backend="triton")
    assert rel_err(o2[0, 0], ref[0, n0]) < TOL[dtype] and rel_err(o2[1, 0], ref[1, n1]) < TOL[dtype]
    a0, a1 = n0 + 1, n1 + 1
    take = lambda x: torch.stack([x[0, a0:a0 + 17], x[1, a1:a1 + 17]])  # noqa: E731
    o3 = mhla_attention(take(q), take(k), take(v), m, block_size=C, state=st, backend="triton")
    assert rel_err(o3[0], ref[0, a0:a0 + 17]) < TOL[dtype] and rel_err(o3[1], ref[1, a1:a1 + 17]) < TOL[dtype]


@pytest.mark.skipif(GPU, reason="numba is the CPU path")
@pytest.mark.parametrize("policy", POLICIES)
def test_numba_decode_matches_definition(policy):
    q, k, v, m = rand_qkv(2, 70, 2, 16, 8, 3, seed=9)
    ref = mhla_reference(q, k, v, m, block_size=8, policy=policy)
    out, _ = calls(q, k, v, m, [13] + [1] * 57, "numba", 8, policy)
    assert rel_err(out, ref) < TOL[torch.float32]
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    out, _ = calls(qb, kb, vb, m, [5] + [1] * 65, "numba", 8, policy)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, mhla_reference(qb, kb, vb, m, block_size=8, policy=policy)) < TOL[torch.bfloat16]


def test_auto_backend_choice():
    from mhla_stream.attention import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "numba"
    if GPU:
        assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager():
    from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
    from mhla_stream.graphs import GraphDecoder
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).cuda().eval()
    ids = torch.randint(3, 256, (2, 90), device="cuda")
    with torch.inference_mode():
        eager, graphed = MHLACache(model.new_state(2)), MHLACache(model.new_state(2))
        model(ids[:, :21], past_key_values=eager)
        model(ids[:, :21], past_key_values=graphed)
        decoder = GraphDecoder(model, graphed)
        for t in range(21, 90):  # crosses block boundaries and the trained edge (4 blocks of 8)
            a = model(ids[:, t:t + 1], past_key_values=eager).logits
            b = decoder.step(ids[:, t:t + 1])
            assert rel_err(b, a) < 1e-4, t
        assert torch.equal(eager.states[0].pos, graphed.states[0].pos)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_feedback_decoder_replays_the_greedy_tokens_of_the_host_loop():
    """mhla-bench's decode loop: replays back to back, each step's argmax fed to the next inside
    the graph, give the tokens of the host loop (step, argmax, step ...)."""
    from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
    from mhla_stream.graphs import GraphDecoder
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).cuda().eval()
    ids = torch.randint(3, 256, (2, 21), device="cuda")
    with torch.inference_mode():
        host, fed = MHLACache(model.new_state(2)), MHLACache(model.new_state(2))
        first = model(ids, past_key_values=host).logits[:, -1].argmax(-1, keepdim=True)
        model(ids, past_key_values=fed)
        a, b = GraphDecoder(model, host), GraphDecoder(model, fed, feedback=True)
        nxt, want = first, []
        for _ in range(40):  # crosses block closes and the trained edge (4 blocks of 8)
            nxt = a.step(nxt)[:, -1].argmax(-1, keepdim=True)
            want.append(nxt)
        b.ids.copy_(first)
        got = []
        for _ in range(40):
            b.replay()
            got.append(b.ids.clone())
        assert torch.equal(torch.cat(got, 1), torch.cat(want, 1))


@pytest.mark.parametrize("ring", (torch.float32, torch.bfloat16))
def test_capture_puts_back_fresh_states_by_zeroing_and_others_bit_for_bit(ring, monkeypatch):
    """A capture's warm-up runs for real, so the state is saved and put back. Fresh states (all
    zero bits: a server's or mhla-bench's captures) are not copied but zeroed after; a single set
    bit anywhere (-0.0, a position, a far or buffered slot) makes it a copy, put back exactly. The
    save/restore pair itself, on the CPU (host memory stands in for the device's)."""
    from mhla_stream import MHLAForCausalLM, preset_config
    from mhla_stream import graphs
    model = MHLAForCausalLM(preset_config("mhla-tiny", mixing_policy="window+far"))
    monkeypatch.setattr(graphs.torch.cuda, "mem_get_info", lambda device: (1 << 40, 1 << 40))
    states = model.new_state(2, state_dtype=ring)
    assert graphs._save(states) is None
    for s in states:  # what a warm-up leaves
        for n in s.TENSORS:
            getattr(s, n).fill_(3)
    graphs._restore(states, None)
    assert all(not getattr(s, n).any() for s in states for n in s.TENSORS)
    for name, fill in (("ring", -0.0), ("pos", 1), ("far", 1e-30), ("open_values", float("nan"))):
        states = model.new_state(2, state_dtype=ring)
        getattr(states[-1], name).view(-1)[-1] = fill
        before = [s.clone() for s in states]
        saved = graphs._save(states)
        assert saved is not None, name
        for s in states:
            s.ring.fill_(5)
            s.pos.fill_(7)
        graphs._restore(states, saved)
        for s, b in zip(states, before):
            for n in s.TENSORS:
                x, y = getattr(s, n), getattr(b, n)
                assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), (name, n)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_graph_prefill_chunks_match_eager(policy):
    from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
    from mhla_stream.graphs import GraphStep
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny", mixing_policy=policy)).cuda().eval()
    ids = torch.randint(3, 256, (2, 3 + 5 * 13), device="cuda")
    with torch.inference_mode():
        eager, graphed = MHLACache(model.new_state(2)), MHLACache(model.new_state(2))
        model(ids[:, :3], past_key_values=eager)
        model(ids[:, :3], past_key_values=graphed)  # chunks then start mid-block
        prefill = GraphStep(model, graphed, chunk=13)
        for t in range(3, ids.shape[1], 13):  # crosses blocks and the trained edge (4 blocks of 8)
            a = model(ids[:, t:t + 13], past_key_values=eager, logits_to_keep=1).logits
            b = prefill.step(ids[:, t:t + 13])
            assert rel_err(b, a) < 1e-4, t
        for s_e, s_g in zip(eager.states, graphed.states):
            assert torch.equal(s_e.pos, s_g.pos) and rel_err(s_g.ring, s_e.ring) < 1e-5


@pytest.mark.skipif(not GPU, reason="the fused inference path runs on CUDA")
def test_fused_projections_match_separate():
    from mhla_stream import MHLAForCausalLM, preset_config
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).cuda().eval()
    ids = torch.randint(3, 256, (2, 50), device="cuda")
    with torch.enable_grad():
        separate = model(ids).logits  # gradients on: separate projections, eager elementwise ops
    with torch.no_grad():
        fused = model(ids).logits     # inference: concatenated weights, compiled elementwise ops
    assert rel_err(fused, separate) < 1e-4


@pytest.mark.parametrize("M, K, dtype", [(1, 1024, torch.bfloat16), (3, 40, torch.float32), (32, 1024, torch.bfloat16),
                                         (2, 1, torch.float32), (0, 64, torch.bfloat16), (4, 0, torch.float32),
                                         (2, 3000, torch.float16)])
def test_row_stats_one_launch_against_torch(M, K, dtype):
    """The first layer's norm statistics (``row_stats``, one kernel) against the torch formula: each
    16-column slot's square sum, [slots, M], a short last slot, more slots than one pass of the
    kernel takes (K 3000), strided rows, columns with a stride (a transposed x), empty inputs."""
    from mhla_stream.kernels.triton_skinny import row_stats
    wide = torch.randn(M, K + 8, device=DEV).to(dtype)
    # dense rows, rows with a stride of K + 8, and a transposed copy (column stride M)
    for x in (wide[:, :K].contiguous(), wide[:, :K], wide[:, :K].t().contiguous().t()):
        want = F.pad(x.float().square(), (0, -K % 16)).reshape(M, -1, 16).sum(-1).t() if M and K else None
        got = row_stats(x)
        assert got.shape == (-(-K // 16), M) and got.dtype == torch.float32 and got.is_contiguous()
        if want is not None:
            torch.testing.assert_close(got, want, rtol=4e-6, atol=0)  # (16 positive terms, any order)
