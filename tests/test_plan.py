"""The execution plan: made in one place, visible, per stream, never written onto a shared model."""
import dataclasses

import pytest
import torch

from mhla_stream import MHLAForCausalLM, StreamingMHLA, preset_config
from mhla_stream.plan import ExecutionPlan, make_plan


def test_cpu_plan_is_torch_prefill_numba_decode_and_describes_itself():
    plan = make_plan("cpu", torch.float32, 1)
    assert (plan.prefill_backend, plan.decode_backend) == ("torch", "numba")
    assert not (plan.fused_decode or plan.fused_projections or plan.cuda_graphs or plan.pdl)
    text = plan.describe()
    for field in dataclasses.fields(ExecutionPlan):
        assert f"{field.name}=" in text
    assert plan.backend_for(1, stateful=True) == "numba" and plan.backend_for(1, stateful=False) == "torch"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.decode_backend = "torch"
    grad = plan.with_gradients(training=True)
    assert (grad.prefill_backend, grad.decode_backend) == ("torch", "torch") and plan.decode_backend == "numba"


@pytest.mark.parametrize("kwargs, error, match", [(dict(backend="cuda"), ValueError, "unknown backend"),
                                                  (dict(policy="everything"), ValueError, "unknown mixing policy"),
                                                  (dict(backend="triton"), RuntimeError, "needs CUDA")])
def test_bad_plan_requests_fail_at_creation(kwargs, error, match, monkeypatch):
    if kwargs.get("backend") == "triton":  # the interpreter makes triton usable on the CPU: switch it off
        from mhla_stream import switches as sw
        monkeypatch.setattr(sw, "switches", lambda: sw.Switches(False, True, True, True))
        monkeypatch.setattr("mhla_stream.plan.switches", sw.switches)
        make_plan.cache_clear()
    try:
        with pytest.raises(error, match=match):
            make_plan("cpu", torch.float32, 1, **kwargs)
    finally:
        make_plan.cache_clear()


def test_bad_stream_backend_leaves_the_model_untouched(tiny_dir):
    model = MHLAForCausalLM.from_pretrained(tiny_dir)
    before = dict(vars(model))
    with pytest.raises(ValueError, match="unknown backend"):
        StreamingMHLA(model, backend="gpu")
    assert vars(model).keys() == before.keys()


def _run(stream, steps):
    """Feeds and generates as scripted; returns every generated id and the final logits."""
    out = []
    for kind, arg in steps:
        if kind == "feed":
            stream.feed(arg)
        else:
            out.append(list(stream.generate_ids(None, max_new_tokens=arg, do_sample=False)))
    return out


def test_two_streams_on_one_model_with_different_plans_interleave(tiny_dir):
    """One model, two streams: torch + window and numba + window+far. Interleaved step by step,
    each gives exactly what it gives alone (the trained edge, L*C = 32 tokens, is crossed)."""
    model = MHLAForCausalLM.from_pretrained(tiny_dir)
    g = torch.Generator().manual_seed(3)
    script = [("feed", torch.randint(3, 300, (n,), generator=g).tolist()) if n > 5 else ("gen", n)
              for n in (21, 4, 30, 3, 9, 5, 40, 4)]
    configs = [dict(backend="torch", policy="window"), dict(backend="numba", policy="window+far")]
    alone = []
    for cfg in configs:
        s = StreamingMHLA(model, **cfg)
        alone.append((_run(s, script), s._logits.clone(), s.position))
    a, b = (StreamingMHLA(model, **cfg) for cfg in configs)
    assert a.plan != b.plan and a.plan.decode_backend == "torch" and b.plan.decode_backend == "numba"
    assert (a.policy, b.policy) == ("window", "window+far")
    together = ([], [])
    for step in script:  # one step of a, then the same step of b
        for s, out in zip((a, b), together):
            out.extend(_run(s, [step]))
    for (ids, logits, position), s, out in zip(alone, (a, b), together):
        assert out == ids and s.position == position == 21 + 4 + 30 + 3 + 9 + 5 + 40 + 4
        assert torch.equal(s._logits, logits)
    assert together[0] != together[1] or not torch.equal(a._logits, b._logits)  # the plans do differ


def test_model_forward_takes_a_plan_per_call():
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).eval()
    ids = torch.randint(3, 256, (1, 40))
    with torch.inference_mode():
        outs = []
        for backend in ("torch", "numba"):
            cache = None
            plan = model.make_plan(1, backend=backend)
            logits = []
            for t in range(ids.shape[1]):  # token by token: the decode backend runs
                out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True, plan=plan)
                cache = out.past_key_values
                logits.append(out.logits)
            assert cache.seen == ids.shape[1] == int(cache.states[0].pos[0])
            outs.append(torch.cat(logits, 1))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_concatenated_weights_follow_weight_changes():
    torch.manual_seed(0)
    model = MHLAForCausalLM(preset_config("mhla-tiny")).eval()
    attn = model.model.layers[0].attn
    first = attn.qkvg_weight.get()
    assert attn.qkvg_weight.get() is first  # made once
    sd = {k: v + 1 if k.endswith("q_proj.weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    again = attn.qkvg_weight.get()
    assert torch.equal(again[: attn.q_proj.weight.shape[0]], attn.q_proj.weight)
    model.to(torch.float64)
    assert attn.qkvg_weight.get().dtype == torch.float64
    ws = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.g_proj.weight]
    assert torch.equal(attn.qkvg_weight.get(), torch.cat(ws, 0))


@pytest.mark.parametrize("raw", ("abc", "-1", "2.5"))
def test_fused_batch_switch_refuses_what_is_not_a_count(raw, monkeypatch):
    from mhla_stream import switches as sw
    monkeypatch.setenv("MHLA_STREAM_FUSED_BATCH", raw)
    with pytest.raises(ValueError, match="MHLA_STREAM_FUSED_BATCH must be a whole number"):
        sw._count("MHLA_STREAM_FUSED_BATCH", 1)
    monkeypatch.setenv("MHLA_STREAM_FUSED_BATCH", " 16 ")
    assert sw._count("MHLA_STREAM_FUSED_BATCH", 1) == 16


def _use_compiler(monkeypatch, compile_fn):
    """``fused.fast`` compiles (on the CPU too) with ``compile_fn`` standing in for torch.compile,
    from an empty cache."""
    from mhla_stream import fused
    monkeypatch.setattr(fused, "_wants_compile", lambda x: True)
    monkeypatch.setattr(fused.torch, "compile", compile_fn)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "_EAGER", set())


@pytest.mark.parametrize("pdl", (True, False))
def test_compiled_kernels_take_programmatic_dependent_launch_with_the_switch(pdl, monkeypatch):
    """The compiled elementwise kernels launch with programmatic dependent launch when
    MHLA_STREAM_PDL is on (inductor's dotted ``triton.enable_pdl``); a function's own options
    stay, and a key this torch does not know is dropped instead of failing the compile."""
    from mhla_stream import fused, switches as sw
    seen = []
    monkeypatch.setattr(fused.torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    monkeypatch.setattr(fused, "switches", lambda: dataclasses.replace(sw.switches(), pdl=pdl))
    fused._compile(fused.rms_norm, {"emulate_precision_casts": True, "no_such.option": 1, "no_such_key": 2})
    assert seen == [{"triton.enable_pdl": pdl, "emulate_precision_casts": True}]


def test_a_compile_failure_runs_the_eager_code(monkeypatch):
    """Dynamo's recompile limit (hit by a process that meets many shapes; with fullgraph it
    raises) or any compiler error: the call computes the eager result and that signature stays
    eager, with one warning. Simulated on the CPU by a compiler that always fails."""
    import torch._dynamo
    from mhla_stream import fused

    calls = []

    def failing_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn.__name__)
            raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit")
        return run

    _use_compiler(monkeypatch, failing_compile)
    norm = fused.fast(fused.rms_norm)
    x, w = torch.randn(3, 8), torch.rand(8)
    with pytest.warns(RuntimeWarning, match="rms_norm runs uncompiled"):
        out = norm(x, w, 1e-6)
    assert torch.equal(out, fused.rms_norm(x, w, 1e-6))
    # tried twice (again under the raised limit), then not again
    assert torch.equal(norm(x, w, 1e-6), out) and calls == ["rms_norm"] * 2
    with pytest.warns(RuntimeWarning):
        norm(x[None], w, 1e-6)  # another rank: tried once more (and falls back again)
    assert calls == ["rms_norm"] * 4


def test_the_recompile_limit_is_raised_for_the_retry(monkeypatch):
    """Past dynamo's limit the call is compiled again under ours (RECOMPILE_LIMIT): it succeeds,
    stays compiled and warns nothing."""
    import warnings
    import torch._dynamo
    from mhla_stream import fused

    limits = []

    def limited_compile(fn, **kwargs):
        def run(*args):
            limits.append(torch._dynamo.config.recompile_limit)
            if torch._dynamo.config.recompile_limit < fused.RECOMPILE_LIMIT:
                raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit")
            return fn(*args)
        return run

    _use_compiler(monkeypatch, limited_compile)
    norm = fused.fast(fused.rms_norm)
    x, w = torch.randn(3, 8), torch.rand(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(norm(x, w, 1e-6), fused.rms_norm(x, w, 1e-6))
    default = torch._dynamo.config.recompile_limit
    assert limits == [default, fused.RECOMPILE_LIMIT] and not fused._EAGER


def test_a_user_error_does_not_turn_compilation_off(monkeypatch):
    """A call that fails in eager too (shapes that do not broadcast: dynamo raises it while
    tracing, wrapped in TorchRuntimeError) raises the eager error, and that signature stays
    compiled for the valid calls after it: no 'runs uncompiled' warning."""
    import warnings
    import torch._dynamo
    from mhla_stream import fused

    calls = []

    def tracing_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn.__name__)
            try:
                return fn(*args)
            except RuntimeError as err:  # what dynamo does with an error met while tracing
                raise torch._dynamo.exc.TorchRuntimeError(str(err)) from err
        return run

    _use_compiler(monkeypatch, tracing_compile)
    add_norm = fused.fast(fused.add_rms_norm)
    x, w = torch.randn(3, 8), torch.rand(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="must match"):
            add_norm(x, torch.randn(3, 7), w, 1e-6)
        add_norm(x, torch.randn(3, 8), w, 1e-6)
    assert calls == ["add_rms_norm", "add_rms_norm"] and not fused._EAGER


@pytest.fixture
def fresh_plans(monkeypatch):
    """make_plan's cache and the switches cleared around a test that sets the environment."""
    from mhla_stream import switches as sw
    make_plan.cache_clear()
    sw.switches.cache_clear()
    yield monkeypatch
    make_plan.cache_clear()
    sw.switches.cache_clear()


@pytest.mark.parametrize("env, batch, picked, fused", [
    (None, 16, False, True), (None, 17, False, False), (None, 32, False, False),   # tuned alone: to 16
    (None, 32, True, True), (None, 17, True, True), (None, 33, True, False),       # picked: to 32
    ("32", 32, False, True), ("8", 16, True, False), ("64", 64, False, True)])     # the switch holds
def test_the_fused_step_runs_past_16_rows_only_with_picks(env, batch, picked, fused, fresh_plans):
    """From 17 rows the fused step beats the batched one only with its products' shapes picked in
    the step (session 22: 1,078 against 1,226 us at 32; tuned alone 1,373): by default it runs
    there only where the picks name them; MHLA_STREAM_FUSED_BATCH, when set, decides alone."""
    if env is None:
        fresh_plans.delenv("MHLA_STREAM_FUSED_BATCH", raising=False)
    else:
        fresh_plans.setenv("MHLA_STREAM_FUSED_BATCH", env)
    plan = make_plan("cuda", torch.bfloat16, batch, rows_picked=picked)
    assert plan.fused_decode == fused and plan.batched_decode == (not fused)


def test_rows_picked_asks_the_picks_for_this_gpu_and_these_widths(fresh_plans):
    from mhla_stream.kernels import step_picks
    from mhla_stream.plan import fused_row_keys, rows_picked
    fresh_plans.setenv("MHLA_STREAM_STEP_PICKS", "/nonexistent/picks.json")  # only the shipped file
    step_picks._loaded.clear()
    name = ["NVIDIA H100 80GB HBM3"]
    fresh_plans.setattr(torch.cuda, "get_device_name", lambda device=None: name[0])
    big, tiny = preset_config("mhla-340m"), preset_config("mhla-tiny")
    try:
        assert rows_picked(big, "cuda", torch.bfloat16, 32) and rows_picked(big, "cuda", torch.bfloat16, 17)
        assert not rows_picked(big, "cuda", torch.bfloat16, 16)  # (tuned alone wins there: no question)
        assert not rows_picked(big, "cuda", torch.bfloat16, 33)
        assert not rows_picked(big, "cuda", torch.float32, 32)   # no fp32 picks shipped
        assert not rows_picked(big, "cuda", torch.float16, 32)   # fp16: per-element norms, other products
        assert not rows_picked(tiny, "cuda", torch.bfloat16, 32)  # other widths
        assert not rows_picked(big, "cpu", torch.bfloat16, 32)
        name[0] = "NVIDIA H200"  # no rows picks shipped for it yet
        assert not rows_picked(big, "cuda", torch.bfloat16, 32)
        step_picks._forced.update({k: (16, 512, 4, 1, None, 2) for k in fused_row_keys(big, torch.bfloat16, 32)})
        assert rows_picked(big, "cuda", torch.bfloat16, 32)  # the step tuner's forced picks count
        step_picks._forced.clear()
        name[0] = "NVIDIA H100 80GB HBM3"
        fresh_plans.setenv("MHLA_STREAM_STEP_PICKS", "0")  # picks off: tuned alone, so the old limit
        assert not rows_picked(big, "cuda", torch.bfloat16, 32)
    finally:
        step_picks._forced.clear()
        step_picks._loaded.clear()


def test_fused_row_keys_are_the_fused_steps_product_keys():
    from test_step_picks import model_keys

    from mhla_stream.plan import fused_row_keys
    for rows in (16, 32):
        assert sorted(fused_row_keys(preset_config("mhla-340m"), torch.bfloat16, rows)) == sorted(model_keys(rows=rows))
