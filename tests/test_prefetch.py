"""MHLA_STREAM_PREFETCH: decode asks L2 for the weights of the products ahead (the batch-1 skinny
kernels for the next projection, a prefetch kernel after the operator in batched decode). A hint
only: every test here checks that logits and states are exactly those of the same run without it.
Under the interpreter a prefetch is a plain load of the same lines; the interpreter does not check
bounds, so test_attack_capacity_prefetch.py records every address it loads and checks them against the
tensors. The tests switch the prefetch on for the kernel module (the variable is read at import)."""
import pytest
import torch
from conftest import rel_err  # noqa: F401

from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
from mhla_stream.kernels.triton_skinny import skinny_linear

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("value,on", [(None, False), ("0", False), ("off", False), ("", False), ("1", True),
                                      ("on", True)])
def test_prefetch_switch_is_off_unless_asked(monkeypatch, value, on):
    from mhla_stream import switches as sw
    if value is None:
        monkeypatch.delenv("MHLA_STREAM_PREFETCH", raising=False)
    else:
        monkeypatch.setenv("MHLA_STREAM_PREFETCH", value)
    sw.switches.cache_clear()
    try:
        assert sw.switches().prefetch is on
    finally:
        monkeypatch.undo()
        sw.switches.cache_clear()


@pytest.mark.parametrize("M", (1, 3))
def test_skinny_prefetch_is_a_hint_only(M, monkeypatch):
    """The next weights to prefetch change nothing in the result. The prefetch is switched on for
    the kernel module (MHLA_STREAM_PREFETCH=1 is read once at import); under the interpreter the
    prefetch is a plain load of the same lines, so a line outside the tensor would show here."""
    from mhla_stream.kernels import triton_skinny
    monkeypatch.setattr(triton_skinny, "PREFETCH", True)
    K, N = 96, 40
    x, w = _rand(M, K, dtype=torch.bfloat16, seed=M), _rand(N, K, dtype=torch.bfloat16, seed=1) / K ** 0.5
    nxt = _rand(3 * N + 5, K, dtype=torch.bfloat16, seed=7)  # a size that is no multiple of a cache line
    res = _rand(M, N, dtype=torch.bfloat16, seed=3)
    assert torch.equal(skinny_linear(x, w, residual=res, prefetch=nxt), skinny_linear(x, w, residual=res))


@pytest.mark.parametrize("batch, fused", [(1, True), (3, False)])
def test_decode_with_prefetch_gives_the_same_logits(monkeypatch, batch, fused):
    """Fused batch-1 decode (each layer's last projection reaching into the next layer) and batched
    decode (the prefetch kernel after the operator) give exactly the logits and states without it."""
    from mhla_stream.kernels import triton_prefetch, triton_skinny
    launches = []
    monkeypatch.setattr(triton_prefetch, "_prefetch_kernel", _Counting(triton_prefetch._prefetch_kernel, launches))
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV, torch.bfloat16).eval()
    plan = model.make_plan(batch, backend="triton", fused_decode=fused)
    ids = torch.randint(3, 256, (batch, 12), device=DEV)
    runs = []
    for on in (False, True):
        monkeypatch.setattr(triton_skinny, "PREFETCH", on)
        with torch.inference_mode():
            cache = MHLACache(model.new_state(batch))
            model(ids[:, :9], past_key_values=cache, plan=plan)
            logits = [model(ids[:, t:t + 1], past_key_values=cache, plan=plan).logits for t in range(9, 12)]
        runs.append((logits, cache.states))
    (a, sa), (b, sb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x.prefix, y.prefix) and torch.equal(x.partial, y.partial) for x, y in zip(sa, sb))
    # batched: one prefetch launch per layer and decode step, only while switched on
    assert len(launches) == (0 if fused else 3 * model.config.num_hidden_layers)


class _Counting:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_prefetch_weights_refuses_what_it_cannot_walk():
    from mhla_stream.kernels.triton_prefetch import prefetch_weights
    w = _rand(8, 8, dtype=torch.bfloat16, seed=0)
    prefetch_weights([])                                                   # nothing to do
    prefetch_weights([w, None])                                            # None entries are skipped
    with pytest.raises(ValueError, match="up to four"):
        prefetch_weights([w] * 5)
    with pytest.raises(ValueError, match="one dtype"):
        prefetch_weights([w, w.float()])
    with pytest.raises(ValueError, match="contiguous"):
        prefetch_weights([w.t()])


def test_batched_decode_with_nothing_to_prefetch_launches_nothing(monkeypatch):
    """Weights no prefetch can walk (another device, a view): empty lists, no launch, decode goes on."""
    from mhla_stream import modeling
    from mhla_stream.kernels import triton_prefetch, triton_skinny
    launches = []
    monkeypatch.setattr(triton_prefetch, "_prefetch_kernel", _Counting(triton_prefetch._prefetch_kernel, launches))
    monkeypatch.setattr(triton_skinny, "PREFETCH", True)
    monkeypatch.setattr(modeling, "_prefetchable", lambda w, device: None)
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).to(DEV, torch.bfloat16).eval()
    assert model.model._prefetch_lists(torch.device(DEV)) == [[], []]
    plan = model.make_plan(2, backend="triton", fused_decode=False)
    ids = torch.randint(3, 256, (2, 10), device=DEV)
    with torch.inference_mode():
        cache = MHLACache(model.new_state(2))
        model(ids[:, :9], past_key_values=cache, plan=plan)
        assert torch.isfinite(model(ids[:, 9:], past_key_values=cache, plan=plan).logits).all()
    assert launches == []
