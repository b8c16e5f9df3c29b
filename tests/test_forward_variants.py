"""The Triton forward's layouts (``triton_chunk.set_variant``): "lean" against the
oracle and against "base" (the layout before it).

lean stores the block summaries S in bf16 for stateless 16-bit calls (training, stateless prefill)
and walks V inside the programs of passes 1 and 3; with a state, or with fp32 inputs, S stays
fp32 and the two layouts differ only in the order of the mix pass's fp32 sums (its tiles of 128
target blocks instead of 64). Under TRITON_INTERPRET the walk takes 16 columns a step, so that
V = 32 walks twice; ``_WIDE_PROGRAMS`` patched up tries lean's one-program-per-BV-columns split.
With CUDA the same tests run at the 340M layer shape (T = 5000 then walks V, T <= 300 splits).
"""
import pytest
import torch
from conftest import TOL, rand_qkv, rel_err

from mhla_stream import mhla_attention, mhla_reference
from mhla_stream.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
H, K, V, L, C = (4, 128, 256, 32, 64) if GPU else (2, 16, 32, 3, 16)
# every dtype at the short lengths; the long ones (many mix tiles on a GPU) in bf16, where S is rounded
CASES = [(T, d) for T in (1, 63, 65) for d in (torch.bfloat16, torch.float16, torch.float32)] + \
    [(1000, torch.bfloat16)] + ([(5000, torch.bfloat16), (5000, torch.float32)] if GPU else [])
# lean against base where S is fp32 in both: the mix pass sums in another order (fp32 rounding);
# for 16-bit outputs that can move an output by one ulp of its dtype
ORDER_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 2e-4}


@pytest.fixture
def chunk():
    """The kernel module, with the default layout restored whatever a test sets."""
    from mhla_stream.kernels import triton_chunk
    default = triton_chunk.variant()
    yield triton_chunk
    triton_chunk.set_variant(default)


def per_variant(chunk, fn):
    out, default = {}, chunk.variant()
    for name in chunk.VARIANTS:
        chunk.set_variant(name)
        out[name] = fn()
    chunk.set_variant(default)
    return out


def oracle(q, k, v, m, policy):
    big = q.shape[1] > 4096  # as test_kernels: the float64 oracle of the longest case on the CPU
    return mhla_reference(*(x.cpu() if big else x for x in (q, k, v, m)), block_size=C, policy=policy).to(DEV)


def test_summary_dtype_rule(chunk):
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert chunk.summary_dtype(bf16, False) == bf16 and chunk.summary_dtype(fp16, False) == bf16
    assert chunk.summary_dtype(fp32, False) == fp32
    assert all(chunk.summary_dtype(d, True) == fp32 for d in (bf16, fp16, fp32))      # the state reads S
    assert all(chunk.summary_dtype(d, False, lean=False) == fp32 for d in (bf16, fp16, fp32))


@pytest.mark.parametrize("bad", ["", "fast", "LEAN", None, 1])
def test_unknown_variant_is_refused_and_the_layout_kept(chunk, bad):
    chunk.set_variant("base")
    with pytest.raises(ValueError, match="unknown forward variant"):
        chunk.set_variant(bad)
    assert chunk.variant() == "base"


@pytest.mark.parametrize("T,dtype", CASES, ids=[f"{T}-{str(d)[6:]}" for T, d in CASES])
def test_stateless_lean_matches_oracle_and_base(chunk, T, dtype, monkeypatch):
    """Both policies (the far sum runs once T passes L blocks), a batch with different lengths."""
    policy = "window+far" if T % 2 == 0 else "window"
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=T, device=DEV)
    lengths = torch.tensor([T, max(T - C - 3, 1)], device=DEV)
    ref = oracle(q, k, v, m, policy)

    def run():
        return mhla_attention(q, k, v, m, block_size=C, backend="triton", policy=policy, lengths=lengths)
    outs = per_variant(chunk, run)
    if T == 65:  # also lean's split into one program per BV columns (short calls on a GPU)
        monkeypatch.setattr(chunk, "_WIDE_PROGRAMS", 1 << 30)
        chunk.set_variant("lean")
        outs["lean-split"] = run()
    n1 = int(lengths[1])
    for name, o in outs.items():
        assert o.dtype == dtype
        assert rel_err(o[0], ref[0]) < TOL[dtype], name
        assert rel_err(o[1, :n1], ref[1, :n1]) < TOL[dtype], name
        assert not o[1, n1:].any(), name                                        # padded rows stay 0
    if dtype == torch.float32:  # S is fp32 in both layouts
        assert rel_err(outs["lean"], outs["base"]) < ORDER_TOL[dtype]
    if "lean-split" in outs:  # the same S, the same per-column products
        assert torch.equal(outs["lean-split"], outs["lean"]) if not GPU else \
            rel_err(outs["lean-split"], outs["lean"]) < ORDER_TOL[dtype]


def spy_summaries(chunk, monkeypatch):
    """Records S's dtype at each state advance (the calls with a state)."""
    seen, advance = [], chunk.advance_state

    def spy(state, S, *rest):
        seen.append(S.dtype)
        return advance(state, S, *rest)
    monkeypatch.setattr(chunk, "advance_state", spy)
    return seen


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, None), (torch.bfloat16, "bf16"), (torch.float32, None)],
                         ids=["bf16", "bf16-ring", "fp32"])
def test_state_path_keeps_fp32_summaries(chunk, dtype, state_dtype, monkeypatch):
    """Mid-block starts, different lengths, the trained edge crossed: with a state S stays fp32 in
    the lean layout, and the state it leaves is the base layout's."""
    seen = spy_summaries(chunk, monkeypatch)
    T = C * (L + 3) + 9
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=11, device=DEV)
    ref = oracle(q, k, v, m, "window+far")
    n0 = (C // 2 + 3, C + 5)                 # first call: each sequence stops mid-block, at its own place
    n = T - max(n0)

    def run():
        o1, st = mhla_attention(q[:, :max(n0)], k[:, :max(n0)], v[:, :max(n0)], m, block_size=C, return_state=True,
                                backend="triton", policy="window+far", lengths=torch.tensor(n0, device=DEV),
                                state_dtype=state_dtype)
        take = lambda x: torch.stack([x[0, n0[0]:n0[0] + n], x[1, n0[1]:n0[1] + n]])  # noqa: E731
        o2 = mhla_attention(take(q), take(k), take(v), m, block_size=C, state=st, backend="triton",
                            lengths=torch.tensor((n, n - 1), device=DEV))
        return [o1[0, :n0[0]], o1[1, :n0[1]], o2[0], o2[1, :n - 1]], st
    res = per_variant(chunk, run)
    assert seen == [torch.float32] * 4
    refs = [ref[0, :n0[0]], ref[1, :n0[1]], ref[0, n0[0]:n0[0] + n], ref[1, n0[1]:n0[1] + n - 1]]
    tol = TOL[dtype] if state_dtype is None else TOL[torch.bfloat16]
    (lean, st), (base, st_b) = res["lean"], res["base"]
    for o, o_b, r in zip(lean, base, refs):
        assert rel_err(o, r) < tol and rel_err(o, o_b) < ORDER_TOL[dtype]
    # from S alone: the same values up to fp32 summation order (on a GPU the two layouts' tuned launch
    # configurations may differ; under the interpreter numpy's reductions over the two layouts may
    # sum in another order on another CPU: 1e-8 apart on one machine, bit-equal on another)
    for name in ("ring", "far", "partial"):
        a, b = getattr(st, name), getattr(st_b, name)
        assert rel_err(a, b) < ORDER_TOL[torch.float32] or a.numel() == 0, (name, rel_err(a, b))
    assert rel_err(st.prefix, st_b.prefix) < ORDER_TOL[torch.float32] and torch.equal(st.pos, st_b.pos)


@pytest.mark.parametrize("policy", ["window", "window+far"])
def test_bf16_training_forward_and_gradients_with_lean_summaries(chunk, policy):
    """Training (gradients on) runs the lean forward (S rounded to bf16) and a backward that recomputes
    S and P in fp32: the outputs are the inference call's, and the gradients stay within the bf16
    tolerance of the float64 oracle's autograd, past the trained edge, with different lengths."""
    T = C * (L + 2) + 5
    q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=torch.bfloat16, seed=5, device=DEV)
    do = torch.randn(2, T, H, V, generator=torch.Generator().manual_seed(6)).to(DEV, torch.bfloat16)
    lengths = torch.tensor([T, T - C - 1], device=DEV)
    do[1, T - C - 1:] = 0                      # the loss ignores padded rows
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, m)]
    o = mhla_attention(*xs, block_size=C, backend="triton", policy=policy, lengths=lengths)
    o.backward(do)
    with torch.no_grad():
        o_inf = mhla_attention(q, k, v, m, block_size=C, backend="triton", policy=policy, lengths=lengths)
    assert torch.equal(o.detach(), o_inf)
    # the float64 oracle over the whole batch: with do = 0 on sequence 1's padded rows, the tokens
    # there reach no output that counts, so its gradients are those of the padded call
    ref_xs = [x.detach().double().requires_grad_() for x in (q, k, v, m)]
    ref = mhla_reference(*ref_xs, block_size=C, policy=policy)
    ref.backward(do.double())
    n1 = T - C - 1
    assert rel_err(o[0].detach(), ref[0].detach()) < TOL[torch.bfloat16]
    assert rel_err(o[1, :n1].detach(), ref[1, :n1].detach()) < TOL[torch.bfloat16]
    for name, x, r in zip(("dq", "dk", "dv", "dM"), xs, ref_xs):
        assert rel_err(x.grad, r.grad) < 2e-2, name                   # test_backward's bf16 tolerance


def test_bench_op_traffic_model_and_variant_flag():
    """The figures the GPU run checks: lean's predicted traffic at the 340M layer shape (32k tokens),
    and --variants refusing unknown layouts before touching a GPU."""
    from click.testing import CliRunner

    from mhla_stream.cli.bench_op import forward_bytes, main
    shape = (32768, 4, 128, 256, 64, 32)
    lean, base = forward_bytes(*shape, "lean"), forward_bytes(*shape, "base")
    assert round(lean / 1e6) == 906 and round(base / 1e6) == 1544
    assert round(forward_bytes(*shape, "lean", mix_bi=128) / 1e6) == 872
    assert forward_bytes(*shape, "base", mix_bi=128) == base               # base's tile is fixed
    for bad in ("fast", "lean,fast", ","):
        res = CliRunner().invoke(main, ["--variants", bad])
        assert res.exit_code == 2 and "--variants" in res.output, bad


@pytest.mark.parametrize("value,on", [("0", False), ("off", False), ("FALSE", False), ("1", True), ("", True)])
def test_tune_switch_picks_one_launch_configuration(value, on):
    """MHLA_STREAM_TUNE=0 (the GPU test sweep): one configuration per prefill kernel (the mix pass: one
    per walk, long and short), no timing.
    Read in a fresh process, since the kernel module reads the switch once at import."""
    import os
    import subprocess
    import sys
    env = {k: x for k, x in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MHLA_STREAM_TUNE"] = value
    code = ("from mhla_stream.kernels import triton_chunk as t, triton_common as c; "
            "print(c.TUNE, len(t._CONFIGS), len(t._MIX_CONFIGS))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    tune, n, n_mix = out.stdout.split()
    assert tune == str(on)
    assert (int(n) > 1 and int(n_mix) > 2) if on else (int(n) == 1 and int(n_mix) == 2)
