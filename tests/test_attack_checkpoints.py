"""Hostile checkpoint folders: every file the loader opens is a regular file inside the folder,
errors never quote file contents, and a config that does not describe the weights is refused
before the model is built."""
import json
import os
import shutil
import signal

import pytest
import torch
from click.testing import CliRunner
from refckpt import reference_state_dict, write_reference_checkpoint
from safetensors.torch import save_file

from mhla_stream import CheckpointError, MHLAForCausalLM
from mhla_stream.checkpoint import checkpoint_file
from mhla_stream.hub import resolve_model

SECRET = "TOP-SECRET-VALUE-4711"


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "ckpt"
    write_reference_checkpoint(d, reference_state_dict(), shards=2)
    return d


def index_of(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def point_first_key_at(d, target):
    index = index_of(d)
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = target
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def no_hang():
    """A FIFO opened for reading would block forever: fail the test instead of hanging CI."""
    def alarm(*_):
        raise TimeoutError("the loader blocked on a special file")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_sharded_checkpoint_still_loads(sharded):
    assert MHLAForCausalLM.from_pretrained(sharded).config.num_hidden_layers == 2


@pytest.mark.parametrize("target", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd",
                                    "/proc/self/environ"])
def test_index_paths_cannot_leave_the_folder(sharded, target):
    shutil.copy(next(sharded.glob("*-00001-*.safetensors")), sharded.parent / "outside.safetensors")
    point_first_key_at(sharded, target)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        MHLAForCausalLM.from_pretrained(sharded)


def test_symlinks_leading_outside_are_refused(sharded, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(next(sharded.glob("*-00001-*.safetensors")), outside)
    os.symlink(outside, sharded / "link.safetensors")
    point_first_key_at(sharded, "link.safetensors")
    with pytest.raises(CheckpointError, match="leads outside the checkpoint folder"):
        MHLAForCausalLM.from_pretrained(sharded)
    (sharded / "model.safetensors.index.json").unlink()
    for f in sharded.glob("*.safetensors"):
        f.unlink()
    os.symlink(outside, sharded / "model.safetensors")  # the single-file name, too
    with pytest.raises(CheckpointError, match="leads outside"):
        MHLAForCausalLM.from_pretrained(sharded)


def test_a_symlink_inside_the_folder_is_fine(tmp_path):
    d = tmp_path / "c"
    write_reference_checkpoint(d, reference_state_dict())
    (d / "model.safetensors").rename(d / "real.safetensors")
    os.symlink("real.safetensors", d / "model.safetensors")
    assert MHLAForCausalLM.from_pretrained(d) is not None


@pytest.mark.parametrize("which", ["shard", "config"])
def test_fifos_and_folders_are_refused_without_blocking(sharded, which, no_hang):
    if which == "shard":
        os.mkfifo(sharded / "pipe.safetensors")
        point_first_key_at(sharded, "pipe.safetensors")
    else:
        (sharded / "config.json").unlink()
        os.mkfifo(sharded / "config.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        MHLAForCausalLM.from_pretrained(sharded)
    os.mkdir(sharded / "dir.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint_file(sharded, "dir.safetensors")
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        checkpoint_file(sharded, "/dev/zero")  # devices: outside, and not regular either


@pytest.mark.parametrize("name,content", [("model.safetensors", SECRET.encode()),
                                          ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{" + SECRET.encode()),
                                          ("pytorch_model.bin", SECRET.encode() * 3),
                                          ("config.json", b"\xff" + SECRET.encode()),
                                          ("config.json", b"{" + SECRET.encode())])
def test_errors_never_quote_file_contents(tmp_path, name, content):
    d = tmp_path / "c"
    write_reference_checkpoint(d, reference_state_dict())
    if name != "model.safetensors":
        if name == "pytorch_model.bin":
            (d / "model.safetensors").unlink()
    (d / name).write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        MHLAForCausalLM.from_pretrained(d)
    text = str(e.value)
    assert SECRET not in text and "TOP" not in text and "\\xff" not in text and "0xff" not in text


def test_config_with_more_layers_than_weights_is_refused_before_building(tmp_path, monkeypatch):
    d = tmp_path / "c"
    write_reference_checkpoint(d, reference_state_dict())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 500}))
    built = []
    monkeypatch.setattr("mhla_stream.modeling.MHLABlock.__init__",
                        lambda self, *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError("built")))
    with pytest.raises(CheckpointError, match="num_hidden_layers=500 but the weights have 2 layers"):
        MHLAForCausalLM.from_pretrained(d)
    assert not built


def test_config_of_another_width_is_refused_naming_the_key(tmp_path):
    d = tmp_path / "c"
    write_reference_checkpoint(d, reference_state_dict())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"model.embeddings.weight' has shape \(97, 32\), expected \(97, 64\)"):
        MHLAForCausalLM.from_pretrained(d)


def test_340m_weights_of_another_shape_are_not_340m(tmp_path):
    d = tmp_path / "w"
    write_reference_checkpoint(d, reference_state_dict())
    with pytest.raises(CheckpointError, match="not mhla-340m: hidden_size 32 .expected 1024."):
        resolve_model("mhla-340m", d)
    from mhla_stream.cli import generate
    r = CliRunner().invoke(generate.main, ["hi", "--model", "mhla-340m", "--weights", str(d), "-n", "2"])
    assert r.exit_code == 2 and "hidden_size 32 (expected 1024)" in r.output
    assert isinstance(r.exception, SystemExit)


def test_pickled_bin_shapes_are_never_unpickled(tmp_path):
    d = tmp_path / "c"
    write_reference_checkpoint(d, reference_state_dict())
    (d / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model.embeddings.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled objects"):
        MHLAForCausalLM.from_pretrained(d)
    assert not marker.exists()


def test_safetensors_header_with_absurd_shape_is_refused(tmp_path):
    d = tmp_path / "c"
    write_reference_checkpoint(d, reference_state_dict())
    sd = reference_state_dict()
    sd["model.embeddings.weight"] = torch.zeros(5, 32)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"embeddings.weight' has shape \(5, 32\)"):
        MHLAForCausalLM.from_pretrained(d)


def test_tokenizer_files_go_through_the_same_gate(tiny_dir, tmp_path, no_hang):
    from mhla_stream import StreamingMHLA
    d = tmp_path / "t"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer.model").unlink()
    os.mkfifo(d / "tokenizer.model")
    with pytest.raises(CheckpointError, match="not a regular file"):
        StreamingMHLA.from_pretrained(d)
    (d / "tokenizer.model").unlink()
    os.symlink(tiny_dir / "tokenizer.model", d / "tokenizer.model")
    with pytest.raises(CheckpointError, match="leads outside"):
        StreamingMHLA.from_pretrained(d)


def test_state_file_that_is_a_fifo_is_refused_without_blocking(tiny_dir, tmp_path, no_hang):
    from mhla_stream import StateFileError, StreamingMHLA
    os.mkfifo(tmp_path / "s.mhla")
    with pytest.raises(StateFileError, match="not a regular file"):
        StreamingMHLA.from_pretrained(tiny_dir).load_state(tmp_path / "s.mhla")
