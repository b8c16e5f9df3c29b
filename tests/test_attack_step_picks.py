"""Hostile picks files, picks and flags against kernels/step_picks.py, decode_tuning.py and
cli/tune_decode.py (CPU: the device name faked, the Triton tuner run in the interpreter)."""
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
from click.testing import CliRunner

from mhla_stream.kernels import step_picks as picks

H100 = "NVIDIA H100 80GB HBM3"
PICK = {"BN": 4, "BK": 1024, "num_warps": 4, "num_stages": 1, "maxnreg": 128}
GOOD = {"format": 1, "devices": {"GPU": {"products": {"k": PICK}}}}
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("MHLA_STREAM_STEP_PICKS", str(tmp_path / "user.json"))
    picks._loaded.clear()
    picks._forced.clear()
    picks._rejected.clear()
    picks.used.clear()
    yield
    picks._loaded.clear()
    picks._forced.clear()
    picks._rejected.clear()
    picks.used.clear()


def release(fifo):
    """Opens ``fifo`` for writing and closes it: a reader blocked on it (the code under test
    before its fix) gets its end of file, so that the test process can end."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting


def within(seconds, fn):
    """fn() in a daemon thread: its result, or a failure if it is still blocked after ``seconds``."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def skipped(path, device="GPU"):
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert picks.read(str(path), device) == {}


# --- hostile files: read() skips them with a warning, never raises or blocks ---------------------

@pytest.mark.parametrize("content", [
    b"[" * 100_000 + b"]" * 100_000,                                   # nesting past the recursion limit
    b'{"format": 1, "devices": {"GPU": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001 + b"}",
    b'{"format": 1, "devices": {"GPU": {"products": {"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}}}",
], ids=["top", "device", "pick"])
def test_deeply_nested_json_is_skipped_not_a_crash(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    skipped(path)


def test_a_fifo_in_place_of_the_file_does_not_block_the_decode(tmp_path):
    path = tmp_path / "p.json"
    os.mkfifo(path)  # open() for reading would wait for a writer forever
    try:
        with pytest.warns(RuntimeWarning, match="skipped"):
            assert within(10, lambda: picks.read(str(path), "GPU")) == {}
    finally:
        release(path)


def test_a_character_device_is_skipped(tmp_path):
    """/dev/zero: an endless read (in a process of its own with 2 GiB of memory past its imports:
    a read that never ends must not take this one down)."""
    code = ("import resource, warnings; from mhla_stream.kernels import step_picks; "
            "vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize')][0]; "
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY)); "
            "warnings.simplefilter('always'); "
            "print(step_picks.read('/dev/zero', 'GPU'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and p.stdout.strip() == "{}" and "skipped" in p.stderr, p.stderr[-2000:]


def enormous(path, size=64 << 20):
    """A valid picks file padded with spaces to ``size`` bytes (read whole, it would be taken)."""
    with open(path, "wb") as f:
        f.write(json.dumps(GOOD).encode())
        f.write(b" " * (size - f.tell()))


def test_an_enormous_file_is_skipped_without_being_read(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    enormous(path)
    loads = []
    monkeypatch.setattr(picks.json, "load", lambda *a, **k: loads.append(1))
    monkeypatch.setattr(picks.json, "loads", lambda *a, **k: loads.append(1))
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert within(10, lambda: picks.read(str(path), "GPU")) == {}
    assert loads == []  # refused by its size, not parsed


def test_a_large_but_valid_file_is_skipped_too(tmp_path):
    path = tmp_path / "p.json"
    data = json.loads(json.dumps(GOOD))
    data["devices"]["GPU"]["note"] = "x" * (picks.MAX_BYTES + 1)
    path.write_text(json.dumps(data))
    skipped(path)


def test_a_symlink_loop_is_skipped(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    os.symlink(b, a)
    os.symlink(a, b)
    skipped(a)


def test_a_symlink_to_a_picks_file_is_read(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text(json.dumps(GOOD))
    os.symlink(real, link)
    assert picks.read(str(link), "GPU") == {"k": (4, 1024, 4, 1, 128, 1)}


def test_a_path_through_a_file_is_skipped(tmp_path):
    (tmp_path / "file").write_text("x")
    skipped(tmp_path / "file" / "p.json")


@pytest.mark.skipif(ROOT, reason="root reads any file")
def test_a_file_without_read_permission_is_skipped(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))
    path.chmod(0)
    skipped(path)


@pytest.mark.parametrize("content", [
    b'{"format": 1, "devices": {"GPU": {"products": {"k": {"BN": NaN, "BK": Infinity, "num_warps": -Infinity}}}}}',
    b'{"format": 1, "devices": {"GPU": {"products": {"k": {"BN": 1e999, "BK": 1024, "num_warps": 4}}}}}',
    b'{"format": 1, "devices": {"GPU": {"products": {"k": {"BN": ' + b"4" * 5000 + b', "BK": 1024, "num_warps": 4}}}}}',
    b'{"format": 1, "devices": {"GPU": {"products": {"k": {"BN": 4, "BK": 1024, "num_warps": {"a": [1, {}]}}}}}}',
    b'{"format": 1, "devices": {"GPU": {"products": {"k": null}}}}',
    b'\xef\xbb\xbf{"format": 1, "devices": {}}',                      # a byte-order mark
    b'{"format": 1, "devices": {"GPU": {"products": {"k": "\xff\xfe"}}}}',  # not UTF-8 inside a string
    b"",
    b"\x00" * 1000,
], ids=lambda c: repr(c[:40]))
def test_hostile_values_never_raise(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning):
        assert picks.read(str(path), "GPU") == {}


def test_a_warning_about_huge_keys_stays_short(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": 1, "devices": {"GPU": {"products": {"k" * 100_000: {"BN": 3}}}}}))
    with pytest.warns(RuntimeWarning, match="invalid launch shapes") as w:
        assert picks.read(str(path), "GPU") == {}
    assert len(str(w[0].message)) < 1000


def test_a_hostile_user_file_does_not_stop_the_prune(tmp_path, monkeypatch):
    """Through the pruning (what a decode runs): the user file nested past the recursion limit."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    open(os.environ["MHLA_STREAM_STEP_PICKS"], "w").write("[" * 100_000)
    x = type("X", (), {"is_cuda": True, "dtype": torch.bfloat16, "device": "cuda:0"})()
    prune = picks.pruner(lambda *a: True)
    args = {"x_ptr": x, "N": 3072, "K": 1024, "GS": 1024, "M": 1}
    with pytest.warns(RuntimeWarning, match="skipped"):
        (cfg,) = prune(["tuned"], args, NORM=True)  # the shipped pick, the user file skipped
    assert picks.as_pick(cfg) == picks.read(picks.SHIPPED, H100)["N3072 K1024 G1024 norm bf16"]


# --- valid_pick: only whole numbers, only tiles a launch can take -------------------------------

@pytest.mark.parametrize("bad", [
    dict(PICK, num_warps=True), dict(PICK, num_warps=4.0), dict(PICK, num_warps=1.0),
    dict(PICK, BN=128, BK=16384), dict(PICK, BN=64, BK=8192),  # a tile of a million elements: minutes of compile
    dict(PICK, SPLIT=True), dict(PICK, num_stages=True), dict(PICK, maxnreg=True), dict(PICK, maxnreg=128.0),
])
def test_valid_pick_refuses_bools_floats_and_huge_tiles(bad):
    assert picks.valid_pick(bad) is None


def test_valid_pick_takes_every_shape_the_tuners_would():
    from mhla_stream.decode_tuning import candidates
    from mhla_stream.kernels import skinny_shapes
    for key in ("N3072 K1024 G1024 norm bf16", "N5632 K1024 G1024 norm swiglu bf16", "N1024 K2816 G2816 residual bf16",
                "N1024 K16384 G16384 bf16"):
        for c in candidates(key):
            assert picks.valid_pick(dict(zip(picks.FIELDS, c))) == c, (key, c)
    for c in skinny_shapes._DOT + skinny_shapes._GEMV:
        for w in (4, 8):
            p = picks.as_pick(c)[:2] + (w,) + picks.as_pick(c)[3:]
            assert picks.valid_pick(dict(zip(picks.FIELDS, p))) == p


# --- write(): never over something that is not a picks file, old file whole on failure ------------

def test_write_refuses_a_fifo_without_blocking(tmp_path):
    path = tmp_path / "p.json"
    os.mkfifo(path)
    try:
        with pytest.raises(ValueError, match="move"):
            within(10, lambda: picks.write(str(path), "GPU", {"k": (4, 1024, 4, 1, None, 1)}))
    finally:
        release(path)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_write_refuses_deep_nesting_with_a_clear_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="move"):
        picks.write(str(path), "GPU", {"k": (4, 1024, 4, 1, None, 1)})
    assert path.read_text() == "[" * 100_000


def test_write_refuses_a_symlink_loop(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(ValueError, match="move"):
        picks.write(str(a), "GPU", {"k": (4, 1024, 4, 1, None, 1)})
    assert os.path.islink(a) and os.readlink(a) == str(b)


def test_write_through_a_symlink_updates_its_target(tmp_path):
    """A picks file kept elsewhere and linked into ~/.cache: the merge lands in the target, the
    link stays a link."""
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text(json.dumps(GOOD))
    os.symlink(real, link)
    picks.write(str(link), "GPU", {"new": (2, 512, 8, 3, None, 1)})
    assert os.path.islink(link)
    assert picks.read(str(real), "GPU") == {"k": (4, 1024, 4, 1, 128, 1), "new": (2, 512, 8, 3, None, 1)}


def test_write_keeps_the_files_permissions(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))
    path.chmod(0o644)  # a file shared with other users: they must still read it
    picks.write(str(path), "GPU", {"new": (2, 512, 8, 3, None, 1)})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_write_refuses_an_enormous_file(tmp_path):
    path = tmp_path / "p.json"
    enormous(path)
    with pytest.raises(ValueError, match="move"):
        within(10, lambda: picks.write(str(path), "GPU", {"k": (4, 1024, 4, 1, None, 1)}))
    assert os.path.getsize(path) == 64 << 20


@pytest.mark.parametrize("content", [
    b'{"format": 1, "devices": {"GPU": {"products": {"old": {"BN": NaN}}, "note": [1, 2]}}}',
    b'{"format": 1, "devices": {"Other": [1, 2, 3]}, "extra": {"kept": true}}',
])
def test_write_into_an_odd_but_valid_picks_file_keeps_the_rest(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    picks.write(str(path), "GPU", {"new": (2, 512, 8, 3, None, 1)}, note="n")
    with pytest.warns(RuntimeWarning) if b"NaN" in content else _nothing():
        assert picks.read(str(path), "GPU")["new"] == (2, 512, 8, 3, None, 1)
    before, after = json.loads(content), json.loads(path.read_text())
    for device in before["devices"]:
        if device != "GPU":
            assert after["devices"][device] == before["devices"][device]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("rename failed")
    monkeypatch.setattr(picks.os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        picks.write(str(path), "GPU", {"new": (2, 512, 8, 3, None, 1)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["p.json"]


def test_a_device_name_with_odd_characters_round_trips(tmp_path):
    path = str(tmp_path / "p.json")
    name = 'GPU "x"\n\\ \u00e9 \U0001F600'
    picks.write(path, name, {"k": (4, 1024, 4, 1, None, 1)})
    assert picks.read(path, name) == {"k": (4, 1024, 4, 1, None, 1)}


# --- the product keys: the autotuner's cache key (decode_tuning._current) against launch_key ------

# (interpreter only: CPU tensors through the real tuner. On a GPU the step tuner checks the same
# thing every run: tune_step refuses to go on unless _current names every product the step launched)
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only (CPU tensors through the real tuner)")
@pytest.mark.parametrize("rows", [1, 4])
def test_current_names_the_products_as_the_pruning_does(monkeypatch, rows):
    """The real Triton tuner (interpreted, a forced pick: one configuration, nothing timed): the
    key _current builds from the tuner's cache is the key launch_key recorded in ``used``."""
    from mhla_stream import decode_tuning
    from mhla_stream.kernels import triton_skinny as ts
    monkeypatch.setattr(ts, "INTERPRET", False)
    ts.forget_tuning()
    torch.manual_seed(0)
    K, N, G = 128, 32, 64
    x, w, nw = torch.randn(rows, K), torch.randn(N, K), torch.randn(G)
    res = torch.randn(rows, N)
    key = picks.product_key(N, K, G, True, False, False, True, torch.float32, rows=16 if rows > 1 else 1,
                            late=rows > 1)  # (rows: the late norm, a split a group)
    pick = (4, 128, 4, 1, None, 1) if rows == 1 else (16, 64, 4, 1, None, 2)
    picks._forced[key] = pick
    try:
        y = ts.skinny_linear(x, w, norm_weight=nw, group=G, residual=res)
        assert set(picks.used) == {key} and picks.used[key][0] == pick
        assert decode_tuning._current() == {key: pick}
    finally:
        ts.forget_tuning()
    xg = x.view(rows, -1, G)
    ref = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + 1e-6) * nw).view(rows, K) @ w.t() + res
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)


# --- the CLI: bad flags and paths refused before any work, never over a foreign file -------------

def run_cli(*args, env=None):
    from mhla_stream.cli import tune_decode
    return CliRunner().invoke(tune_decode.main, list(args), env=env)


@pytest.mark.parametrize("batch", ["", "0", "-1", "1,,8", "a", "4097", "1.5", "1;8", "9" * 5000],
                         ids=lambda b: repr(b[:10]))
def test_cli_bad_batches(batch):
    r = run_cli("--batch", batch, "--dry-run")
    assert r.exit_code == 2 and "--batch" in r.output


def test_cli_bad_batches_are_refused_under_python_O(tmp_path):
    """The check must not be an assert (stripped by python -O)."""
    code = ("import sys; from click.testing import CliRunner; from mhla_stream.cli import tune_decode; "
            "r = CliRunner().invoke(tune_decode.main, ['--batch', '0', '--dry-run']); "
            "print(r.output); sys.exit(r.exit_code)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 2 and "--batch" in p.stdout, p.stdout + p.stderr


def test_cli_refuses_an_output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("--out", str(tmp_path / "file" / "sub" / "p.json"))
    assert r.exit_code == 2 and "not a writable file path" in r.output
    assert (tmp_path / "file").read_text() == "x"


def test_cli_refuses_a_json_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("--dry-run", "--json", str(tmp_path / "file" / "deep" / "t.json"))
    assert r.exit_code == 2 and "not a writable file path" in r.output


def test_cli_refuses_the_trials_over_the_picks_file(tmp_path):
    """--json naming the picks file would overwrite the picks with the trials, and then the merge
    would refuse the file it had just written."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))
    for other in (str(path), str(tmp_path / "." / "p.json")):
        r = run_cli("--out", str(path), "--json", other)
        assert r.exit_code == 2 and "--json" in r.output
    os.symlink(path, tmp_path / "link.json")
    r = run_cli("--out", str(path), "--json", str(tmp_path / "link.json"))
    assert r.exit_code == 2 and "--json" in r.output
    # the default picks file (the environment's) too
    r = run_cli("--json", str(path), env={"MHLA_STREAM_STEP_PICKS": str(path)})
    assert r.exit_code == 2 and "--json" in r.output
    assert json.loads(path.read_text()) == GOOD


def test_cli_refuses_a_fifo_as_output_without_blocking(tmp_path):
    path = tmp_path / "p.json"
    os.mkfifo(path)
    try:
        r = within(30, lambda: run_cli("--out", str(path)))
    finally:
        release(path)
    assert r.exit_code == 2 and "move it away" in r.output


def test_cli_refuses_a_deeply_nested_output_with_a_message(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("[" * 100_000)
    r = run_cli("--out", str(path))
    assert r.exit_code == 2 and "move it away" in r.output and path.read_text() == "[" * 100_000


def test_cli_write_failure_at_the_end_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    """The picks file replaced by something else while the (minutes-long) tuning ran."""
    from mhla_stream import decode_tuning
    from mhla_stream.cli import common
    path = tmp_path / "p.json"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(common, "load_model", lambda *a, **k: FakeModel())

    def tune(m, batch, passes, log):
        path.write_text("not picks any more")
        return {"picks": {"k": (4, 1024, 4, 1, None, 1)}, "start_us": 2.0, "best_us": 1.0, "trials": []}
    monkeypatch.setattr(decode_tuning, "tune_step", tune)
    r = run_cli("--out", str(path), "--batch", "1")
    assert r.exit_code == 2 and "move it away" in r.output, r.output
    assert path.read_text() == "not picks any more"
    assert '"k"' in r.output  # the measured picks were printed before the refusal


@pytest.mark.parametrize("batch", ["1,1", "2,8", "8,16", "17,32"])
def test_cli_refuses_batches_of_one_row_block(batch):
    """Batches 2-16 launch the same products (the row block of 16): the second tune_step found
    them all in force and raised after the first batch's minutes of timing, nothing written."""
    r = run_cli("--batch", batch, "--dry-run")
    assert r.exit_code == 2 and "same products" in r.output


class FakeModel:
    def __init__(self, fused_up_to=16):
        self.fused_up_to = fused_up_to

    def make_plan(self, batch, cuda_graphs=True, rows_picked=False):
        assert rows_picked  # the CLI asks for the fused step as it runs once picked (17-32 rows need picks)
        fused = batch <= self.fused_up_to
        return type("Plan", (), {"fused_decode": fused, "describe": lambda self: f"fused={fused}"})()


def fake_gpu(monkeypatch, model, tune):
    from mhla_stream import decode_tuning
    from mhla_stream.cli import common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(common, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(decode_tuning, "tune_step", tune)


def test_cli_refuses_a_batch_without_the_fused_step_before_timing_any(tmp_path, monkeypatch):
    path, tuned = tmp_path / "p.json", []

    def tune(m, batch, passes, log):
        tuned.append(batch)
        return {"picks": {f"b{batch}": (4, 1024, 4, 1, None, 1)}, "start_us": 2.0, "best_us": 1.0, "trials": []}
    fake_gpu(monkeypatch, FakeModel(fused_up_to=16), tune)
    r = run_cli("--out", str(path), "--batch", "1,64")
    assert r.exit_code == 2 and "--batch 64" in r.output and tuned == [] and not path.exists()


def test_cli_writes_and_merges_with_a_faked_tuning(tmp_path, monkeypatch):
    from mhla_stream import decode_tuning
    from mhla_stream.cli import common
    path, trials = tmp_path / "p.json", tmp_path / "t.json"
    path.write_text(json.dumps(GOOD))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(common, "load_model", lambda *a, **k: FakeModel())
    monkeypatch.setattr(decode_tuning, "tune_step", lambda m, batch, passes, log: {
        "picks": {f"b{batch}": (4, 1024, 4, 1, None, 1)}, "start_us": 2.0, "best_us": 1.0,
        "trials": [{"us": 1.0, "picks": {f"b{batch}": (4, 1024, 4, 1, None, 1)}}]})
    r = run_cli("--out", str(path), "--batch", "1,8", "--json", str(trials))
    assert r.exit_code == 0, r.output
    assert set(picks.read(str(path), "GPU")) == {"k", "b1", "b8"}
    assert [run["batch"] for run in json.loads(trials.read_text())["runs"]] == [1, 8]


def test_a_tilde_in_the_environment_path_means_home(monkeypatch, tmp_path):
    """MHLA_STREAM_STEP_PICKS="~/picks.json" quoted in a shell or a unit file reaches us as it is:
    read literally it named a folder '~' under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MHLA_STREAM_STEP_PICKS", "~/picks.json")
    assert picks.user_path() == str(tmp_path / "picks.json")
    for off in ("0", "off", " OFF ", "false", "no"):
        monkeypatch.setenv("MHLA_STREAM_STEP_PICKS", off)
        assert picks.user_path() is None and not picks.enabled()
