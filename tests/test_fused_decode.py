"""The fused decode path (skinny products with folded norms, in-kernel feature map, block close
folded into the decode kernel) and the prefill feature-map kernel, against the unfused model.
Runs under TRITON_INTERPRET=1 on a CPU, natively on a GPU."""
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, rand_qkv, rel_err

from mhla_stream import MHLACache, MHLAForCausalLM, POLICIES, mhla_attention, mhla_reference, preset_config
from mhla_stream.fused import gated_norm, relu_rope, rms_norm, rope_tables, swiglu
from mhla_stream.kernels import triton_common
from mhla_stream.kernels.triton_features import relu_rope_qk
from mhla_stream.kernels.triton_skinny import skinny_linear

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("M,split", ((1, None), (2, 1), (3, 2), (17, 3), (70, 2)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_skinny_products_match_unfused(M, split, dtype):
    """Every prologue and epilogue; from 2 rows the tensor-core form with K split over 1-3 programs
    (3 splits of 96 columns in steps of 64: one split is empty), 70 rows in two row blocks."""
    K, N, V, eps = 96, 40, 32, 1e-6
    x, w = _rand(M, K, dtype=dtype, seed=M), _rand(N, K, dtype=dtype, seed=1) / K ** 0.5
    nw, res = _rand(K, dtype=dtype, seed=2), _rand(M, N, dtype=dtype, seed=3)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    lin = functools.partial(skinny_linear, split=split)
    assert rel_err(lin(x, w), F.linear(x, w)) < tol
    ref = F.linear(rms_norm(x, nw, eps), w)
    assert rel_err(lin(x, w, norm_weight=nw, eps=eps), ref) < tol
    # gated per-head norm (groups of V columns) plus the residual: the attention output projection
    g, gw = _rand(M, K, dtype=dtype, seed=4), _rand(V, dtype=dtype, seed=5)
    o = x.view(M, K // V, V)
    ref = res + F.linear(gated_norm(o, gw, g.view(M, K // V, V), eps).reshape(M, K), w)
    out = lin(x, w, norm_weight=gw, group=V, eps=eps, gate=g, residual=res)
    assert rel_err(out, ref) < tol
    # SwiGLU over [gate; up] rows with the layer norm in front: the MLP's first product
    wgu = _rand(2 * N, K, dtype=dtype, seed=6) / K ** 0.5
    xn = rms_norm(x, nw, eps)
    ref = swiglu(F.linear(xn, wgu[:N]), F.linear(xn, wgu[N:]))
    out = lin(x, wgu, norm_weight=nw, eps=eps, swiglu=True)
    assert rel_err(out, ref) < tol
    assert torch.equal(lin(x, wgu, norm_weight=nw, eps=eps, swiglu=True), out)  # counters reset: same bits
    if M > 1:
        assert int(triton_common._workspaces[(x.device.type, x.device.index)][1].abs().sum()) == 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_feature_map_kernel_matches_torch(dtype):
    B, T, H, K = 2, 37, 3, 16
    proj = _rand(B, T, 2 * H * K + 24, dtype=dtype, seed=7)  # q | k | more columns, read in place
    positions = torch.arange(T, device=DEV)[None] + torch.tensor([[5], [900]], device=DEV)
    cos, sin = rope_tables(positions, K, 10000.0)
    qk = relu_rope_qk(proj, cos, sin, H, K)
    ref = relu_rope(proj[..., :2 * H * K].reshape(B, T, 2 * H, K), cos, sin)
    assert rel_err(qk, ref) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("policy", POLICIES)
def test_decode_kernel_boundaries_and_lengths(policy):
    """A call that starts at the last row of a block and ends on a boundary, then single tokens
    through block closes, one of them fed with lengths."""
    H, K, V, L, C = 2, 16, 32, 3, 8
    T = C * (L + 3) + 3
    q, k, v, m = rand_qkv(2, T, H, K, V, L, seed=11, device=DEV)
    ref = mhla_reference(q, k, v, m, block_size=C, policy=policy)
    state, outs, t = None, [], 0
    for n in [C - 1, C + 1, 3, C - 4] + [1] * (T - 3 * C + 1):
        sl = slice(t, t + n)
        lengths = torch.tensor([1, 1], device=DEV) if t == 6 * C - 1 else None  # closes block 5
        o, state = mhla_attention(q[:, sl], k[:, sl], v[:, sl], m, block_size=C, state=state, return_state=True,
                                  backend="triton", policy=policy, lengths=lengths)
        outs.append(o)
        t += n
    assert t == T
    assert rel_err(torch.cat(outs, 1), ref) < TOL[torch.float32]
    assert state.pos.tolist() == [T, T]


@pytest.mark.parametrize("policy, dtype, path, B", [("window", torch.float32, "fused", 2),
                                                    ("window+far", torch.float32, "fused", 2),
                                                    ("window", torch.bfloat16, "fused", 2),
                                                    ("window", torch.float16, "fused", 2),
                                                    ("window", torch.float32, "fused", 1),   # the one-row products
                                                    ("window", torch.bfloat16, "fused", 1),
                                                    ("window+far", torch.float32, "batched", 2),
                                                    ("window", torch.bfloat16, "batched", 2)])
def test_fused_decode_gives_the_unfused_logits(policy, dtype, path, B):
    """Both one-token paths: ``decode_step`` (fused; one row and two) and ``decode_step_batched``."""
    torch.manual_seed(0)
    cfg = preset_config("mhla-tiny", mixing_policy=policy)
    model = MHLAForCausalLM(cfg).to(DEV, dtype).eval()
    unfused = model.make_plan(B, backend="triton", fused_decode=False, batched_decode=False)
    fused = (model.make_plan(B, backend="triton", fused_decode=True) if path == "fused" else
             model.make_plan(B, backend="triton", fused_decode=False, batched_decode=True))
    assert not (unfused.fused_decode or unfused.batched_decode)
    assert fused.fused_decode == (path == "fused") and fused.batched_decode == (path == "batched")
    ids = torch.randint(3, 256, (B, 44), device=DEV)
    with torch.inference_mode():
        ref_cache, fused_cache = MHLACache(model.new_state(B)), MHLACache(model.new_state(B))
        model(ids[:, :13], past_key_values=ref_cache, plan=unfused)
        model(ids[:, :13], past_key_values=fused_cache, plan=fused)
        # bf16: two rounding orders of the same decode; 0.0095 .. 0.021 over these steps under the
        # interpreter (its prefill rounds the mixed prefixes to bf16 as the GPU does), so 3e-2
        for t in range(13, 44):  # crosses block closes (C = 8) and the trained edge (L = 4 blocks)
            a = model(ids[:, t:t + 1], past_key_values=ref_cache, plan=unfused).logits
            b = model(ids[:, t:t + 1], past_key_values=fused_cache, plan=fused).logits
            assert rel_err(b, a) < (1e-5 if dtype == torch.float32 else 3e-2), t  # (fp16: per-element norms)
        for s_ref, s_fused in zip(ref_cache.states, fused_cache.states):
            assert torch.equal(s_ref.pos, s_fused.pos)
            if dtype == torch.float32:  # (in bf16 the projections round differently: the logits check suffices)
                assert rel_err(s_fused.prefix, s_ref.prefix) < 1e-5


@pytest.mark.parametrize("B", (8, 64))
def test_decode_kernel_wide_column_blocks_at_large_batches(B):
    """Batches of 8+ take column blocks of 32, 64+ of 64 (state-traffic bound): the same tokens as
    the torch decode, through two block closes."""
    H, K, V, L, C = 2, 16, 128, 3, 4
    q, k, v, m = rand_qkv(B, 2 * C + 1, H, K, V, L, seed=B, device=DEV)
    pre = 3
    o1, got_state = mhla_attention(q[:, :pre], k[:, :pre], v[:, :pre], m, block_size=C, return_state=True,
                                   backend="triton")
    o2, ref_state = mhla_attention(q[:, :pre], k[:, :pre], v[:, :pre], m, block_size=C, return_state=True,
                                   backend="torch")
    for t in range(pre, q.shape[1]):
        sl = slice(t, t + 1)
        a, got_state = mhla_attention(q[:, sl], k[:, sl], v[:, sl], m, block_size=C, state=got_state,
                                      return_state=True, backend="triton")
        b, ref_state = mhla_attention(q[:, sl], k[:, sl], v[:, sl], m, block_size=C, state=ref_state,
                                      return_state=True, backend="torch")
        assert rel_err(a, b) < TOL[torch.float32], t
    assert rel_err(got_state.prefix, ref_state.prefix) < TOL[torch.float32]
    assert torch.equal(got_state.pos, ref_state.pos)


@pytest.mark.parametrize("path", ("batched", "fused"))
def test_batched_decode_at_batch_8_with_a_partial_value_block(path):
    """The batched step and the fused step (norms as scales from statistics) at batch 8 (value
    blocks of 32) with V = 48: the second block is half masked. fp32, through block closes and past
    the trained edge, against the unfused path."""
    torch.manual_seed(1)
    model = MHLAForCausalLM(preset_config("mhla-tiny", hidden_size=96)).to(DEV).eval()
    for layer in model.model.layers:  # trained-looking norm weights, so that folding them shows
        for norm in (layer.attn_norm, layer.mlp_norm, layer.attn.g_norm_swish_gate):
            norm.weight.data.uniform_(0.5, 1.5)
    assert model.config.head_v_dim == 48
    unfused = model.make_plan(8, backend="triton", fused_decode=False, batched_decode=False)
    batched = model.make_plan(8, backend="triton", fused_decode=path == "fused", batched_decode=path == "batched")
    ids = torch.randint(3, 256, (8, 36), device=DEV)
    with torch.inference_mode():
        ref_cache, cache = MHLACache(model.new_state(8)), MHLACache(model.new_state(8))
        model(ids[:, :6], past_key_values=ref_cache, plan=unfused)
        model(ids[:, :6], past_key_values=cache, plan=batched)
        for t in range(6, 36):
            a = model(ids[:, t:t + 1], past_key_values=ref_cache, plan=unfused).logits
            b = model(ids[:, t:t + 1], past_key_values=cache, plan=batched).logits
            assert rel_err(b, a) < 1e-5, t
    for s_ref, s in zip(ref_cache.states, cache.states):
        assert torch.equal(s_ref.pos, s.pos) and rel_err(s.prefix, s_ref.prefix) < 1e-5


@pytest.mark.parametrize("B, dtype", [(3, torch.float32), (3, torch.bfloat16), (32, torch.float32)])
def test_decode_kernel_gate_and_output_statistics(B, dtype):
    """The fused step's gated output norm, its decode-kernel share: o written as o * silu(g) and o's
    square sums in 16-column slots (V = 48: three 16-column blocks at batch 3, one 64-column block
    two-thirds masked at 32, whose slots must not reach the next head's), the state advanced as
    without them. Through a block close, gate read from a wider projection (strided)."""
    from mhla_stream.kernels.triton_decode import decode_into
    from mhla_stream.kernels.triton_skinny import norm_stats
    from mhla_stream.state import MHLAState
    H, K, V, L, C = 2, 16, 48, 3, 4
    q, k, v, m = rand_qkv(B, 2 * C + 1, H, K, V, L, seed=B, device=DEV, dtype=dtype)
    states = [MHLAState.empty(B, H, K, V, block_size=C, num_blocks=L, policy="window", device=DEV)
              for _ in range(2)]
    for state in states:
        mhla_attention(q[:, :3], k[:, :3], v[:, :3], m, block_size=C, state=state, backend="triton")
    for t in range(3, q.shape[1]):
        g = _rand(B, H, 2 * V, dtype=dtype, seed=t)[..., :V]
        plain, gated = torch.empty(B, H, V, device=DEV, dtype=dtype), torch.empty(B, H, V, device=DEV, dtype=dtype)
        stats = norm_stats(B, H * V, DEV).fill_(float("nan"))
        decode_into(plain, q[:, t], k[:, t], v[:, t], m, states[0], K ** -0.5)
        decode_into(gated, q[:, t], k[:, t], v[:, t], m, states[1], K ** -0.5, gate=g, stats=stats)
        for state in states:
            state.pos += 1
        want = plain.float() * F.silu(g.float())
        assert rel_err(gated.float(), want) < (1e-6 if dtype == torch.float32 else 8e-3), t
        per_head = stats.view(H, V // 16, B).sum(1).t()                                            # [B, H]
        assert rel_err(per_head, plain.float().pow(2).sum(-1)) < 1e-5, t
    for name in MHLAState.TENSORS:
        assert torch.equal(getattr(states[0], name), getattr(states[1], name)), name


def test_fused_step_with_statistics_at_four_heads():
    """The fused step's statistics path where it runs on the GPU too (4 heads of V = 64: the
    output projection splits once a head), at batch 3, fp32, through block closes, against the
    unfused logits; then the folded weights follow a norm weight swapped through ``.data``."""
    from mhla_stream import modeling
    torch.manual_seed(2)
    model = MHLAForCausalLM(preset_config("mhla-tiny", hidden_size=256, num_heads=4)).to(DEV).eval()
    for layer in model.model.layers:
        for norm in (layer.attn_norm, layer.mlp_norm, layer.attn.g_norm_swish_gate):
            norm.weight.data.uniform_(0.5, 1.5)
    cfg = model.config
    assert modeling.MHLABlock._scales_fit(256, cfg.num_heads * cfg.head_v_dim, cfg.head_v_dim)
    unfused = model.make_plan(3, backend="triton", fused_decode=False, batched_decode=False)
    fused = model.make_plan(3, backend="triton", fused_decode=True)
    ids = torch.randint(3, 256, (3, 16), device=DEV)
    calls = []
    real = modeling.row_stats
    modeling.row_stats = lambda x: (calls.append(1), real(x))[1]
    try:
        with torch.inference_mode():
            ref_cache, cache = MHLACache(model.new_state(3)), MHLACache(model.new_state(3))
            model(ids[:, :6], past_key_values=ref_cache, plan=unfused)
            model(ids[:, :6], past_key_values=cache, plan=fused)
            for t in range(6, 16):
                a = model(ids[:, t:t + 1], past_key_values=ref_cache, plan=unfused).logits
                b = model(ids[:, t:t + 1], past_key_values=cache, plan=fused).logits
                assert rel_err(b, a) < 1e-5, t
            assert len(calls) == 10  # every step took the statistics path (row_stats: its first layer)
            block = model.model.layers[0]
            before = block.qkvg_normed_weight.get()
            block.attn_norm.weight.data = block.attn_norm.weight.data * 2
            assert torch.allclose(block.qkvg_normed_weight.get(), before * 2)
    finally:
        modeling.row_stats = real


def test_scales_fit_refuses_heads_not_of_16():
    from mhla_stream.modeling import MHLABlock
    assert not MHLABlock._scales_fit(40, 40, 40) and not MHLABlock._scales_fit(96, 96, 24)


@pytest.mark.parametrize("backend", ("triton", "numba"))
def test_decode_into_a_strided_state(backend):
    """A state viewed with a step (``select(slice(0, 4, 2))``): one token through a block close
    updates exactly the selected rows, as the torch decode does, and leaves the others alone."""
    if backend == "numba":
        pytest.importorskip("numba")
        if GPU:
            pytest.skip("numba decodes CPU states")
    H, K, V, L, C = 2, 16, 32, 3, 4
    q, k, v, m = rand_qkv(4, 8, H, K, V, L, seed=3, device=DEV)
    _, st = mhla_attention(q[:, :7], k[:, :7], v[:, :7], m, block_size=C, return_state=True, backend="torch")
    got, ref = st.clone(), st.clone()
    sel = slice(0, 4, 2)
    o = mhla_attention(q[sel, 7:], k[sel, 7:], v[sel, 7:], m, block_size=C, state=got.select(sel), backend=backend)
    o_ref = mhla_attention(q[sel, 7:], k[sel, 7:], v[sel, 7:], m, block_size=C, state=ref.select(sel),
                           backend="torch")
    assert rel_err(o, o_ref) < TOL[torch.float32]
    got, ref, st = got.settled(), ref.settled(), st.settled()  # the decode kernel keeps its open block as tokens
    for name in ("ring", "prefix", "partial"):
        assert rel_err(getattr(got, name), getattr(ref, name)) < TOL[torch.float32], name
        assert torch.equal(getattr(got, name)[1::2], getattr(st, name)[1::2]), name  # rows not selected
    assert got.pos.tolist() == ref.pos.tolist() == [8, 7, 8, 7]


@pytest.mark.parametrize("path", ("batched", "fused"))
def test_decode_in_the_token_form_gives_the_full_forward(path):
    """From TOKENS_FROM sequences (16) the decode kernel keeps the open block as its tokens:
    incremental logits, from a prefill that ends mid-block through block closes and past the
    trained edge, equal one full forward's (fp32); then a prefill continues the stream from the buffered state. Both steps
    that decode such batches: the batched one and the fused one."""
    from mhla_stream.kernels.triton_decode import TOKENS_FROM
    torch.manual_seed(2)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV).eval()
    B = TOKENS_FROM
    batched = model.make_plan(B, backend="triton", fused_decode=path == "fused", batched_decode=path == "batched")
    assert batched.fused_decode == (path == "fused")
    full = model.make_plan(B, backend="torch")
    ids = torch.randint(3, 256, (B, 48), device=DEV)
    with torch.inference_mode():
        ref = model(ids, plan=full).logits
        cache = MHLACache(model.new_state(B))
        model(ids[:, :30], past_key_values=cache, plan=batched)  # ends mid-block: R holds 6 tokens
        for t in range(30, 38):  # the close at 32 (the trained edge), then 6 tokens buffered
            out = model(ids[:, t:t + 1], past_key_values=cache, plan=batched).logits
            assert rel_err(out[:, 0], ref[:, t]) < 1e-5, t
        assert bool(cache.states[0].buffered_slots()[:, :6].all())  # the token form ran
        out = model(ids[:, 38:], past_key_values=cache, plan=batched).logits
    assert rel_err(out, ref[:, 38:]) < 1e-5


def test_one_row_step_folds_the_final_norm_into_the_head(monkeypatch):
    """Batch 1's fused step: the LM head as a skinny product with the final norm folded in; a head
    with a bias (a user's change) takes the plain head, same logits."""
    import mhla_stream.modeling as modeling
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV).eval()
    plan = model.make_plan(1, backend="triton", fused_decode=True)
    unfused = model.make_plan(1, backend="triton", fused_decode=False, batched_decode=False)
    heads = []
    real = modeling.skinny_linear
    monkeypatch.setattr(modeling, "skinny_linear",
                        lambda x, w, **kw: heads.append(w is model.lm_head.weight) or real(x, w, **kw))
    ids = torch.randint(3, 256, (1, 12), device=DEV)
    with torch.inference_mode():
        caches = [MHLACache(model.new_state(1)) for _ in range(3)]
        for c in caches:
            model(ids[:, :9], past_key_values=c, plan=unfused)
        ref = model(ids[:, 9:10], past_key_values=caches[1], plan=unfused).logits
        heads.clear()
        got = model(ids[:, 9:10], past_key_values=caches[0], plan=plan).logits
        assert heads.count(True) == 1
        assert got.shape == ref.shape == (1, 1, 256) and rel_err(got, ref) < 1e-5
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(256, device=DEV))
        heads.clear()
        biased = model(ids[:, 9:10], past_key_values=caches[2], plan=plan).logits
        assert heads.count(True) == 0 and rel_err(biased, ref) < 1e-5
        seen = caches[0].seen
        with pytest.raises(ValueError, match="one-row fused decode step only"):  # no silent hidden states
            model.model(ids[:, :2], states=caches[0].states, plan=plan, head=model.lm_head)
        assert caches[0].seen == seen  # refused before anything ran


@pytest.mark.parametrize("change", ("hook on the head", "hook on the norm", "strided head", "another head module",
                                    "another norm module"))
def test_a_changed_head_or_norm_takes_the_plain_path(monkeypatch, change):
    """What the fold would bypass or cannot take (hooks, a strided weight, modules that are not the
    model's own) leaves the one-row step's head to the plain code: its logits,
    hooks called, no crash in the middle of a decode."""
    import mhla_stream.modeling as modeling
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV).eval()
    plan = model.make_plan(1, backend="triton", fused_decode=True)
    ids = torch.randint(3, 256, (1, 10), device=DEV)
    seen = []
    if change == "hook on the head":
        model.lm_head.register_forward_hook(lambda m, i, o: seen.append(1))
    elif change == "hook on the norm":
        model.model.norm.register_forward_pre_hook(lambda m, i: seen.append(1))
    elif change == "strided head":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t())
    elif change == "another head module":
        model.lm_head = torch.nn.Sequential(model.lm_head)
    else:
        model.model.norm = torch.nn.Sequential(model.model.norm)
    out = []
    with torch.inference_mode():
        for fold in (True, False):
            monkeypatch.setattr(modeling, "FOLD_HEAD", fold)
            cache = MHLACache(model.new_state(1))
            model(ids[:, :9], past_key_values=cache, plan=plan)
            out.append(model(ids[:, 9:10], past_key_values=cache, plan=plan).logits)
    assert out[0].shape == (1, 1, 256) and torch.equal(out[0], out[1])
    assert len(seen) == (4 if change.startswith("hook") else 0)
