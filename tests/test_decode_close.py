"""The decode kernel's block close (``kernels/triton_decode.py``): a closing head's work is split
into close items of a few rows and columns, shared by every program of the launch; each item writes
its rows' share of o and the last one of the head sums the shares in row order. Checked against the
plain reference with items smaller than a head (several row and column items, workers looping over
more items than there are programs), sequences closing at different steps and together, and on the
GPU a CUDA graph whose capture has to make the workspace."""
import pytest
import torch
from conftest import TOL, rand_qkv, rel_err

from mhla_stream import mhla_attention
from mhla_stream.kernels import triton_available
from mhla_stream.reference import mhla_reference
from mhla_stream.state import MHLAState

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V, L, C = 2, 24, 48, 4, 8       # K and V not multiples of the item shapes below


def _run(starts, steps, forms, close_shape, policy="window", dtype=torch.float32, seed=11, state_dtype=None):
    """Prefill ``starts[b]`` tokens of row b, then ``steps`` decode launches of one token a row;
    returns (outputs [B, steps, H, V], the reference's outputs at the same positions)."""
    from mhla_stream.kernels.triton_decode import decode_into
    B = len(starts)
    q, k, v, m = rand_qkv(B, max(starts) + steps, H, K, V, L, dtype=dtype, seed=seed, device=DEV)
    state = MHLAState.empty(B, H, K, V, block_size=C, num_blocks=L, policy=policy, device=DEV,
                            state_dtype=state_dtype)
    mhla_attention(q[:, :max(starts)], k[:, :max(starts)], v[:, :max(starts)], m, block_size=C, state=state,
                   backend="triton", lengths=torch.tensor(starts, device=DEV))
    rows, outs = torch.arange(B, device=DEV), []
    for n in range(steps):
        at = state.pos.clone()
        o = torch.empty(B, H, V, device=DEV, dtype=dtype)
        decode_into(o, q[rows, at], k[rows, at], v[rows, at], m, state, K ** -0.5, tokens=forms(n),
                    close_shape=close_shape)
        state.pos += 1
        outs.append(o)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy, state_dtype=state_dtype)
    return torch.stack(outs, 1), torch.stack([ref[b, s:s + steps] for b, s in enumerate(starts)])


@pytest.mark.parametrize("form", ["R", "tokens"])
@pytest.mark.parametrize("close_shape", [(8, 16), (16, 32)])
def test_a_close_split_into_items_gives_the_reference(form, close_shape):
    """Rows 3 and 5 close at different steps, rows of equal position together; 24 rows and 48
    columns in items of 8 x 16 (3 x 3 a head) or 16 x 32 (2 x 2, the last ones partly masked)."""
    got, want = _run([3, 5, 8, 3], C * (L + 1) + 2, lambda n: form == "tokens", close_shape)
    assert rel_err(got, want) < TOL[torch.float32]
    from mhla_stream.kernels import triton_decode as td
    counters = td._workspaces[(torch.device(DEV).type, torch.device(DEV).index if DEV == "cpu" else 0)][1]
    assert int(counters.abs().sum()) == 0  # every launch leaves the ticket counters at zero


def test_items_across_forms_policies_and_a_bf16_ring():
    got, want = _run([6, 1, 9], C * 2 + 3, lambda n: n % 3 == 0, (8, 16), policy="window+far",
                     state_dtype="bf16", seed=12)
    assert rel_err(got, want) < TOL[torch.float32]
    got, want = _run([2, 7], C * 2 + 1, lambda n: n % 2 == 1, (8, 32), dtype=torch.bfloat16, seed=13)
    assert rel_err(got, want) < TOL[torch.bfloat16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_a_graph_whose_capture_makes_the_workspace_replays_the_eager_steps_exactly():
    """The workspace (shares and ticket counters) grows on demand; inside a capture it is made there
    and kept for the graph. Replays across two closes give the eager launches' outputs bit for bit
    (the last item sums the shares in row order, whichever finished last)."""
    from mhla_stream.kernels import triton_decode as td
    B = 5
    q, k, v, m = rand_qkv(B, 2 * C + 4, H, K, V, L, seed=14, device="cuda")
    states = [MHLAState.empty(B, H, K, V, block_size=C, num_blocks=L, policy="window", device="cuda")
              for _ in range(2)]
    o = torch.empty(B, H, V, device="cuda")
    qt, kt, vt = (torch.empty(B, H, d, device="cuda") for d in (K, K, V))

    def step(state):
        td.decode_into(o, qt, kt, vt, m, state, K ** -0.5, close_shape=(8, 16))
        state.pos += 1

    qt.copy_(q[:, 0]), kt.copy_(k[:, 0]), vt.copy_(v[:, 0])
    step(states[0].clone())  # compile outside the capture
    td._workspaces.clear()   # so that the capture has to make one
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        step(states[1])
    torch.cuda.current_stream().wait_stream(side)
    states[1].zero_()
    eager, replayed = [], []
    for t in range(2 * C + 4):
        qt.copy_(q[:, t]), kt.copy_(k[:, t]), vt.copy_(v[:, t])
        step(states[0])
        eager.append(o.clone())
        graph.replay()
        replayed.append(o.clone())
    torch.cuda.synchronize()
    assert torch.equal(torch.stack(eager), torch.stack(replayed))


def test_the_workspace_grows_in_both_sizes_and_is_not_replaced_back_and_forth():
    """Launches whose shares-per-head differ (two models on one device) alternate: the workspace
    grows to cover both, once, instead of being replaced (and the old one kept) at every call."""
    from mhla_stream.kernels import triton_decode as td
    dev = torch.device("cpu")
    td._workspaces.pop((dev.type, dev.index), None)
    kept = len(td._kept)
    seen = {id(td._close_workspace(dev, *((8 * 4 * 8 * 256, 32) if n % 2 else (16 * 4 * 4 * 64, 64))))
            for n in range(6)}
    assert len(seen) <= 2 and len(td._kept) <= kept + 1
