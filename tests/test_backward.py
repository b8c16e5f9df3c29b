"""Gradients of the operator (q, k, v and the raw mixing matrix) against the oracle's autograd.

The torch chunk form is checked in float64; the Triton forward + backward (``backend="triton"``
with gradients) runs in the interpreter on the CPU at small shapes, in fp32 against the float64
oracle, and with bf16 inputs at a looser tolerance. With CUDA the sweep runs at the 340M layer shape.
"""
import pytest
import torch
from conftest import rand_qkv, rel_err

from mhla_stream import mhla_attention, mhla_reference
from mhla_stream.plan import make_plan

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
SMALL = (2, 16, 32, 3, 64)  # H, K, V, L, C: L*C = 192 tokens of trained blocks
FULL = (4, 128, 256, 32, 64)  # the 340M layer
GRAD_TOL = {torch.float32: 5e-5, torch.bfloat16: 2e-2}


def oracle_grads(q, k, v, m, do, C, policy):
    """float64 autograd of the definition: (o, [dq, dk, dv, dm])."""
    xs = [x.detach().double().requires_grad_() for x in (q, k, v)] + [m.detach().double().requires_grad_()]
    o = mhla_reference(*xs, block_size=C, policy=policy)
    o.backward(do.double())
    return o.detach(), [x.grad for x in xs]


def operator_grads(q, k, v, m, do, C, policy, backend, lengths=None):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, m)]
    o = mhla_attention(*xs, block_size=C, backend=backend, policy=policy, lengths=lengths)
    o.backward(do)
    return o.detach(), [x.grad for x in xs]


def check(got, ref, tol, names=("o", "dq", "dk", "dv", "dM")):
    for name, g, r in zip(names, got, ref):
        err = rel_err(g, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def case(T, shape, dtype, seed, B=2):
    H, K, V, L, C = shape
    q, k, v, m = rand_qkv(B, T, H, K, V, L, dtype=dtype, seed=seed, device=DEV)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(seed + 1)).to(DEV, dtype)
    return q, k, v, m, do, C


@pytest.mark.parametrize("policy", ["window", "window+far"])
def test_torch_chunk_form_gradients_match_oracle(policy):
    """float64 inputs; the chunk form sums in fp32 (SPEC section 1), hence the fp32 tolerance."""
    q, k, v, m, do, C = case(200, SMALL, torch.float64, 3)  # crosses the trained edge (192)
    o_ref, g_ref = oracle_grads(q, k, v, m, do, C, policy)
    o, g = operator_grads(q, k, v, m, do, C, policy, "torch")
    check([o, *g], [o_ref, *g_ref], GRAD_TOL[torch.float32])


# T = 1, around one block, several blocks, past the trained L*C (window policy: the far one below)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_triton_gradients_fp32(T):
    q, k, v, m, do, C = case(T, FULL if GPU else SMALL, torch.float32, T)
    o_ref, g_ref = oracle_grads(q, k, v, m, do, C, "window")
    o, g = operator_grads(q, k, v, m, do, C, "window", "triton")
    check([o, *g], [o_ref, *g_ref], GRAD_TOL[torch.float32])


def test_triton_gradients_window_far_past_trained_blocks():
    q, k, v, m, do, C = case(200, SMALL, torch.float32, 5)
    o_ref, g_ref = oracle_grads(q, k, v, m, do, C, "window+far")
    o, g = operator_grads(q, k, v, m, do, C, "window+far", "triton")
    check([o, *g], [o_ref, *g_ref], GRAD_TOL[torch.float32])


def test_triton_gradients_bf16_inputs():
    q, k, v, m, do, C = case(130, SMALL, torch.bfloat16, 7)
    o_ref, g_ref = oracle_grads(q, k, v, m, do, C, "window")
    o, g = operator_grads(q, k, v, m, do, C, "window", "triton")
    assert all(x.dtype == torch.bfloat16 for x in (o, *g[:3])) and g[3].dtype == torch.float32
    check([o, *g], [o_ref, *g_ref], GRAD_TOL[torch.bfloat16])


def test_mixing_gradient_is_zero_outside_the_clamp_and_above_the_diagonal():
    q, k, v, _, do, C = case(130, SMALL, torch.float32, 9)  # 3 blocks: every entry of M is used
    m = torch.tensor([[1.5, 0.7, 0.3], [-0.2, 0.5, 2.0], [0.4, 2e-6, 1.0]], device=DEV)
    o_ref, g_ref = oracle_grads(q, k, v, m, do, C, "window")
    _, g = operator_grads(q, k, v, m, do, C, "window", "triton")
    dm = g[3]
    dead = (m < 1e-5) | (m > 1) | torch.ones_like(m, dtype=torch.bool).triu(1)
    assert torch.all(dm[dead] == 0) and torch.all(g_ref[3][dead] == 0)
    assert torch.all(dm[~dead] != 0)  # M[2, 2] = 1.0 sits on the clamp's edge: it passes, as in autograd
    assert rel_err(dm, g_ref[3]) < GRAD_TOL[torch.float32]


def test_triton_gradients_batch_with_different_lengths():
    """Right padding: valid rows match the oracle on each sequence alone; padded rows give 0 and get
    no gradient, and do not change any other gradient."""
    q, k, v, m, do, C = case(130, SMALL, torch.float32, 11)
    lengths = torch.tensor([37, 130], device=DEV)
    o, g = operator_grads(q, k, v, m, do, C, "window", "triton", lengths=lengths)
    dm_sum = 0
    for b, n in enumerate(lengths.tolist()):
        sl = (slice(b, b + 1), slice(0, n))
        o_ref, g_ref = oracle_grads(q[sl], k[sl], v[sl], m, do[sl], C, "window")
        check([o[sl], *(x[sl] for x in g[:3])], [o_ref, *g_ref[:3]], GRAD_TOL[torch.float32])
        dm_sum = dm_sum + g_ref[3]
        assert torch.all(o[b, n:] == 0) and all(torch.all(x[b, n:] == 0) for x in g[:3])
    assert rel_err(g[3], dm_sum) < GRAD_TOL[torch.float32]


def test_dispatch_gradients_only_when_needed_and_odd_output_gradients():
    q, k, v, m, do, C = case(70, SMALL, torch.float32, 13)
    with torch.no_grad():
        plain = mhla_attention(q, k, v, m.requires_grad_(), block_size=C, backend="triton")
    assert plain.grad_fn is None
    m.requires_grad_(False)
    # only M needs a gradient; the output gradient is an expanded (stride 0) tensor
    mp = m.clone().requires_grad_()
    out = mhla_attention(q, k, v, mp, block_size=C, backend="triton")
    assert torch.equal(out.detach(), plain)
    out.sum().backward()
    _, g_ref = oracle_grads(q, k, v, m, torch.ones_like(do), C, "window")
    assert rel_err(mp.grad, g_ref[3]) < GRAD_TOL[torch.float32]
    # the reference layout of the parameter, [L, L, 1, 1, 1, 1], gets its gradient in that shape
    m6 = m.clone().reshape(*m.shape, 1, 1, 1, 1).requires_grad_()
    mhla_attention(q, k, v, m6, block_size=C, backend="triton").sum().backward()
    assert m6.grad.shape == m6.shape and rel_err(m6.grad.reshape(m.shape), g_ref[3]) < GRAD_TOL[torch.float32]


@pytest.mark.skipif(GPU, reason="CPU tensors on the Triton interpreter (the GPU machine has no TRITON_INTERPRET)")
def test_training_plan_picks_triton_with_a_way_back_to_torch(monkeypatch):
    assert make_plan("cpu", torch.float32, 1, backend="triton").with_gradients(True).prefill_backend == "triton"
    assert make_plan("cpu", torch.float32, 1, backend="torch").with_gradients(True).prefill_backend == "torch"
    assert make_plan("cpu", torch.float32, 1).with_gradients(True).prefill_backend == "torch"  # no CUDA: torch
    from mhla_stream import switches as sw
    off = sw.Switches(interpret=True, fused_decode=True, pdl=True, compile=True, triton_train=False)
    monkeypatch.setattr("mhla_stream.plan.switches", lambda: off)
    make_plan.cache_clear()
    try:
        assert make_plan("cpu", torch.float32, 1, backend="triton").with_gradients(True).train_backend == "torch"
    finally:
        make_plan.cache_clear()


def test_training_loss_module_triton_matches_torch_form():
    from mhla_stream.training.model import LossModule, build_model
    torch.manual_seed(0)
    lm = build_model("mhla", 64, 64, 2, 2, 8, 4, "window", preset="mhla-tiny").to(DEV)
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.attn.mixing_matrix.copy_(torch.rand(4, 4) * 1.2 - 0.1)
    windows = torch.randint(0, 64, (2, 41)).to(DEV)  # 40 tokens: past the trained 32
    results = {}
    for backend in ("torch", "triton"):
        lm.zero_grad(set_to_none=True)
        loss = LossModule(lm, fused_loss=True, loss_chunk=16, attn_backend=backend)(windows)
        loss.backward()
        results[backend] = float(loss.detach()), {n: p.grad.clone() for n, p in lm.named_parameters()}
    (loss_t, g_t), (loss_x, g_x) = results["torch"], results["triton"]
    assert abs(loss_t - loss_x) < 1e-5
    for name in g_t:
        assert rel_err(g_x[name], g_t[name]) < 1e-4, name
    with pytest.raises(ValueError, match="unknown backend"):
        LossModule(lm, fused_loss=True, attn_backend="cuda")(windows)


@pytest.mark.skipif(not GPU, reason="full 340M shapes: GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, policy", [(2048, "window"), (2100, "window"), (3000, "window+far")])
def test_triton_gradients_full_shape_gpu(T, policy, dtype):
    q, k, v, m, do, C = case(T, FULL, dtype, T)
    o_ref, g_ref = oracle_grads(q, k, v, m, do, C, policy)
    o, g = operator_grads(q, k, v, m, do, C, policy, "triton")
    check([o, *g], [o_ref, *g_ref], GRAD_TOL[dtype])


def test_training_step_traces_as_one_graph():
    """The Triton forward and backward are torch.library custom ops: torch.compile sees a training step
    of the model as one graph. As an autograd.Function the operator broke the graph at every layer,
    and the compiled 340M step ran 114 ms of kernels in 175 ms of wall time on an H100 (host-bound)."""
    import torch._dynamo as dynamo

    from mhla_stream import MHLAForCausalLM, preset_config
    from mhla_stream.training.model import LossModule
    torch.manual_seed(0)
    step = LossModule(MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV), True, 4096, "triton")
    windows = torch.randint(0, 256, (2, 33), device=DEV)
    explained = dynamo.explain(step)(windows)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1
    # and the op's gradients are the eager ones (the custom op's autograd, not a traced copy)
    compiled = torch.compile(step, backend="aot_eager")
    for run in (step, compiled):
        step.zero_grad(set_to_none=True)
        run(windows).backward()
        grads = [p.grad.clone() for p in step.parameters()]
        if run is step:
            eager = grads
    for a, b in zip(eager, grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32))
def test_triton_gradients_with_strided_lengths(dtype):
    """``lengths`` a strided [B] view (a column of a table): the backward's kernels read sequence b's
    length at offset b, so it is made dense first; the gradients are those of the same lengths dense."""
    H, K, V, L, C = SMALL
    q, k, v, m = rand_qkv(3, 2 * C + 3, H, K, V, L, seed=8, device=DEV)
    do = torch.randn(3, 2 * C + 3, H, V, generator=torch.Generator().manual_seed(9)).to(DEV)
    table = torch.tensor([[2 * C + 3, 1], [0, 1], [C + 1, 1]], dtype=dtype, device=DEV)
    assert not table[:, 0].is_contiguous()
    strided = operator_grads(q, k, v, m, do, C, "window", "triton", lengths=table[:, 0])
    dense = operator_grads(q, k, v, m, do, C, "window", "triton", lengths=table[:, 0].contiguous())
    assert torch.equal(strided[0], dense[0])
    for a, b in zip(strided[1], dense[1]):
        assert torch.equal(a, b)
