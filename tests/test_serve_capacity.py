"""The server counts its preallocated state rows against the free memory before allocating them
(serve/capacity.py): too many slots is a one-line error naming what fits, not an out-of-memory
traceback on CUDA or the kernel killing the process mid-serving on the CPU."""
import os

import pytest
import torch
from click.testing import CliRunner

from mhla_stream import MHLAForCausalLM
from mhla_stream.serve import capacity
from mhla_stream.serve.capacity import NotEnoughMemory, check_rows_fit, row_bytes, rows_for

MIB = 2 ** 20


@pytest.fixture(scope="module")
def model():
    return MHLAForCausalLM.from_pretrained("mhla-stories-17m").eval()


def test_row_bytes_is_what_a_state_row_takes(model):
    for dt in (None, torch.bfloat16):
        real = sum(s.nbytes for s in model.new_state(1, state_dtype=dt))
        assert row_bytes(model, state_dtype=dt) == real
    assert row_bytes(model, state_dtype=torch.bfloat16) < row_bytes(model)


def test_rows_that_fit_pass_and_the_rest_are_refused_with_what_fits(model):
    per = row_bytes(model)
    nine = int(9 * per / capacity.HEADROOM) + 1                 # room for 9 rows exactly
    assert check_rows_fit(model, 8, free=nine) == per           # 8 slots + the staging row
    with pytest.raises(NotEnoughMemory) as e:
        check_rows_fit(model, 9, free=nine)
    msg = str(e.value)
    assert "use --max-batch 8 or less" in msg and "--state-dtype bf16" in msg and "\n" not in msg
    assert "--admit-batch 1" not in msg                         # no admission or park rows to leave out
    assert "10.7 MiB a row" in msg and "0.0 GiB" not in msg      # small sizes in MiB
    # 8 admission and 2 park rows: 4 slots + 1 + 4 admission rows (capped at the slots) + 2 > 9, but
    # 3 slots + 1 + 3 + 2 = 9 fit; and what is suggested is what the rows rule accepts
    with pytest.raises(NotEnoughMemory, match="use --max-batch 3 or less; --admit-batch 1 --no-async"):
        check_rows_fit(model, 16, admit_batch=8, park=2, free=nine)
    assert check_rows_fit(model, 3, admit_batch=8, park=2, free=nine) == per
    with pytest.raises(NotEnoughMemory, match="not even one slot fits") as e:
        check_rows_fit(model, 1, free=per, state_dtype=torch.bfloat16)
    assert "--state-dtype bf16" not in str(e.value)             # already the smaller ring
    assert rows_for(1, admit_batch=8) == 2                      # one slot: no admission rows


def test_unknown_free_memory_is_not_a_refusal(model, monkeypatch):
    monkeypatch.setattr(capacity, "free_bytes", lambda device: None)
    assert check_rows_fit(model, 10 ** 6) == row_bytes(model)


def test_the_runner_refuses_before_allocating(model, monkeypatch):
    from mhla_stream.serve.runner import StepRunner
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 3 * row_bytes(model))
    made, new_state = [], type(model).new_state

    def spy(self, *a, **k):
        made.append(str(k.get("device")))
        return new_state(self, *a, **k)
    monkeypatch.setattr(type(model), "new_state", spy)
    with pytest.raises(NotEnoughMemory, match="use --max-batch 1 or less"):
        StepRunner(model, 4, 64)
    assert made and set(made) == {"meta"}                       # counted on the meta device; no real rows


def test_mhla_serve_says_what_fits_and_exits(monkeypatch, tmp_path):
    from mhla_stream.cli import serve as serve_cli
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 64 * MIB)
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    r = CliRunner().invoke(serve_cli.main, ["--device", "cpu", "--max-batch", "64", "--port", "1"])
    assert r.exit_code == 2, r.output
    assert "error: 64 slots need 65 rows of streaming state" in r.output
    assert "use --max-batch 4 or less" in r.output and "Traceback" not in r.output
    left = set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before
    assert not [d for d in left if d.startswith("mhla-sessions-")]   # its temporary sessions folder went too
    r = CliRunner().invoke(serve_cli.main, ["--device", "cpu", "--max-batch", "64", "--port", "1",
                                            "--sessions-dir", str(tmp_path / "new")])
    assert r.exit_code == 2 and not (tmp_path / "new").exists()   # refused before the store makes it
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep").write_text("x")
    r = CliRunner().invoke(serve_cli.main, ["--device", "cpu", "--max-batch", "64", "--port", "1",
                                            "--sessions-dir", str(tmp_path / "s")])
    assert r.exit_code == 2 and (tmp_path / "s" / "keep").read_text() == "x"   # a user's folder is kept
