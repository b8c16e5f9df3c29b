"""Bad input gives an error that names the file, key or argument and what was expected."""
import json
import os
import pickle

import pytest
import torch
from refckpt import reference_state_dict, write_reference_checkpoint

from mhla_stream import CheckpointError, MHLAForCausalLM, MHLAState, mhla_attention


@pytest.fixture
def ckpt(tmp_path):
    write_reference_checkpoint(tmp_path, reference_state_dict())
    return tmp_path


def expect(match, fn, exc=CheckpointError):
    with pytest.raises(exc, match=match):
        fn()


def test_missing_directory_and_files(tmp_path):
    expect("not a checkpoint directory", lambda: MHLAForCausalLM.from_pretrained(tmp_path / "nope" / "x"))
    expect(r"config\.json: file not found", lambda: MHLAForCausalLM.from_pretrained(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mhla"}))
    expect("no weights found; expected one of model.safetensors", lambda: MHLAForCausalLM.from_pretrained(tmp_path))


def test_unreadable_config_and_unknown_type(ckpt):
    (ckpt / "config.json").write_text("{not json")
    expect(r"config\.json: not readable as JSON", lambda: MHLAForCausalLM.from_pretrained(ckpt))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    expect("unknown model_type 'llama'", lambda: MHLAForCausalLM.from_pretrained(ckpt))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gla", "attn_extends": "gla"}))
    expect("attn_extends='gla' is not an MHLA model", lambda: MHLAForCausalLM.from_pretrained(ckpt))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gla", "feature_map": "elu"}))
    expect("feature_map='elu' is not supported", lambda: MHLAForCausalLM.from_pretrained(ckpt))


def test_missing_and_misshapen_keys(tmp_path):
    sd = reference_state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    write_reference_checkpoint(tmp_path / "a", sd)
    expect(r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight", lambda: MHLAForCausalLM.from_pretrained(tmp_path / "a"))
    sd = reference_state_dict()
    sd["model.layers.0.attn.q_proj.weight"] = torch.zeros(3, 32)
    write_reference_checkpoint(tmp_path / "b", sd)
    expect(r"key 'model\.layers\.0\.attn\.q_proj\.weight' has shape \(3, 32\), expected \(16, 32\)",
           lambda: MHLAForCausalLM.from_pretrained(tmp_path / "b"))
    sd = reference_state_dict()
    sd["model.layers.0.attn.extra"] = torch.zeros(1)
    write_reference_checkpoint(tmp_path / "c", sd)
    expect(r"unexpected keys: model\.layers\.0\.attn\.extra", lambda: MHLAForCausalLM.from_pretrained(tmp_path / "c"))


def test_truncated_weights_name_the_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect(r"model\.safetensors: cannot read weights", lambda: MHLAForCausalLM.from_pretrained(ckpt))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mhla_pwned",))


def test_bin_with_pickled_code_is_refused_not_run(tmp_path):
    write_reference_checkpoint(tmp_path, reference_state_dict(), fmt="bin")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embeddings.weight": _Evil()}, f)
    if os.path.exists("/tmp/mhla_pwned"):
        os.remove("/tmp/mhla_pwned")
    expect(r"pytorch_model\.bin: cannot read weights", lambda: MHLAForCausalLM.from_pretrained(tmp_path))
    assert not os.path.exists("/tmp/mhla_pwned")


def test_operator_argument_errors():
    q = torch.rand(1, 5, 2, 4)
    v = torch.rand(1, 5, 2, 3)
    m = torch.rand(3, 3)
    expect(r"q must be \[B, T, H, D\]", lambda: mhla_attention(q[0], q, v, m), ValueError)
    expect("q and k must have the same shape", lambda: mhla_attention(q, q[:, :, :, :3], v, m), ValueError)
    expect("v must be", lambda: mhla_attention(q, q, v[:, :4], m), ValueError)
    expect("must share one dtype", lambda: mhla_attention(q, q.double(), v, m), TypeError)
    expect("q must be float32/float16/bfloat16", lambda: mhla_attention(q.long(), q.long(), v, m), TypeError)
    expect(r"mixing must be a square \[L, L\]", lambda: mhla_attention(q, q, v, torch.rand(3, 4)), ValueError)
    expect("unknown backend 'cuda'", lambda: mhla_attention(q, q, v, m, backend="cuda"), ValueError)
    expect("unknown mixing policy 'nope'", lambda: mhla_attention(q, q, v, m, policy="nope"), ValueError)
    expect("block_size must be a positive int", lambda: mhla_attention(q, q, v, m, block_size=0), ValueError)
    expect("T = 0", lambda: mhla_attention(q[:, :0], q[:, :0], v[:, :0], m), ValueError)
    st = MHLAState.empty(2, 2, 4, 3, block_size=64, num_blocks=3, policy="window")
    expect("state does not match the inputs \\(batch: state 2 vs input 1\\)",
           lambda: mhla_attention(q, q, v, m, state=st), ValueError)
    expect(r"lengths must lie in \[0, T=5\]", lambda: mhla_attention(q, q, v, m, lengths=torch.tensor([9])), ValueError)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        expect("needs CUDA tensors", lambda: mhla_attention(q, q, v, m, backend="triton"), RuntimeError)
