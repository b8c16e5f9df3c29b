"""mhla-train's pieces: the fused loss, activation checkpointing, checkpoints, FLOP counts, hostile input,
and DDP under torchrun (two gloo processes) against one process with the same global batch."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mhla_stream.cli import train as train_cli
from mhla_stream.training import checkpoint as ckpt_io
from mhla_stream.training.flops import PEAK_BF16, matmul_params, mfu, peak_bf16_flops, train_flops_per_token
from mhla_stream.training.fused_loss import fused_linear_cross_entropy
from mhla_stream.training.model import LossModule, build_model, enable_activation_checkpointing

TINY = ["--preset", "mhla-tiny", "--eval-every", "100", "--log-every", "1", "--warmup", "2", "--eval-windows", "4",
        "--batch", "4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Token files with a learnable pattern (a noisy counter), vocabulary 64."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (d / "info.json").write_text(json.dumps({"vocab_size": 64}))
    for name, size in (("stories", 3000), ("books", 5000), ("valid", 500)):
        ((np.arange(size) * 7 + rng.integers(0, 3, size)) % 64).astype(np.uint16).tofile(d / f"{name}.bin")
    return d


def train(args):
    return CliRunner().invoke(train_cli.main, [str(a) for a in args])


def params(out):
    return {k: v for k, v in load_file(str(out / "ckpt.safetensors")).items()}


def assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= tol, worst


# ---- fused loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_fused_loss_equals_plain_loss_and_gradients(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 37, 16, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (3, 37), generator=g)
    t[0, :5] = -100  # ignored positions count neither in the loss nor in the mean
    acc = torch.promote_types(dtype, torch.float32)
    ref = F.cross_entropy(F.linear(h, w).to(acc).flatten(0, 1), t.flatten())
    gh, gw = torch.autograd.grad(ref * 3, (h, w))
    out = fused_linear_cross_entropy(h, w, t, chunk_tokens=chunk)
    fh, fw = torch.autograd.grad(out * 3, (h, w))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(float(out.detach() - ref.detach())) <= tol * 10
    assert float((fh - gh).abs().max()) <= tol and float((fw - gw).abs().max()) <= tol
    assert fh.dtype == dtype and fw.dtype == dtype


def test_fused_loss_under_bf16_autocast_is_close():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(100, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
        out = fused_linear_cross_entropy(h, w, t, chunk_tokens=10)
    assert abs(float(out.detach() - ref.detach())) < 1e-3 * float(ref.detach())
    gh, gw = torch.autograd.grad(ref, (h, w))
    fh, fw = torch.autograd.grad(out, (h, w))
    assert float((fh - gh).norm() / gh.norm()) < 2e-2 and float((fw - gw).norm() / gw.norm()) < 2e-2


@pytest.mark.parametrize("shapes,chunk,msg", [(((4, 8), (10, 8), (5,)), 4, "do not match"),
                                              (((4, 8), (10, 6), (4,)), 4, "hidden size 8"),
                                              (((4, 8), (10, 8), (4,)), 0, "chunk_tokens")])
def test_fused_loss_rejects_bad_input(shapes, chunk, msg):
    h, w, t = torch.randn(*shapes[0]), torch.randn(*shapes[1]), torch.zeros(shapes[2], dtype=torch.long)
    with pytest.raises(ValueError, match=msg):
        fused_linear_cross_entropy(h, w, t, chunk)


# ---- the training step: fused loss and activation checkpointing against the plain path ------------

def grads_of(module, windows):
    module.zero_grad(set_to_none=True)
    loss = module(windows)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["mhla", "transformer"])
def test_fused_loss_and_activation_checkpointing_keep_loss_and_gradients(arch):
    torch.manual_seed(0)
    lm = build_model(arch, 64, 64, 2, 2, 8, 4, "window", preset="mhla-tiny").double()
    windows = torch.randint(0, 64, (2, 33))
    ref_loss, ref = grads_of(LossModule(lm, fused_loss=False), windows)
    names = [n for n, _ in lm.named_parameters()]
    enable_activation_checkpointing(lm)
    assert [n for n, _ in lm.named_parameters()] == names  # checkpoints stay loadable
    for fused in (False, True):
        loss, got = grads_of(LossModule(lm, fused_loss=fused, loss_chunk=5), windows)
        assert abs(loss - ref_loss) < 1e-10 and got.keys() == ref.keys()
        assert max(float((got[n] - ref[n]).abs().max()) for n in ref) < 1e-10


# ---- checkpoints ---------------------------------------------------------------------------------

def small_model_and_opt(seed=0, hidden=64):
    torch.manual_seed(seed)
    lm = build_model("mhla", 64, hidden, 2, 2, 8, 4, "window")
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    lm(input_ids=torch.randint(0, 64, (1, 16))).logits.sum().backward()
    opt.step()
    return lm, opt


def test_checkpoint_round_trip_and_refusals_leave_state_unchanged(tmp_path):
    lm, opt = small_model_and_opt(0)
    path = tmp_path / "ckpt.safetensors"
    ckpt_io.save(path, lm, opt, {"step": 7, "best": 1.5, "elapsed": 3.0})
    assert not (tmp_path / "ckpt.safetensors.tmp").exists()
    other, other_opt = small_model_and_opt(1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    assert ckpt_io.load(path, other, other_opt, "cpu")["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), other.state_dict().values()))
    state, loaded = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg_sq"], loaded[i]["exp_avg_sq"]) for i in state)

    wider, wider_opt = small_model_and_opt(2, hidden=128)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:200])
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    lm_meta = tmp_path / "no_step.safetensors"
    save_file({"x": torch.zeros(2)}, str(lm_meta), metadata={"format": ckpt_io.FORMAT, "meta": "{}", "optimizer": "{}"})
    for bad, msg in ((lm_meta, "damaged metadata"), (path, "has shape"), (broken, "cannot read checkpoint"),
                     (tmp_path / "foreign.safetensors", "not an mhla-train checkpoint")):
        with pytest.raises(ckpt_io.TrainCheckpointError, match=msg):
            ckpt_io.load(bad, wider, wider_opt, "cpu")
        assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


def test_legacy_torch_save_checkpoint_loads_without_unpickling_code(tmp_path):
    lm, opt = small_model_and_opt(0)
    torch.save({"model": lm.state_dict(), "opt": opt.state_dict(), "step": 3, "best": 2.0, "elapsed": 1.0},
               tmp_path / "ckpt.pt")
    other, other_opt = small_model_and_opt(1)
    assert ckpt_io.load(tmp_path / "ckpt.pt", other, other_opt, "cpu")["step"] == 3
    torch.save({"model": lm.state_dict(), "evil": pathlib.PurePosixPath("/etc")}, tmp_path / "evil.pt")
    with pytest.raises(ckpt_io.TrainCheckpointError, match="cannot read legacy checkpoint"):
        ckpt_io.load(tmp_path / "evil.pt", other, other_opt, "cpu")


# ---- FLOPs, MFU, the preset -----------------------------------------------------------------------

def test_preset_340m_shape_flops_and_peak_table(monkeypatch):
    with torch.device("meta"):
        lm = build_model("mhla", 32000, 1, 1, 1, 1, 1, "window", preset="mhla-340m")
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.head_k_dim, c.head_v_dim, c.num_blocks) == \
        (1024, 24, 4, 128, 256, 32)
    assert matmul_params(lm) == 341_130_240  # tied: the table is the LM head's product
    per_token = train_flops_per_token(lm, "mhla")
    assert 6 * 341_130_240 < per_token < 6.3 * 341_130_240
    assert peak_bf16_flops(torch.device("cpu")) is None and mfu(1e5, per_token, None) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert peak_bf16_flops(torch.device("cuda", 0)) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert peak_bf16_flops(torch.device("cuda", 0)) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert peak_bf16_flops(torch.device("cuda", 0)) == 312e12 and "H200" in dict(PEAK_BF16)
    assert mfu(100_000, per_token, 989e12, world=2) == pytest.approx(100_000 * per_token / 1978e12)


# ---- the command: hostile input ----------------------------------------------------------------------

def test_train_cli_refuses_bad_input_with_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    for extra, msg in ((["--grad-accum", "0"], "--grad-accum"), (["--preset", "mhla-1t"], "--preset"),
                       (["--batch", "0"], "--batch"), (["--stories-frac", "2"], "--stories-frac"),
                       (["--attn-backend", "cuda"], "--attn-backend")):
        r = train(["--data", data_dir, "--out", out, *TINY, *extra])
        assert r.exit_code == 2 and msg in r.output, r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = train(["--data", empty, "--out", out, *TINY])
    assert r.exit_code == 2 and "info.json: not found" in r.output
    (empty / "info.json").write_text(json.dumps({"vocab_size": 16}))  # the token files hold ids up to 63
    for n in ("stories", "books", "valid"):
        (empty / f"{n}.bin").write_bytes((data_dir / f"{n}.bin").read_bytes())
    r = train(["--data", empty, "--out", out, *TINY])
    assert r.exit_code == 2 and "outside the vocabulary of 16" in r.output
    (empty / "info.json").write_text(json.dumps({"vocab_size": 64}))
    np.zeros(10, dtype=np.uint16).tofile(empty / "valid.bin")
    r = train(["--data", empty, "--out", out, *TINY])
    assert r.exit_code == 2 and "valid.bin: 10 tokens, need at least 34" in r.output
    out.mkdir()
    (out / "ckpt.safetensors").write_bytes(b"\x00" * 64)
    r = train(["--data", data_dir, "--out", out, *TINY, "--steps", "1"])
    assert r.exit_code == 2 and "cannot read checkpoint" in r.output
    assert (out / "ckpt.safetensors").read_bytes() == b"\x00" * 64  # left exactly as it was


def test_train_cli_with_the_triton_operator(tmp_path, data_dir):
    """--attn-backend triton: the operator's Triton forward + backward (interpreter on the CPU)
    trains the same steps as the torch form."""
    runs = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        r = train(["--data", data_dir, "--out", out, *TINY, "--steps", "2", "--attn-backend", backend, "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "summary.json").read_text())["attn_backend"] == backend
        runs[backend] = params(out)
    assert_same(runs["torch"], runs["triton"], tol=1e-4)


# ---- DDP: two gloo processes against one process; resume on another world size -----------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_rank_with_grad_accum_and_resume_on_one_rank(tmp_path, data_dir):
    """2 ranks x 2 micro-batches (DDP's no_sync on the first) against 1 process x 4 micro-batches: the same
    global batch of 8 sequences and the same samples, so the same weights and AdamW moments."""
    common = ["--data", data_dir, *TINY, "--steps", "4", "--batch", "2"]
    # one process: steps 1-2, a checkpoint, then resumed to step 4
    one = tmp_path / "one"
    r = train([*common, "--out", one, "--grad-accum", "4", "--stop-at", "2"])
    assert r.exit_code == 0, r.output
    one_at_2 = params(one)
    r = train([*common, "--out", one, "--grad-accum", "4"])
    assert r.exit_code == 0 and "resumed" in r.output, r.output
    one_at_4 = params(one)
    # two gloo processes under torchrun
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "mhla_stream.cli.train", *map(str, common), "--out", str(two),
           "--grad-accum", "2", "--stop-at", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world"] == 2 and summary["global_batch"] == 8 and summary["steps"] == 2
    assert_same(params(two), one_at_2)
    records = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2] and all(rec["tokens_per_s"] > 0 for rec in records)
    # the 2-rank checkpoint resumed on one rank reaches the uninterrupted run's weights
    r = train([*common, "--out", two, "--grad-accum", "4"])
    assert r.exit_code == 0 and "written by 2 rank(s), now 1" in r.output, r.output
    assert_same(params(two), one_at_4)
