"""Hostile cases for two new surfaces (brief h28): the server's state-row count against free memory
(serve/capacity.py, StepRunner, mhla-serve) and MHLA_STREAM_PREFETCH (kernels/triton_prefetch.py,
the skinny kernels' PF_LINES, modeling.prefetching). The tests named ``*_was_a_bug`` failed before
their fix (each docstring says what was wrong)."""
import builtins
import io
import os

import pytest
import torch
from click.testing import CliRunner

from mhla_stream import MHLACache, MHLAForCausalLM, preset_config
from mhla_stream.serve import capacity
from mhla_stream.serve.capacity import NotEnoughMemory, check_rows_fit, free_bytes, row_bytes

MIB = 2 ** 20


@pytest.fixture(scope="module")
def model():
    return MHLAForCausalLM.from_pretrained("mhla-stories-17m").eval()


def _free_for(rows: int, per: int) -> int:
    """Free memory in which exactly ``rows`` rows of ``per`` bytes fit under the headroom."""
    return int(rows * per / capacity.HEADROOM) + 1


def _runner(model, max_batch, **kw):
    from mhla_stream.serve.runner import StepRunner
    return StepRunner(model, max_batch, 16, cuda_graphs=False, **kw)


# ---------------------------------------------------------------- capacity: /proc/meminfo

def _fake_meminfo(monkeypatch, text=None, error=None):
    real = builtins.open

    def fake(path, *a, **k):
        if path == "/proc/meminfo":
            if error is not None:
                raise error
            return io.StringIO(text)
        return real(path, *a, **k)
    monkeypatch.setattr(capacity, "open", fake, raising=False)  # the module's name lookup finds it first


@pytest.mark.parametrize("text", ["MemTotal: 100 kB\n", "MemAvailable: lots kB\n", "MemAvailable:\n",
                                  "MemAvailable: 1.5 kB\n", ""])
def test_malformed_or_short_meminfo_is_unknown_not_a_crash(monkeypatch, text):
    _fake_meminfo(monkeypatch, text)
    assert free_bytes(torch.device("cpu")) is None


@pytest.mark.parametrize("error", [FileNotFoundError("/proc/meminfo"), PermissionError("denied"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")])
def test_unreadable_meminfo_is_unknown_not_a_crash(monkeypatch, error):
    _fake_meminfo(monkeypatch, error=error)
    assert free_bytes(torch.device("cpu")) is None


def test_meminfo_is_read_in_kib(monkeypatch):
    _fake_meminfo(monkeypatch, "MemTotal: 9 kB\nMemFree: 1 kB\nMemAvailable:   12345 kB\n")
    assert free_bytes(torch.device("cpu")) == 12345 * 1024
    assert free_bytes(torch.device("meta")) is None           # a device it cannot measure: no refusal


# ---------------------------------------------------------------- capacity: counting and the message

def test_exact_boundary_and_the_suggestion_round_trips(model):
    """Whatever --max-batch the refusal names is accepted with the same working rows, one more is not."""
    per = row_bytes(model)
    for rows in (2, 3, 9, 10, 11, 100, 4099):
        for extra in ({}, {"admit_batch": 3}, {"admit_batch": 8, "park": 2}):
            for free in (_free_for(rows, per) - 1, _free_for(rows, per), int(rows * per / capacity.HEADROOM)):
                with pytest.raises(NotEnoughMemory) as e:
                    check_rows_fit(model, 10 ** 6, free=free, **extra)
                msg = str(e.value)
                if "use --max-batch " not in msg:
                    continue
                fit = int(msg.split("use --max-batch ")[1].split()[0])
                check_rows_fit(model, fit, free=free, **extra)
                with pytest.raises(NotEnoughMemory):
                    check_rows_fit(model, fit + 1, free=free, **extra)


def test_one_row_larger_than_free_memory(model):
    with pytest.raises(NotEnoughMemory, match="not even one slot fits") as e:
        check_rows_fit(model, 1, free=row_bytes(model) // 2)
    assert "\n" not in str(e.value) and "--state-dtype bf16" in str(e.value)
    with pytest.raises(NotEnoughMemory, match="not even one slot fits"):
        check_rows_fit(model, 1, free=0)


def test_far_sum_is_counted_in_the_row(model, monkeypatch):
    """window+far holds one more [H, K, V] per layer: a free size where window fits and far does not."""
    far, window = row_bytes(model, "window+far"), row_bytes(model, "window")
    assert far > window
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(4, far) - 1)
    _runner(model, 3, policy="window")
    with pytest.raises(NotEnoughMemory, match="use --max-batch 2 or less"):
        _runner(model, 3, policy="window+far")


def test_bf16_ring_is_counted_in_the_row(model, monkeypatch):
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(4, row_bytes(model, state_dtype="bf16")))
    _runner(model, 3, state_dtype="bf16")
    with pytest.raises(NotEnoughMemory, match="--state-dtype bf16 stores"):
        _runner(model, 3)


def test_admit_batch_above_max_batch_counts_only_the_rows_it_makes(model, monkeypatch):
    """--admit-batch 8 with --max-batch 2 makes 2 admission rows (clamped), and that is what is counted."""
    per = row_bytes(model)
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(5, per))
    r = _runner(model, 2, admit_batch=8)                       # 2 slots + staging + 2 admission rows
    assert r.admit_batch == 2 and r.states[0].ring.shape[0] + r.stager.states[0].ring.shape[0] == 5
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(2, per))
    assert _runner(model, 1, admit_batch=8).admit_batch == 1  # --max-batch 1: no admission rows at all


def test_not_even_one_slot_while_two_fit_was_a_bug(model, monkeypatch):
    """Was a bug (capacity.py):50: ``fit`` subtracts the working rows of the requested --max-batch, but the
    admission rows shrink with --max-batch (min(admit, max_batch), none at 1). With room for 5 rows
    and --admit-batch 8 the refusal says 'not even one slot fits', yet --max-batch 2 starts.
    Fix: search the largest m with m + 1 + (min(admit, m) if min(admit, m) > 1 else 0) + park rows
    <= HEADROOM * free // per_row (pass admit_batch and park to check_rows_fit, not a fixed extra)."""
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(5, row_bytes(model)))
    with pytest.raises(NotEnoughMemory) as e:
        _runner(model, 16, admit_batch=8)
    assert _runner(model, 2, admit_batch=8).max_batch == 2   # two slots do fit...
    assert "not even one slot fits" not in str(e.value)       # ...so this is wrong
    assert "use --max-batch 2 or less" in str(e.value)


def test_a_suggestion_well_below_what_fits_was_a_bug(model, monkeypatch):
    """Was a bug (capacity.py):50 (same cause): room for 12 rows, --admit-batch 8: the refusal says
    --max-batch 3 although 5 starts (5 slots + staging + 5 admission rows = 11)."""
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(12, row_bytes(model)))
    with pytest.raises(NotEnoughMemory) as e:
        _runner(model, 16, admit_batch=8)
    _runner(model, 5, admit_batch=8)
    with pytest.raises(NotEnoughMemory):
        _runner(model, 6, admit_batch=8)
    assert "use --max-batch 5 or less" in str(e.value)


def test_small_sizes_read_as_zero_gib_was_a_bug(model):
    """Was a bug (capacity.py):56: sizes under 0.05 GiB print as '0.0 GiB' ('need 0.0 GiB ... has 0.0 GiB
    free'), and close sizes print the same ('need 0.1 GiB ... has 0.1 GiB free'): the refusal then
    reads as a contradiction. Fix: print MiB below 1 GiB (or two significant digits)."""
    with pytest.raises(NotEnoughMemory) as e:
        check_rows_fit(model, 2, free=15 * MIB)
    assert "0.0 GiB" not in str(e.value)


# ---------------------------------------------------------------- capacity: mhla-serve

def _serve(args):
    from mhla_stream.cli import serve as serve_cli
    return CliRunner().invoke(serve_cli.main, ["--device", "cpu", "--port", "1", *args])


def test_cli_counts_window_far_and_admission_rows(monkeypatch, model):
    per, far = row_bytes(model), row_bytes(model, "window+far")
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(4, far) - 1)
    r = _serve(["--max-batch", "3", "--policy", "window+far"])
    assert r.exit_code == 2 and "use --max-batch 2 or less" in r.output, r.output
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(8, per))
    r = _serve(["--max-batch", "4", "--admit-batch", "8"])      # 4 + staging + 4 admission rows = 9
    assert r.exit_code == 2 and "4 slots need 9 rows" in r.output, r.output
    assert "Traceback" not in r.output


def test_cli_starts_with_the_max_batch_it_suggested(monkeypatch, model, tmp_path):
    """The refusal's --max-batch is accepted: the server gets past building (uvicorn stubbed out)."""
    from mhla_stream.serve import shutdown

    class NoServer:
        started = True

        def run(self):
            pass
    monkeypatch.setattr(shutdown, "draining_server", lambda config, stop: NoServer())
    monkeypatch.setattr(capacity, "free_bytes", lambda device: _free_for(7, row_bytes(model)))
    r = _serve(["--max-batch", "16", "--sessions-dir", str(tmp_path / "s")])
    assert r.exit_code == 2 and "use --max-batch 6 or less" in r.output, r.output
    r = _serve(["--max-batch", "6", "--sessions-dir", str(tmp_path / "s"), "--no-http-process"])
    assert r.exit_code == 0, r.output


def test_cli_keeps_an_existing_sessions_dir_and_its_files(monkeypatch, tmp_path):
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 16 * MIB)
    d = tmp_path / "mine"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    r = _serve(["--max-batch", "8", "--sessions-dir", str(d)])
    assert r.exit_code == 2 and sorted(os.listdir(d)) == ["keep.txt"]


def test_a_refusal_making_the_named_sessions_dir_was_a_bug(monkeypatch, tmp_path):
    """Was a bug (serve/server.py):30: build_server makes the SessionStore (os.makedirs, reading every saved
    session back) before the Engine's StepRunner counts the rows, so a refused start leaves behind a
    folder that did not exist. A failed start should leave things as they were. Fix: call
    check_rows_fit in build_server (runner is None) before SessionStore(...), or make the store after
    the Engine."""
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 16 * MIB)
    d = tmp_path / "new"
    r = _serve(["--max-batch", "8", "--sessions-dir", str(d)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not d.exists()


def test_fake_runner_servers_are_not_counted(monkeypatch):
    """hostbench / serve_bench --fake-model pass their own runner: no state rows, no refusal."""
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 0)
    from mhla_stream.serve.hostbench import build_fake_server
    app = build_fake_server(max_batch=64)
    assert app.state.engine.runner.max_batch == 64


# ---------------------------------------------------------------- MHLA_STREAM_PREFETCH

def _interpreted():
    from mhla_stream.kernels import triton_skinny
    if not triton_skinny.INTERPRET:
        pytest.skip("address recording needs TRITON_INTERPRET=1")


@pytest.fixture
def loads(monkeypatch):
    """Every address the interpreter loads (masked-off lanes left out). The interpreter reads raw host
    memory without any bounds check, so an address past a tensor does NOT fail on its own (checked in
    test_interpreter_does_not_catch_out_of_bounds): the tests have to look at the addresses."""
    _interpreted()
    from triton.runtime import interpreter
    seen = []
    real = interpreter.InterpreterBuilder.create_masked_load

    def record(self, ptrs, mask, other, cache_policy, is_volatile):
        seen.append(ptrs.data[mask.data.astype(bool)].reshape(-1).copy())
        return real(self, ptrs, mask, other, cache_policy, is_volatile)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", record)
    return seen


def _outside(seen, tensors):
    import numpy as np
    addrs = np.concatenate(seen) if seen else np.zeros(0, dtype=np.uint64)
    ok = np.zeros(addrs.shape, dtype=bool)
    for t in tensors:
        lo = t.data_ptr()
        ok |= (addrs >= lo) & (addrs < lo + t.numel() * t.element_size())
    return addrs[~ok]


if not torch.cuda.is_available():  # the interpreter test only
    import triton
    import triton.language as tl

    from mhla_stream.kernels.triton_common import prefetch_l2

    @triton.jit
    def _overrun(p, OFF: tl.constexpr):
        prefetch_l2(p + OFF + tl.arange(0, 4))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # the garbage read
def test_interpreter_does_not_catch_out_of_bounds(loads):
    """Why the recording above is needed: test_prefetch.py's docstring says a line outside a tensor
    'would show' under the interpreter; it does not (a 4096-element overrun reads without error)."""
    t = torch.ones(8, dtype=torch.bfloat16)
    _overrun[(1,)](t, OFF=4096)                                   # no error...
    assert len(_outside(loads, [t])) == 4                        # ...only the recording sees it


SHAPES = [(1,), (63,), (64,), (65,), (3, 7), (0,), (300_001,), (2, 129)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.float64])
def test_prefetch_walks_every_line_and_nothing_outside(loads, dtype):
    """Sizes no multiple of a line, one element, empty, more lines than a round: every 128-byte line
    of each tensor is asked for, and no address outside them."""
    from mhla_stream.kernels.triton_prefetch import prefetch_weights
    for i in range(0, len(SHAPES), 4):
        ts = [torch.zeros(s, dtype=dtype) for s in SHAPES[i:i + 4]]
        loads.clear()
        prefetch_weights(ts)
        assert len(_outside(loads, ts)) == 0
        import numpy as np
        addrs = set(np.concatenate(loads).tolist()) if loads else set()
        for t in ts:
            step = 128  # bytes a line
            want = {t.data_ptr() + b for b in range(0, t.numel() * t.element_size(), step)}
            assert want <= addrs, (t.shape, len(want - addrs))


def test_prefetch_of_a_view_stays_inside_the_view(loads):
    from mhla_stream.kernels.triton_prefetch import prefetch_weights
    base = torch.zeros(1000, dtype=torch.bfloat16)
    view = base[37:437]
    prefetch_weights([view])
    assert len(_outside(loads, [view])) == 0


def test_skinny_prefetch_stays_inside_its_tensors(loads, monkeypatch):
    from mhla_stream.kernels import triton_skinny
    monkeypatch.setattr(triton_skinny, "PREFETCH", True)
    x, w = torch.randn(2, 96).bfloat16(), torch.randn(40, 96).bfloat16()
    for nxt in (torch.randn(3 * 40 + 5, 96).bfloat16(), torch.randn(1).float(), torch.randn(65, dtype=torch.float64)):
        loads.clear()
        y = triton_skinny.skinny_linear(x, w, prefetch=nxt)
        assert len(_outside(loads, [x, w, nxt, y])) == 0
        assert torch.equal(y, triton_skinny.skinny_linear(x, w))


def _tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return MHLAForCausalLM(preset_config("mhla-tiny")).to(dtype).eval()


def _decode(model, ids, *, mask=None, plan=None):
    with torch.inference_mode():
        cache = MHLACache(model.new_state(ids.shape[0]))
        kw = {} if mask is None else {"attention_mask": mask[:, :8]}
        model(ids[:, :8], past_key_values=cache, plan=plan, **kw)
        out = []
        for t in (8, 9):
            kw = {} if mask is None else {"attention_mask": mask[:, t:t + 1]}
            out.append(model(ids[:, t:t + 1], past_key_values=cache, plan=plan, **kw).logits)
    return out, cache.states


@pytest.fixture
def launches(monkeypatch):
    from mhla_stream import modeling
    seen, real = [], modeling.prefetch_weights

    def count(tensors):
        seen.append(len([t for t in tensors if t is not None]))
        return real(tensors)
    monkeypatch.setattr(modeling, "prefetch_weights", count)
    return seen


def test_cpu_model_without_the_interpreter_never_launches_a_prefetch(monkeypatch):
    """MHLA_STREAM_PREFETCH=1 with a CPU model and no interpreter: no Triton launch on CPU tensors."""
    from mhla_stream import modeling
    from mhla_stream.kernels import triton_skinny
    monkeypatch.setattr(triton_skinny, "PREFETCH", True)
    monkeypatch.setattr(triton_skinny, "INTERPRET", False)

    def refuse(tensors):
        raise AssertionError("a Triton prefetch launched on CPU tensors")
    monkeypatch.setattr(modeling, "prefetch_weights", refuse)
    assert not modeling.prefetching(torch.device("cpu"))
    model = _tiny()
    ids = torch.randint(3, 256, (2, 10))
    _decode(model, ids)
    model.generate(ids[:1, :5], max_new_tokens=2, do_sample=False)


def test_ragged_batched_decode_prefetches_and_changes_nothing(monkeypatch, launches):
    """Batched decode with different lengths (a padding mask): the prefetch runs once per layer and
    step, and logits and states are exactly those without it."""
    _interpreted()
    from mhla_stream.kernels import triton_skinny
    model = _tiny()
    ids = torch.randint(3, 256, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    runs = []
    for on in (False, True):
        monkeypatch.setattr(triton_skinny, "PREFETCH", on)
        launches.clear()
        runs.append(_decode(model, ids, mask=mask))
    (a, sa), (b, sb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x.prefix, y.prefix) and torch.equal(x.pos, y.pos) for x, y in zip(sa, sb))
    L = model.config.num_hidden_layers
    assert len(launches) == 2 * L and launches[:L] == [4] * (L - 1) + [3]   # last layer: no next q/k/v/g


def test_generate_and_streaming_with_prefetch_forced_on(monkeypatch, launches):
    _interpreted()
    from mhla_stream import StreamingMHLA
    from mhla_stream.kernels import triton_skinny
    model = _tiny()
    ids = torch.randint(3, 256, (1, 5))
    outs = []
    for on in (False, True):
        monkeypatch.setattr(triton_skinny, "PREFETCH", on)
        g = model.generate(ids, max_new_tokens=3, do_sample=False)
        s = StreamingMHLA(model)
        streamed = list(s.generate_ids(ids[0].tolist(), max_new_tokens=3, temperature=0, stop_at_eos=False))
        outs.append((g, streamed, [t.clone() for t in s.cache.states[0].partial]))
    (g0, s0, p0), (g1, s1, p1) = outs
    assert torch.equal(g0, g1) and s0 == s1 and all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert launches                                      # the decode steps did prefetch


def test_fused_fp32_decode_with_prefetch_is_exact(monkeypatch):
    _interpreted()
    from mhla_stream.kernels import triton_skinny
    model = _tiny()
    plan = model.make_plan(1, backend="triton", fused_decode=True)
    ids = torch.randint(3, 256, (1, 10))
    runs = []
    for on in (False, True):
        monkeypatch.setattr(triton_skinny, "PREFETCH", on)
        runs.append(_decode(model, ids, plan=plan)[0])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_a_non_contiguous_weight_failing_prefetch_was_a_bug(monkeypatch):
    """Was a bug (modeling.py):126 / kernels/triton_prefetch.py:34: a hint that can fail the step. A model whose
    o_proj weight is a non-contiguous view (F.linear takes it; skinny_linear just skips such a prefetch,
    triton_skinny.py:141) decodes without the switch, but with MHLA_STREAM_PREFETCH=1 batched decode
    raises 'prefetch_weights takes up to four contiguous tensors'. Fix: _prefetch_lists (or the call at
    modeling.py:126) keeps only contiguous tensors of the first's dtype and device, as skinny_linear does;
    prefetch_weights' own ValueError stays for direct callers."""
    _interpreted()
    from mhla_stream.kernels import triton_skinny
    model = _tiny()
    o = model.model.layers[0].attn.o_proj
    o.weight.data = o.weight.data.t().contiguous().t()
    assert not o.weight.is_contiguous()
    ids = torch.randint(3, 256, (2, 10))
    monkeypatch.setattr(triton_skinny, "PREFETCH", False)
    want, _ = _decode(model, ids)
    monkeypatch.setattr(triton_skinny, "PREFETCH", True)
    got, _ = _decode(model, ids)
    assert all(torch.equal(x, y) for x, y in zip(want, got))
