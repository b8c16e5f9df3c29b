"""The training benchmark's pieces: mhla-train --arch gla (fla optional), the presets for the baselines,
LossModule's fused path on any causal LM, profile_train on the CPU, and gpu_train_bench.sh --smoke."""
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mhla_stream.cli import profile_train
from mhla_stream.cli import train as train_cli
from mhla_stream.training.flops import attention_flops_per_token
from mhla_stream.training.model import LossModule, build_model, is_mhla

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--preset", "mhla-tiny", "--eval-every", "100", "--log-every", "1", "--warmup", "2", "--eval-windows", "4",
        "--batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "info.json").write_text(json.dumps({"vocab_size": 64}))
    for name, size in (("stories", 3000), ("books", 5000), ("valid", 500)):
        ((np.arange(size) * 7) % 64).astype(np.uint16).tofile(d / f"{name}.bin")
    return d


def train(args):
    return CliRunner().invoke(train_cli.main, [str(a) for a in args])


def one_line_error(r, text):
    assert r.exit_code == 2, r.output
    assert text in r.output and "Traceback" not in r.output, r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1, r.output


# ---- --arch gla: fla is optional ----------------------------------------------------------------------

@pytest.fixture
def broken_fla(tmp_path, monkeypatch):
    """An fla that fails on import the way a mismatched Triton makes the real one fail (ValueError)."""
    pkg = tmp_path / "shadow" / "fla"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ValueError('key contains names that are not kernel arguments: BT')\n")
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))
    return tmp_path / "shadow"


def test_arch_gla_without_fla_is_one_line_and_no_folder(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla -> ImportError: not installed
    monkeypatch.setitem(sys.modules, "fla.models", None)
    one_line_error(train(["--data", data_dir, "--out", out, "--arch", "gla", *TINY]), "--arch gla needs fla")
    assert not out.exists()


def test_arch_gla_with_a_broken_fla_is_one_line_and_no_folder(tmp_path, data_dir, broken_fla):
    out = tmp_path / "run"
    r = train(["--data", data_dir, "--out", out, "--arch", "gla", *TINY])
    one_line_error(r, "ValueError: key contains names")
    assert not out.exists()


def test_arch_gla_shape_refused_before_fla_is_imported(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)
    out = tmp_path / "run"
    r = train(["--data", data_dir, "--out", out, "--arch", "gla", "--hidden", "66", "--heads", "4", "--device", "cpu"])
    one_line_error(r, "GLA needs hidden / 2 divisible by the number of heads")
    assert not out.exists()


class StubGLAConfig:
    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.model_type = "gla"


class StubGLA(torch.nn.Module):
    """Just enough of fla's GLAForCausalLM to see what build_model asks of it (fla needs a GPU)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = torch.nn.Module()
        self.model.embeddings = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied, as fla 0.5 under transformers 5 leaves it


def test_gla_is_built_at_mhlas_shape_with_fla_fusions_off_and_tied(monkeypatch):
    fla, models = types.ModuleType("fla"), types.ModuleType("fla.models")
    models.GLAConfig, models.GLAForCausalLM = StubGLAConfig, StubGLA
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.models", models)
    with torch.device("meta"):
        lm = build_model("gla", 32000, 384, 8, 8, 64, 16, "window", preset="mhla-340m")
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.expand_k, c.expand_v, c.hidden_ratio) == \
        (1024, 24, 4, 0.5, 1.0, 4)
    assert (c.vocab_size, c.max_position_embeddings, c.attn_mode, c.tie_word_embeddings) == (32000, 2048, "chunk", True)
    assert not (c.fuse_norm or c.fuse_cross_entropy or c.fuse_linear_cross_entropy or c.use_cache)
    assert lm.lm_head.weight is lm.model.embeddings.weight
    assert type(lm).__name__ == "GLAForCausalLM" and isinstance(type(lm)._tied_weights_keys, dict)
    assert not is_mhla(lm)


def test_gla_flops_use_flas_chunk():
    cfg = types.SimpleNamespace(num_hidden_layers=24, num_heads=4, hidden_size=1024, expand_k=0.5, expand_v=1.0)
    assert attention_flops_per_token(cfg, "gla") == 24 * 4 * (2 * 64 * (128 + 256) + 4 * 128 * 256)


# ---- presets for the baselines ----------------------------------------------------------------------------

def test_presets_give_the_baselines_the_preset_shape():
    with torch.device("meta"):
        mhla = build_model("mhla", 32000, 384, 8, 4, 64, 16, "window", preset="mhla-340m")
        tfm = build_model("transformer", 32000, 384, 8, 4, 64, 16, "window", preset="mhla-340m")
    c = tfm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings) == (1024, 24, 16, 2048)
    assert c.intermediate_size == mhla.config.intermediate_size == 2816
    assert tfm.lm_head.weight is tfm.model.embed_tokens.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(mhla), count(tfm)) == (341_130_240, 341_099_520)


def test_transformer_with_a_preset_ignores_the_hidden_flag_and_without_one_checks_it(tmp_path, data_dir):
    out = tmp_path / "tfm"
    r = train(["--data", data_dir, "--out", out, "--arch", "transformer", *TINY, "--hidden", "100", "--steps", "1",
               "--no-save"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "transformer" and summary["context"] == 32 and summary["preset"] == "mhla-tiny"
    bad = tmp_path / "bad"
    r = train(["--data", data_dir, "--out", bad, "--arch", "transformer", "--hidden", "100", "--device", "cpu"])
    one_line_error(r, "--hidden 100: the transformer baseline needs a multiple of 64")
    assert not bad.exists()


# ---- LossModule: the fused path on any causal LM --------------------------------------------------------

class OtherLM(torch.nn.Module):
    """A causal LM in transformers' shape whose decoder is not called `model` (get_decoder finds it)."""

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 16)

        def forward(self, input_ids, use_cache=None):
            assert use_cache is False  # training never builds a cache
            return types.SimpleNamespace(last_hidden_state=torch.tanh(self.mix(self.embed(input_ids)).cumsum(1)))

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="other")
        self.decoder, self.head = self.Decoder(), torch.nn.Linear(16, 64, bias=False)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, use_cache=None):
        return types.SimpleNamespace(logits=self.head(self.decoder(input_ids, use_cache).last_hidden_state))

    @property
    def dtype(self):
        return self.head.weight.dtype


def test_fused_loss_runs_any_causal_lm_through_its_decoder():
    torch.manual_seed(0)
    lm = OtherLM().double()
    windows = torch.randint(0, 64, (3, 20))
    results = []
    for fused in (False, True):
        lm.zero_grad()
        loss = LossModule(lm, fused_loss=fused, loss_chunk=7)(windows)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (plain, g0), (fused, g1) = results
    assert abs(plain - fused) < 1e-10
    assert max(float((g0[n] - g1[n]).abs().max()) for n in g0) < 1e-10


# ---- profile_train -------------------------------------------------------------------------------------

def test_profile_train_tiny_on_the_cpu(tmp_path):
    path = tmp_path / "prof.json"
    r = CliRunner().invoke(profile_train.main, ["--preset", "mhla-tiny", "--device", "cpu", "--vocab", "64", "--batch",
                                                "2", "--warmup", "1", "--steps", "1", "--top", "5", "--json", str(path)])
    assert r.exit_code == 0, r.output
    assert "ops by self CPU time" in r.output and "ms wall per step" in r.output
    report = json.loads(path.read_text())
    assert report["table_kind"] == "cpu_ops" and report["context"] == 32 and report["rows"]
    assert report["compile"] is False and "compiled" not in r.output  # as mhla-train: compiled on CUDA only
    assert report["rows"][0]["us_per_step"] >= report["rows"][-1]["us_per_step"] > 0
    assert any(row["name"].startswith("aten::mm") for row in report["rows"])


@pytest.mark.parametrize("extra, msg", [
    (["--context", "33"], "--context 33: more than the 32 tokens"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda"], "--device cuda"),
    (["--batch", "0"], "--batch"),
    (["--vocab", "2"], "--vocab"),
    (["--attn-backend", "triton"], "--attn-backend triton"),
])
def test_profile_train_refuses_bad_input(tmp_path, extra, msg, monkeypatch, no_triton_interpreter):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["--preset", "mhla-tiny", "--device", "cpu", *extra, "--json", str(tmp_path / "p.json")]
    r = CliRunner().invoke(profile_train.main, args)
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "p.json").exists()


# ---- the bench script, --smoke on the CPU -------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_train_bench_smoke_runs_and_skips_gla_without_fla(tmp_path, broken_fla):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "RUNS": "mhla transformer gla",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{broken_fla}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(["bash", ".ci/gpu_train_bench.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gla skipped: fla does not import" in proc.stdout
    report = json.loads((out / "train_bench.json").read_text())
    assert set(report["runs"]) == {"mhla", "transformer", "gla"}
    assert report["runs"]["gla"]["error"].startswith("skipped")
    for name in ("mhla", "transformer"):
        assert report["runs"][name]["arch"] == name and report["runs"][name]["tokens_per_s"] > 0
        assert report["runs"][name]["steps"] == 2
