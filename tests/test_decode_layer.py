"""The persistent batch-1 layer decode (``kernels/triton_decode_layer.py``) against the five-launch
fused decode and the unfused model. Under TRITON_INTERPRET=1 its phases run as separate launches
(the same code, no barriers) over a few programs; on a GPU the one-launch form runs too."""
import pytest
import torch
from conftest import rel_err

from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
from mhla_stream.kernels.triton_decode_layer import decode_layer

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _model(policy="window", dtype=torch.float32, **over):
    torch.manual_seed(0)
    cfg = preset_config("mhla-tiny", mixing_policy=policy, **over)
    model = MHLAForCausalLM(cfg).to(DEV, dtype).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong group or weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("programs, policy, dtype, state_dtype", [(3, "window", torch.float32, None),
                                                                  (7, "window+far", torch.float32, None),
                                                                  (4, "window", torch.float32, "bf16"),
                                                                  (5, "window", torch.bfloat16, None)])
def test_layer_phases_equal_the_five_launches(programs, policy, dtype, state_dtype):
    """Layer by layer, token by token through block closes and past the trained edge: the same
    output and the same state as ``decode_step`` (up to summation order)."""
    model = _model(policy, dtype)
    block = model.model.layers[0]
    cfg = model.config
    ref, new = model.new_state(1, state_dtype=state_dtype)[0], model.new_state(1, state_dtype=state_dtype)[0]
    g = torch.Generator().manual_seed(1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    half = cfg.head_k_dim // 2
    with torch.inference_mode():
        for t in range(cfg.block_size * (cfg.num_blocks + 2) + 3):
            x = torch.randn(1, cfg.hidden_size, generator=g).to(DEV, dtype)
            ang = torch.rand(1, half, generator=g).to(DEV) * 6.28
            cos, sin = ang.cos(), ang.sin()
            a = block.decode_step(x[:, None], cos, sin, ref).view(1, -1)
            b = decode_layer(x, block, new, cos, sin, phases=(1, 2, 3, 4, 5), programs=programs)
            ref.pos += 1
            new.pos += 1
            assert rel_err(b, a) < tol, t
            for name in ("prefix", "partial", "ring", "far"):
                # a bf16 ring: summation order can move a summary across a rounding boundary
                # (and the prefixes mixed from it)
                t_ring = 4e-3 if name in ("ring", "prefix") and state_dtype == "bf16" else tol
                err = rel_err(getattr(new, name).float(), getattr(ref, name).float())
                assert err < t_ring, (t, name, err)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_persistent_decode_gives_the_unfused_logits(dtype):
    model = _model("window", dtype)
    unfused = model.make_plan(1, backend="triton", fused_decode=False)
    persistent = model.make_plan(1, backend="triton", fused_decode=True, persistent_decode=True)
    assert persistent.persistent_decode and not unfused.persistent_decode
    ids = torch.randint(3, 256, (1, 47), device=DEV)
    with torch.inference_mode():
        ref_cache, cache = MHLACache(model.new_state(1)), MHLACache(model.new_state(1))
        model(ids[:, :5], past_key_values=ref_cache, plan=unfused)
        model(ids[:, :5], past_key_values=cache, plan=persistent)
        for t in range(5, 47):
            a = model(ids[:, t:t + 1], past_key_values=ref_cache, plan=unfused).logits
            b = model(ids[:, t:t + 1], past_key_values=cache, plan=persistent).logits
            assert rel_err(b, a) < (1e-5 if dtype == torch.float32 else 3e-2), t
    for s_ref, s in zip(ref_cache.states, cache.states):
        assert torch.equal(s_ref.pos, s.pos)


def test_plan_chooses_the_layer_kernel_at_batch_1_on_cuda_only():
    from mhla_stream.plan import make_plan
    assert not make_plan("cpu", torch.float32, 1).persistent_decode
    assert not make_plan("cpu", torch.float32, 1, backend="triton", fused_decode=False,
                         persistent_decode=True).persistent_decode  # only where the decode is fused


@pytest.mark.skipif(not GPU, reason="the one-launch form needs a GPU (its barriers need resident programs)")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_one_launch_equals_the_phases(dtype):
    model = _model("window+far", dtype, block_size=8)
    block = model.model.layers[1]
    cfg = model.config
    a_state, b_state = model.new_state(1)[1], model.new_state(1)[1]
    half = cfg.head_k_dim // 2
    with torch.inference_mode():
        for t in range(cfg.block_size * (cfg.num_blocks + 2) + 3):
            x = torch.randn(1, cfg.hidden_size, device=DEV).to(dtype)
            ang = torch.rand(1, half, device=DEV) * 6.28
            a = decode_layer(x, block, a_state, ang.cos(), ang.sin(), phases=(1, 2, 3, 4, 5), programs=5)
            b = decode_layer(x, block, b_state, ang.cos(), ang.sin())
            a_state.pos += 1
            b_state.pos += 1
            # other warp counts: other reduction trees, so equal up to summation order
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert rel_err(b, a) < tol, t
            assert rel_err(b_state.prefix, a_state.prefix) < 1e-6 and rel_err(b_state.partial, a_state.partial) < 1e-6


def test_prefetch_hints_cover_whole_lines_only(monkeypatch):
    """The L2 hints' launch arguments: every line of the next weight within the programs' reach,
    and no hint where it cannot apply (off switch, no PDL, a size or address off the line grid)."""
    from mhla_stream.kernels import triton_common as tc
    from mhla_stream import switches as sw
    monkeypatch.setattr(tc, "PDL", True)
    buf = torch.zeros(3072 * 1024 + 64, dtype=torch.bfloat16)
    off = (-buf.data_ptr() % 128) // 2  # a line-aligned start, as CUDA allocations are
    w = buf[off:off + 3072 * 1024].view(3072, 1024)
    assert tc.prefetch_args(buf[off + 1:off + 1 + 3072 * 1024].view(3072, 1024), 64) is None  # off the grid
    t, lines, npf = tc.prefetch_args(w, 64)
    assert t is w and lines == 3072 * 1024 * 2 // 128 and npf * 64 >= lines and npf >= 256
    assert tc.prefetch_args(None, 64) is None
    assert tc.prefetch_args(torch.zeros(3, 7, dtype=torch.bfloat16), 4) is None          # 42 bytes
    assert tc.prefetch_args(w[:, 1:], 64) is None                                        # not contiguous
    monkeypatch.setattr(tc, "switches", lambda: sw.Switches(interpret=False, fused_decode=True, pdl=True,
                                                             compile=True, prefetch=False))
    assert tc.prefetch_args(w, 64) is None
    monkeypatch.setattr(tc, "PDL", False)
