"""Launch shapes chosen in the decode step (kernels/step_picks.py, decode_tuning.py,
cli/tune_decode.py): the picks files, hostile files and flags, and on a GPU the picked shapes'
products against torch and a short tuning run."""
import json
import os
import types

import pytest
import torch
from click.testing import CliRunner

from mhla_stream import preset_config
from mhla_stream.kernels import step_picks as picks

GPU = torch.cuda.is_available()
H100 = "NVIDIA H100 80GB HBM3"
PICK = {"BN": 4, "BK": 1024, "num_warps": 4, "num_stages": 1, "maxnreg": 128}


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Each test reads its own user file and leaves no forced or cached picks behind."""
    monkeypatch.setenv("MHLA_STREAM_STEP_PICKS", str(tmp_path / "user.json"))
    picks._loaded.clear()
    yield
    picks._loaded.clear()
    picks._forced.clear()
    picks._rejected.clear()


def model_keys(name="mhla-340m", dtype=torch.bfloat16, rows=1, head=False):
    """The product keys the fused step of a preset launches (q/k/v/g, output, gate/up, down): one
    row, or the row block of 16 with the norms as statistics (``rows=16``); ``head``: and the one-row
    step's LM head with the final norm folded in."""
    c = preset_config(name)
    D, H = c.hidden_size, c.num_heads
    hk, hv = int(D * c.expand_k), int(D * c.expand_v)
    inter = c.intermediate_size
    one = rows == 1

    def key(N, K, GS, norm, gate, swiglu, residual):
        return picks.product_key(N, K, GS, norm and one, gate and one, swiglu, residual, dtype, rows,
                                 late=norm and not one, stats=norm and not one)
    return [key(2 * hk + 2 * hv, D, D, True, False, False, False),
            key(D, hv, hv // H, True, True, False, True),
            key(inter, D, D, True, False, True, False),
            key(D, inter, inter, False, False, False, True)] + ([key(c.vocab_size, D, D, True, False, False, False)]
                                                                 if head and one else [])


def test_the_shipped_picks_are_valid_and_name_the_340m_products():
    from mhla_stream.decode_tuning import candidates
    h100, h200 = picks.read(picks.SHIPPED, H100), picks.read(picks.SHIPPED, "NVIDIA H200")
    from mhla_stream.kernels import triton_skinny
    from mhla_stream.kernels.skinny_shapes import whole_slice_shapes
    assert sorted(h100) == sorted(model_keys() + model_keys(rows=16) + model_keys(rows=32))
    assert sorted(h200) == sorted(model_keys())
    for key, pick in [*h100.items(), *h200.items()]:
        if not key.startswith("M"):
            assert pick in candidates(key), (key, pick)  # a shape the step tuner would try
        else:  # the rows picks (session 22): whole-slice shapes that fit their launch
            n, k, g = (int(p[1:]) for p in key.split()[1:4])
            assert pick in whole_slice_shapes(k, g, "swiglu" in key), (key, pick)
            args = {"N": n, "K": k, "GS": g, "M": int(key.split()[0][1:])}
            kw = {"LATE": "late" in key, "STATS_IN": "stats" in key, "BM": args["M"]}
            assert triton_skinny._fits_rows(picks.config(pick), args, kw), (key, pick)
            assert pick in candidates(key, (None, args, kw)), (key, pick)
    assert picks.read(picks.SHIPPED, "some other GPU") == {}


def test_product_key_names_what_the_launch_computes():
    assert picks.product_key(3072, 1024, 1024, True, False, False, False, torch.bfloat16) == "N3072 K1024 G1024 norm bf16"
    assert picks.product_key(1024, 2816, 2816, False, False, False, True, "torch.float32") == \
        "N1024 K2816 G2816 residual fp32"


@pytest.mark.parametrize("bad", [
    {}, {"BN": 4, "BK": 1024}, dict(PICK, BN=3), dict(PICK, BN=True), dict(PICK, BK=8), dict(PICK, BK=2 ** 15),
    dict(PICK, num_warps=3), dict(PICK, num_stages=0), dict(PICK, maxnreg=300), dict(PICK, maxnreg="128"),
    dict(PICK, extra=1), dict(PICK, BN=4.0), [4, 1024, 4, 1, 128, 1], "BN=4", None])
def test_invalid_launch_shapes_are_refused(bad):
    assert picks.valid_pick(bad) is None


def test_a_valid_pick_reads_as_its_tuple():
    assert picks.valid_pick(PICK) == (4, 1024, 4, 1, 128, 1)
    assert picks.valid_pick({"BN": 1, "BK": 4096, "num_warps": 8}) == (1, 4096, 8, 1, None, 1)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"format": 2, "devices": {}}',
                                     b'{"format": 1, "devices": []}', b'{"format": 1}', b'"text"',
                                     b'{"format": 1, "devices": {"GPU": {"products": [1, 2]}}}',
                                     b'{"format": 1, "devices": {"GPU": 7}}'])
def test_an_unreadable_picks_file_is_skipped_with_a_warning(tmp_path, content):
    path = tmp_path / "picks.json"
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert picks.read(str(path), "GPU") == {}


def test_a_folder_in_place_of_the_file_is_skipped(tmp_path):
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert picks.read(str(tmp_path), "GPU") == {}


def test_invalid_entries_are_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "picks.json"
    path.write_text(json.dumps({"format": 1, "devices": {"GPU": {"products": {
        "good": PICK, "bad": dict(PICK, BN=5)}}}}))
    with pytest.warns(RuntimeWarning, match="invalid launch shapes"):
        assert picks.read(str(path), "GPU") == {"good": (4, 1024, 4, 1, 128, 1)}


def test_write_merges_atomically_and_reads_back(tmp_path):
    path = str(tmp_path / "deep" / "folder" / "picks.json")  # folders made
    picks.write(path, "GPU", {"a": (4, 1024, 4, 1, 128, 1)}, note="first")
    picks.write(path, "GPU", {"b": (2, 512, 8, 3, None, 1)})
    picks.write(path, "Other", {"a": (1, 64, 2, 1, None, 1)})
    assert picks.read(path, "GPU") == {"a": (4, 1024, 4, 1, 128, 1), "b": (2, 512, 8, 3, None, 1)}
    assert picks.read(path, "Other") == {"a": (1, 64, 2, 1, None, 1)}
    assert os.listdir(os.path.dirname(path)) == ["picks.json"]  # no temporary file left


@pytest.mark.parametrize("content", [b"{broken", b'{"format": 1, "devices": {"GPU": "x"}}', b"\x00\x01"])
def test_write_never_overwrites_a_file_that_is_not_a_picks_file(tmp_path, content):
    path = tmp_path / "picks.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="move"):
        picks.write(str(path), "GPU", {"a": (4, 1024, 4, 1, 128, 1)})
    assert path.read_bytes() == content


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "picks.json")
    picks.write(path, "GPU", {"a": (4, 1024, 4, 1, 128, 1)})
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(picks.json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        picks.write(path, "GPU", {"b": (2, 512, 8, 3, None, 1)})
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["picks.json"]


def fake_launch(N=3072, K=1024, GS=1024, cuda=True, **kw):
    x = types.SimpleNamespace(is_cuda=cuda, dtype=torch.bfloat16, device="cuda:0")
    return {"x_ptr": x, "N": N, "K": K, "GS": GS, "M": kw.pop("M", 1)}, dict(
        dict(NORM=True, GATE=False, SWIGLU=False, RESIDUAL=False), **kw)


ALL = picks.pruner(lambda cfg, args, kw: True)


def test_prune_takes_the_users_pick_over_the_shipped_one(monkeypatch, tmp_path):
    key = "N3072 K1024 G1024 norm bf16"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    picks.write(os.environ["MHLA_STREAM_STEP_PICKS"], H100, {key: (2, 1024, 8, 1, None, 1)})
    args, kw = fake_launch()
    (cfg,) = ALL(["a", "b"], args, **kw)
    assert picks.as_pick(cfg) == (2, 1024, 8, 1, None, 1)
    assert picks.used[key][0] == (2, 1024, 8, 1, None, 1)
    assert picks.used[key][1] == {"N": 3072, "K": 1024, "GS": 1024, "M": 1}  # no tensors kept


def test_prune_without_a_pick_keeps_every_configuration_or_the_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "some other GPU")
    args, kw = fake_launch(N=999)
    assert ALL(["a", "b"], args, **kw) == ["a", "b"]
    args, kw = fake_launch(cuda=False)
    assert ALL(["a", "b"], args, **kw) == ["a", "b"]
    fallback = picks.pruner(lambda *a: True, lambda configs, named_args, **kw: configs[:1])
    assert fallback(["a", "b"], args, **kw) == ["a"]


def test_picks_off_reads_no_file(monkeypatch):
    monkeypatch.setenv("MHLA_STREAM_STEP_PICKS", "off")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    args, kw = fake_launch()
    assert ALL(["a", "b"], args, **kw) == ["a", "b"]


def test_forced_picks_win(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    picks._forced["N3072 K1024 G1024 norm bf16"] = (16, 1024, 2, 1, None, 1)
    args, kw = fake_launch()
    assert ALL(["a", "b"], args, **kw)[0].kwargs["BN"] == 16


def test_a_pick_that_does_not_fit_its_launch_is_tuned_alone(monkeypatch):
    """A rows pick whose split crosses the norm groups (or any shape the launch cannot take) must
    never run: the launch is tuned alone, with a warning."""
    from mhla_stream.kernels import triton_skinny
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    key = "M16 N1024 K1024 G256 residual late stats bf16"
    picks.write(os.environ["MHLA_STREAM_STEP_PICKS"], "GPU", {key: (64, 128, 4, 3, None, 1)})  # one split, 4 groups
    prune = picks.pruner(triton_skinny._fits_rows, lambda configs, named_args, **kw: ["tuned alone"])
    args, kw = fake_launch(N=1024, K=1024, GS=256, M=8, BM=16, NORM=False, LATE=True, STATS_IN=True, RESIDUAL=True)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        assert prune(["x"], args, **kw) == ["tuned alone"]
    picks._loaded.clear()
    picks.write(os.environ["MHLA_STREAM_STEP_PICKS"], "GPU", {key: (64, 128, 4, 3, None, 4)})  # a split a group
    (cfg,) = prune(["x"], args, **kw)
    assert cfg.kwargs["SPLIT"] == 4
    for bad in [(8, 128, 4, 3, None, 4), (64, 128, 4, 3, None, 16), (256, 128, 4, 3, None, 4)]:
        assert not triton_skinny._fits_rows(picks.config(bad), args, kw)


class FakeTuner:
    def __init__(self):
        self.cache = {"some key": "some config"}


def triton_error():
    from triton.runtime.errors import OutOfResources
    return OutOfResources(294912, 232448, "shared memory")


def failing_once(key, calls, error=None):
    error = error or triton_error()
    def launch():
        calls.append(key)
        if len(calls) == 1:
            if key:
                picks._pending.append(key)  # what the pruning does when it hands out a pick
            raise error
        return "ran"
    return launch


def test_a_file_pick_that_fails_on_this_gpu_is_dropped_and_the_launch_runs_tuned_alone(monkeypatch):
    tuner, calls = FakeTuner(), []
    with pytest.warns(RuntimeWarning, match="failed on this GPU"):
        assert picks.launching(tuner, failing_once("KEY", calls)) == "ran"
    assert calls == ["KEY", "KEY"] and picks._rejected == {"KEY"} and tuner.cache == {}
    # from then on the file's pick for that key is not handed out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    key = "N3072 K1024 G1024 norm bf16"
    picks.write(os.environ["MHLA_STREAM_STEP_PICKS"], H100, {key: (2, 1024, 8, 1, None, 1)})
    picks._rejected.add(key)
    args, kw = fake_launch()
    assert ALL(["a", "b"], args, **kw) == ["a", "b"]


def test_a_failure_without_a_file_pick_raises_as_before():
    tuner = FakeTuner()
    with pytest.raises(Exception, match="out of resource"):
        picks.launching(tuner, failing_once(None, []))  # the tuner's own configuration failed
    with pytest.raises(RuntimeError, match="CUDA error"):  # not Triton's: not the pick's fault
        picks.launching(tuner, failing_once("KEY", [], RuntimeError("CUDA error: an illegal memory access")))
    picks._forced["KEY"] = (4, 1024, 4, 1, None, 1)
    with pytest.raises(Exception, match="out of resource"):  # the step tuner's trial: it skips the shape
        picks.launching(tuner, failing_once("KEY", []))
    assert picks._rejected == set() and tuner.cache


def test_rows_keys_name_the_row_block():
    assert picks.product_key(1024, 1024, 256, False, False, False, True, torch.bfloat16, rows=16, late=True,
                             stats=True) == "M16 N1024 K1024 G256 residual late stats bf16"


def test_the_tuners_prune_by_the_picks():
    from mhla_stream.kernels import triton_skinny
    for tuner in (triton_skinny._gemv(1024), triton_skinny._gemm):
        assert tuner.early_config_prune.__qualname__.startswith("pruner")
    triton_skinny.forget_tuning()  # (no choices yet: a no-op that must not fail)


def run_cli(*args, env=None):
    from mhla_stream.cli import tune_decode
    return CliRunner().invoke(tune_decode.main, list(args), env=env)


def test_cli_refuses_a_folder_as_output(tmp_path):
    r = run_cli("--out", str(tmp_path))
    assert r.exit_code != 0


def test_cli_refuses_to_overwrite_a_foreign_file(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text('{"my": "notes"}')
    r = run_cli("--out", str(path))
    assert r.exit_code == 2 and "not a step picks file" in r.output
    assert path.read_text() == '{"my": "notes"}'


def test_cli_with_picks_off_needs_an_output(tmp_path):
    r = run_cli(env={"MHLA_STREAM_STEP_PICKS": "0"})
    assert r.exit_code == 2 and "--out" in r.output


@pytest.mark.parametrize("flags", [["--passes", "0"], ["--passes", "x"], ["--dtype", "float16"]])
def test_cli_bad_flags(flags):
    assert run_cli(*flags).exit_code == 2


@pytest.mark.skipif(GPU, reason="the CPU message")
def test_cli_without_a_gpu_says_so(tmp_path):
    r = run_cli("--out", str(tmp_path / "p.json"))
    assert r.exit_code == 2 and "CUDA GPU" in r.output and not (tmp_path / "p.json").exists()


def shipped():
    """(device, key, pick) of every shipped pick."""
    data = picks.existing(picks.SHIPPED)["devices"]
    return [(d, k, picks.read(picks.SHIPPED, d)[k]) for d in sorted(data) for k in sorted(data[d]["products"])]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("device,key,pick", shipped(), ids=lambda v: str(v).replace(" ", "_"))
def test_each_shipped_shape_computes_the_product(device, key, pick):
    """Every shipped shape (forced here, whatever this GPU's name) against torch in fp32: one row
    for the one-row keys, 8 rows for the row block of 16 ('M16 ...'), 24 for the row block of 32."""
    from mhla_stream.kernels.triton_skinny import forget_tuning, row_stats, skinny_linear
    parts = key.split()
    M = {16: 8, 32: 24}[int(parts[0][1:])] if parts[0].startswith("M") else 1
    parts = parts[1:] if M > 1 else parts
    N, K, GS = (int(p[1:]) for p in parts[:3])
    folds = parts[3:-1]
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    x, w = r(M, K), r(N * (2 if "swiglu" in folds else 1), K) * K ** -0.5
    kw = {}
    if "norm" in folds:
        kw.update(norm_weight=r(GS), group=GS)
    if "stats" in folds:
        kw.update(stats_in=row_stats(x), group=GS)
    if "gate" in folds:
        kw["gate"] = r(M, K)
    if "residual" in folds:
        kw["residual"] = r(M, N)
    picks._forced[key] = pick
    forget_tuning()
    try:
        y = skinny_linear(x, w, swiglu="swiglu" in folds, **kw).float()
        assert picks.used[key][0] == pick  # the shape ran (a forced pick that does not fit is tuned alone)
    finally:
        picks._forced.clear()
        forget_tuning()
    xf = x.float()
    if "norm" in folds or "stats" in folds:
        xg = xf.view(M, -1, GS)
        xf = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + 1e-6)).view(M, K)
        if "norm" in folds:
            xf = (xf * kw["norm_weight"].float().repeat(K // GS)).to(torch.bfloat16).float()
    if "gate" in folds:
        xf = (xf * torch.nn.functional.silu(kw["gate"].float())).to(torch.bfloat16).float()
    ref = xf @ w.float().t()
    if "swiglu" in folds:
        ref = torch.nn.functional.silu(ref[:, :N]) * ref[:, N:]
    if "residual" in folds:
        ref = ref + kw["residual"].float()
    assert (y - ref).norm() / ref.norm() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_step_tuning_runs_and_keeps_its_picks_until_forget():
    """Batch 1 (one-row products) and batch 4 (the row block of 16) in one process."""
    from mhla_stream import MHLAForCausalLM
    from mhla_stream.decode_tuning import forget, tune_step
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = MHLAForCausalLM(preset_config("mhla-tiny")).to(torch.bfloat16).eval().prepare_inference()
    out = tune_step(m, passes=1, limit=3, log=lambda *_: None)
    assert set(out["picks"]) == set(model_keys("mhla-tiny", head=True)) and out["best_us"] > 0
    assert picks._forced == out["picks"]
    four = tune_step(m, batch=4, passes=1, limit=2, log=lambda *_: None)
    assert four["picks"] and all(k.startswith("M16 ") for k in four["picks"])
    assert picks._forced == {**out["picks"], **four["picks"]}
    forget()
    assert picks._forced == {}
