"""The one-row MLP in one launch (``triton_mlp``) and the fp32 sum it leaves for the next layer:
against torch, and the batch-1 decode step with it against the step without it. Runs under
TRITON_INTERPRET=1 on a CPU, natively on a GPU."""
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
from mhla_stream.fused import rms_norm, swiglu
from mhla_stream.kernels import triton_mlp
from mhla_stream.kernels.triton_skinny import skinny_linear

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("K,N", ((96, 40), (64, 16), (48, 100)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_mlp_row_adds_the_two_products(K, N, dtype):
    """acc (holding h) += SwiGLU(RMSNorm(h)) W_down^T; widths not multiples of the tiles."""
    h = _rand(1, K, dtype=dtype, seed=1)
    wgu = _rand(2 * N, K, dtype=dtype, seed=2) / K ** 0.5
    wd = _rand(K, N, dtype=dtype, seed=3) / N ** 0.5
    nw = _rand(K, dtype=dtype, seed=4)
    a = swiglu(F.linear(rms_norm(h, nw, 1e-6), wgu[:N]), F.linear(rms_norm(h, nw, 1e-6), wgu[N:]))
    ref = h.float() + F.linear(a, wd).float()
    acc = h.float().clone()
    triton_mlp.mlp_row_into(acc, h, wgu, nw, wd, 1e-6)
    assert rel_err(acc, ref) < (2e-5 if dtype == torch.float32 else 1e-2)
    again = h.float().clone()
    triton_mlp.mlp_row_into(again, h, wgu, nw, wd, 1e-6)
    assert rel_err(again, acc) < 1e-6  # (the atomics' order may differ: fp32-sized)


@pytest.mark.parametrize("bad", ("shape", "acc dtype", "strided down"))
def test_mlp_row_refuses_wrong_operands(bad):
    K, N = 64, 16
    h, acc = _rand(1, K, dtype=torch.float32, seed=1), torch.zeros(1, K, device=DEV)
    wgu, wd, nw = _rand(2 * N, K, dtype=torch.float32, seed=2), _rand(K, N, dtype=torch.float32, seed=3), torch.ones(K)
    if bad == "shape":
        h = _rand(2, K, dtype=torch.float32, seed=1)
    elif bad == "acc dtype":
        acc = acc.bfloat16()
    else:
        wd = _rand(N, K, dtype=torch.float32, seed=3).t()
    before = acc.clone()
    with pytest.raises(AssertionError):
        triton_mlp.mlp_row_into(acc, h, wgu, nw.to(DEV), wd, 1e-6)
    assert torch.equal(acc, before)


def test_skinny_reads_an_fp32_sum_rounded_and_writes_an_fp32_copy():
    """The next layer's products take the fp32 sum as if its writer had rounded it to bf16."""
    K, N, V = 96, 40, 32
    x32 = _rand(1, K, dtype=torch.float32, seed=5) * 3
    x16 = x32.bfloat16()
    w = _rand(N, K, dtype=torch.bfloat16, seed=6) / K ** 0.5
    nw, res32 = _rand(K, dtype=torch.bfloat16, seed=7), _rand(1, N, dtype=torch.float32, seed=8)
    a = skinny_linear(x32, w, norm_weight=nw, out_dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, skinny_linear(x16, w, norm_weight=nw))
    g = _rand(1, K, dtype=torch.bfloat16, seed=9)
    acc = torch.full((1, N), float("nan"), device=DEV)
    b = skinny_linear(x16, w, norm_weight=nw[:V], group=V, gate=g, residual=res32, out_dtype=torch.bfloat16,
                      acc_out=acc)
    assert torch.equal(b, skinny_linear(x16, w, norm_weight=nw[:V], group=V, gate=g, residual=res32.bfloat16()))
    assert torch.equal(acc, b.float())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_batch_one_step_with_and_without_the_one_launch_mlp(monkeypatch, dtype):
    """The fused batch-1 step with the MLP in one launch against the step with two products,
    across block closes and the trained edge; the one-launch form is the one that ran."""
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV, dtype).eval()
    plan = model.make_plan(1, backend="triton", fused_decode=True)
    assert plan.fused_decode
    calls = []
    real = triton_mlp.mlp_row_into
    monkeypatch.setattr(triton_mlp, "mlp_row_into", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(3, 256, (1, 40), device=DEV)
    with torch.inference_mode():
        caches = [MHLACache(model.new_state(1)), MHLACache(model.new_state(1))]
        for c in caches:
            model(ids[:, :5], past_key_values=c, plan=plan)
        for t in range(5, 40):
            logits = []
            for on, c in zip((True, False), caches):
                monkeypatch.setattr(triton_mlp, "ENABLED", on)
                logits.append(model(ids[:, t:t + 1], past_key_values=c, plan=plan).logits)
            assert logits[0].dtype == dtype
            assert rel_err(logits[0], logits[1]) < (1e-5 if dtype == torch.float32 else 3e-2), t
    assert len(calls) == 35 * model.config.num_hidden_layers
