"""``state_dtype`` at the model, stream, state-file and command-line surfaces."""
import json
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import STORY, rel_err
from safetensors import safe_open
from test_attack_state_files import assert_unchanged, craft, live

from mhla_stream import MHLACache, MHLAForCausalLM, StateFileError, StreamingMHLA
from mhla_stream.cli import chat, eval_long, generate


@pytest.fixture
def bf16(tiny_dir):
    s = StreamingMHLA.from_pretrained(tiny_dir, state_dtype="bf16")
    s.feed(STORY)
    return s


def file_parts(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def test_stream_and_model_surfaces(tiny_dir):
    fp32 = StreamingMHLA.from_pretrained(tiny_dir)
    half = StreamingMHLA(fp32.model, fp32.tokenizer, state_dtype=torch.bfloat16)
    assert fp32.state_dtype == torch.float32 and fp32.plan.state_dtype == "float32"
    assert half.state_dtype == torch.bfloat16 and half.plan.state_dtype == "bfloat16"
    assert "state_dtype=bfloat16" in half.plan.describe()
    ring = sum(st.ring.numel() for st in half.cache.states)
    assert fp32.state_bytes - half.state_bytes == 2 * ring
    assert half.cache.nbytes == half.state_bytes
    assert all(st.ring.dtype == torch.bfloat16 for st in fp32.model.new_state(3, state_dtype="bf16"))
    with pytest.raises(ValueError, match="state_dtype must be"):
        StreamingMHLA.from_pretrained("/nonexistent/model", state_dtype="fp16")  # before anything is loaded
    with pytest.raises(ValueError, match="state_dtype must be"):
        StreamingMHLA(fp32.model, fp32.tokenizer, state_dtype="half")


@torch.no_grad()
def test_feed_in_pieces_equals_feed_at_once_and_transformers_generate(tiny_dir):
    model = MHLAForCausalLM.from_pretrained(tiny_dir)
    whole = StreamingMHLA(model, None, state_dtype="bf16")
    ids = torch.randint(3, 300, (90,)).tolist()  # 11 blocks of 8: past the trained edge (4 blocks)
    whole.feed(ids)
    pieces = StreamingMHLA(model, None, state_dtype="bf16")
    for a, b in ((0, 13), (13, 14), (14, 40), (40, 41), (41, 90)):
        pieces.feed(ids[a:b])
    assert rel_err(pieces._logits, whole._logits) < 1e-5
    fp32 = StreamingMHLA(model, None)
    fp32.feed(ids)
    assert 0 < rel_err(whole._logits, fp32._logits) < 1e-2
    # transformers' generate on a cache with a bf16 ring: the same tokens as the stream
    x = torch.tensor([ids])
    cache = MHLACache(model.new_state(1, state_dtype="bf16"))
    out = model.generate(x, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert cache.states[0].ring.dtype == torch.bfloat16
    assert out[0, 90:].tolist() == list(whole.generate_ids(max_new_tokens=6, do_sample=False))


def test_save_load_round_trip_and_cross_dtype_refusal(bf16, tiny_dir, tmp_path):
    path = tmp_path / "bf16.mhla"
    bf16.save_state(path)
    meta, tensors = file_parts(path)
    assert meta["state_dtype"] == "bfloat16" and tensors["layers.0.ring"].dtype == torch.bfloat16
    expected = bf16.generate(max_new_tokens=10, do_sample=False)
    bf16.reset()
    bf16.load_state(path)
    assert bf16.generate(max_new_tokens=10, do_sample=False) == expected
    # a stream with an fp32 ring refuses the file, naming both dtypes, and stays exactly as it was
    fp32 = StreamingMHLA.from_pretrained(tiny_dir)
    fp32.feed("Tom had a red ball")
    before = live(fp32)
    with pytest.raises(StateFileError, match="block summaries in 'bfloat16', this stream stores them in 'float32'"):
        fp32.load_state(path)
    assert_unchanged(fp32, before)
    fp32.save_state(tmp_path / "fp32.mhla")
    before = live(bf16)
    with pytest.raises(StateFileError, match="in 'float32', this stream stores them in 'bfloat16'"):
        bf16.load_state(tmp_path / "fp32.mhla")
    assert_unchanged(bf16, before)


def test_files_from_before_the_option_load_as_fp32(tiny_dir, tmp_path):
    s = StreamingMHLA.from_pretrained(tiny_dir)
    s.feed(STORY)
    s.save_state(tmp_path / "new")
    meta, tensors = file_parts(tmp_path / "new")
    assert meta.pop("state_dtype") == "float32"
    old = craft(tmp_path / "old", {k: v for k, v in meta.items() if k != "sha256"}, tensors)  # as the old writer did
    expected = s.generate(max_new_tokens=6, do_sample=False)
    s.reset()
    s.load_state(old)
    assert s.generate(max_new_tokens=6, do_sample=False) == expected
    half = StreamingMHLA(s.model, s.tokenizer, state_dtype="bf16")
    with pytest.raises(StateFileError, match="in 'float32', this stream stores them in 'bfloat16'"):
        half.load_state(old)


def test_hostile_state_dtype_files(bf16, tiny_dir, tmp_path):
    bf16.save_state(tmp_path / "good")
    meta, t = file_parts(tmp_path / "good")
    fp32 = StreamingMHLA.from_pretrained(tiny_dir)
    fp32.feed("A cat sat")
    fp32.save_state(tmp_path / "fp32")
    meta32, t32 = file_parts(tmp_path / "fp32")
    cases = [  # (stream, file) pairs that must be refused, with the message expected
        (bf16, craft(tmp_path / "a", {**meta32, "state_dtype": "bfloat16"}, t32),
         r"ring has shape .* torch.float32, expected .* torch.bfloat16"),
        (fp32, craft(tmp_path / "b", {**meta, "state_dtype": "float32"}, t),
         r"torch.bfloat16, expected .* torch.float32"),
        (fp32, craft(tmp_path / "c", {**meta32, "state_dtype": "float64"}, t32), "'float64', this stream"),
        (bf16, craft(tmp_path / "d", {**meta, "state_dtype": "bf16" * 40}, t), "this stream stores them in 'bfloat16'"),
        (bf16, craft(tmp_path / "e", meta, {**t, "layers.1.ring": t["layers.1.ring"].float()}), "layers.1.ring has"),
        (bf16, craft(tmp_path / "f", meta, {**t, "layers.0.far": t["layers.0.prefix"].bfloat16()}), "layers.0.far"),
    ]
    # a header that says BF16 over fp32-sized data (the sizes disagree): not a readable file
    raw = (tmp_path / "fp32").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["layers.0.ring"]["dtype"] = "BF16"
    text = json.dumps(header).encode()
    (tmp_path / "g").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    cases.append((fp32, tmp_path / "g", "not a readable state file|has shape|checksum"))
    for stream, path, match in cases:
        before = live(stream)
        with pytest.raises(StateFileError, match=match) as e:
            stream.load_state(path)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400
        assert_unchanged(stream, before)


def test_restore_refuses_a_snapshot_of_another_state_dtype(bf16, tiny_dir):
    fp32 = StreamingMHLA.from_pretrained(tiny_dir)
    fp32.feed(STORY)
    before = live(fp32)
    with pytest.raises(ValueError, match="stores its block summaries in bfloat16, this stream in float32"):
        fp32.restore(bf16.snapshot())
    assert_unchanged(fp32, before)
    snap = bf16.snapshot()
    bf16.feed(" and more")
    bf16.restore(snap)
    assert bf16.position == snap.position and torch.equal(bf16.cache.states[0].ring, snap.states[0].ring)


# -- command lines ---------------------------------------------------------------------------------
def test_cli_state_dtype_names_match_the_library():
    from mhla_stream.cli.common import STATE_DTYPE_NAMES
    from mhla_stream.state import STATE_DTYPES
    assert tuple(STATE_DTYPES) == STATE_DTYPE_NAMES


def test_generate_and_chat_take_state_dtype():
    runner = CliRunner()
    args = ["Once upon a time", "--json", "-t", "0", "-n", "4"]
    full = json.loads(runner.invoke(generate.main, args).output)
    half = json.loads(runner.invoke(generate.main, args + ["--state-dtype", "bf16"]).output)
    assert full["state_dtype"] == "float32" and half["state_dtype"] == "bfloat16"
    assert half["state_bytes"] < 0.65 * full["state_bytes"]  # the ring is 78% of this small model's state
    r = runner.invoke(generate.main, ["hi", "--state-dtype", "fp16"])
    assert r.exit_code == 2 and "--state-dtype" in r.output and "bf16" in r.output
    r = runner.invoke(chat.main, ["--state-dtype", "bfloat16", "-n", "3", "--seed", "0"],
                      input="Hello\n/stats\n/quit\n")
    assert r.exit_code == 0 and "summaries stored in bfloat16" in r.output


def test_bench_measures_with_a_bf16_ring(tmp_path):
    from mhla_stream.cli import bench
    rows = {}
    for name in ("fp32", "bf16"):
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(bench.main, ["--model", "mhla-tiny", "--random-weights", "--prompt-len", "40",
                                            "--new-tokens", "3", "--device", "cpu", "--state-dtype", name,
                                            "--json", str(out)])
        assert r.exit_code == 0, r.output
        rows[name] = json.loads(out.read_text())
    meta = rows["bf16"]["meta"]
    assert meta["state_dtype"] == "bfloat16" and "state_dtype=bfloat16" in meta["plans"]["1"]
    assert rows["bf16"]["rows"][0]["state_MiB"] < rows["fp32"]["rows"][0]["state_MiB"]


def test_eval_long_compares_state_dtypes(tiny_dir, tmp_path):
    np.random.default_rng(0).integers(3, 300, 500).astype(np.uint16).tofile(tmp_path / "t.bin")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(eval_long.main, ["--model", str(tiny_dir), "--tokens", str(tmp_path / "t.bin"),
                                            "--length", "100", "--sequences", "2", "--chunk", "24",
                                            "--policy", "window", "--state-dtype", "fp32,bf16",
                                            "--logit-positions", "5,70,99", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"window/float32", "window/bfloat16"}
    diff = res["logit_diff"]["window/bfloat16 vs window/float32"]
    assert diff["max_abs"][0] == 0.0 and 0 < diff["max_abs"][2] < 0.1  # no completed block yet at position 5
    assert res["state_bytes_per_sequence"]["bfloat16"] < res["state_bytes_per_sequence"]["float32"]
    bad = CliRunner().invoke(eval_long.main, ["--tokens", str(tmp_path / "t.bin"), "--state-dtype", "fp16"])
    assert bad.exit_code == 2


def test_gpu_check_script_runs_tiny_on_the_cpu(tmp_path, monkeypatch):
    import os
    import runpy
    script = os.path.join(os.path.dirname(__file__), "..", ".ci", "gpu_state_dtype.py")
    monkeypatch.setattr("sys.argv", [script, "--tiny", "--prompt-len", "30", "--new-tokens", "12"])
    monkeypatch.setenv("OUT", str(tmp_path))
    runpy.run_path(script, run_name="__main__")
    res = json.loads((tmp_path / "gpu_state_dtype.json").read_text())
    assert 0 < res["decode"]["max_abs"] < 0.1 and res["greedy_agreement"] > 0.5
    mib = res["state_MiB_per_sequence"]
    assert mib["bfloat16"] < mib["float32"]
