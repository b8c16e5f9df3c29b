"""Hostile cases for the server's state-row count against free memory (brief h28; serve/capacity.py,
StepRunner, mhla-serve). The tests named ``*_was_a_bug`` failed before
their fix (each docstring says what was wrong)."""
import builtins
import io
import os

import pytest
import torch
from click.testing import CliRunner

from mhla_stream import MHLAForCausalLM
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

