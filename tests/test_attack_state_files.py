"""Hostile state files and snapshots: everything is validated in one place before the live stream
is touched, crafted files with a recomputed checksum are refused when inconsistent, saves that
fail or were killed leave no damage and no litter, and fingerprints follow the stored weights."""
import json
import os
import shutil
import time

import pytest
import torch
from conftest import STORY
from safetensors import safe_open
from safetensors.torch import save_file

from mhla_stream import MHLAForCausalLM, StateFileError, StreamingMHLA
from mhla_stream import state_io
from mhla_stream.hub import PACKAGED


@pytest.fixture
def stream(tiny_dir):
    s = StreamingMHLA.from_pretrained(tiny_dir)
    s.feed(STORY)
    return s


@pytest.fixture
def saved(stream, tmp_path):
    path = tmp_path / "good.mhla"
    stream.save_state(path)
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def craft(path, meta, tensors, *, recompute=True):
    """Writes a state file as an attacker would, with a valid checksum unless told otherwise."""
    meta = dict(meta)
    if recompute:
        meta["sha256"] = state_io.digest(tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def live(s):
    return (s.position, s.cache.seen, list(s._history), s._logits.clone(),
            [st.clone() for st in s.cache.states])


def assert_unchanged(s, before):
    pos, seen, hist, logits, states = before
    assert s.position == pos and s.cache.seen == seen and list(s._history) == hist
    assert torch.equal(s._logits, logits)
    for a, b in zip(s.cache.states, states):
        for n in a.TENSORS:
            assert torch.equal(getattr(a, n), getattr(b, n))


def refused(stream, path, match):
    other = StreamingMHLA(stream.model, stream.tokenizer)
    other.feed("Tom had a red ball")  # a live stream that differs from the file
    before = live(other)
    with pytest.raises(StateFileError, match=match):
        other.load_state(path)
    assert_unchanged(other, before)


def edit(tensors, **changes):
    out = dict(tensors)
    for k, v in changes.items():
        if v is None:
            out.pop(k.replace("__", "."))
        else:
            out[k.replace("__", ".")] = v
    return out


@pytest.mark.parametrize("field,value,match", [
    ("position", "x", "position 'x' is not an int"), ("position", "-5", "not an int >= 0"),
    ("position", "9", "says .* tokens were seen, the position says 9"), ("position", "1e3", "not an int"),
    ("position", "99999999999999999999", "not an int"), ("policy", "window+far", "policy 'window\\+far'"),
    ("version", "1", "older release"), ("format", "zip", "not an mhla-stream state file"),
    ("model", "0" * 32, "made by another model")])
def test_crafted_metadata_with_a_valid_checksum(stream, saved, tmp_path, field, value, match):
    meta, tensors = saved
    refused(stream, craft(tmp_path / "f", {**meta, field: value}, tensors), match)


def test_metadata_is_covered_by_the_checksum(stream, saved, tmp_path):
    meta, tensors = saved
    refused(stream, craft(tmp_path / "f", {**meta, "position": "9"}, tensors, recompute=False), "checksum mismatch")


def test_crafted_tensors_with_a_valid_checksum(stream, saved, tmp_path):
    meta, t = saved
    V = t["logits"].shape[0]
    nan_ring = t["layers.0.ring"].clone()
    nan_ring.view(-1)[3] = float("nan")
    cases = [
        (edit(t, history=None), "history is missing"),
        (edit(t, logits=None), "logits are missing at position"),
        (edit(t, layers__1__prefix=None), "layers.1.prefix is missing"),
        (edit(t, logits=torch.zeros(V + 1)), r"logits have shape \(%d,\)" % (V + 1)),
        (edit(t, logits=torch.full((V,), float("nan"))), "logits hold NaN"),
        (edit(t, logits=t["logits"].double()), "torch.float64"),
        (edit(t, history=torch.tensor([1, 2, V])), "history holds token ids outside"),
        (edit(t, history=torch.tensor([-1])), "history holds token ids outside"),
        (edit(t, history=t["history"].float()), "1-D int64"),
        (edit(t, history=torch.arange(500) % 7), "history holds 500 tokens but the position"),
        (edit(t, layers__0__pos=t["layers.0.pos"] + 1), "tokens were seen"),
        (edit(t, layers__0__ring=t["layers.0.ring"][..., :-1].contiguous()), "layers.0.ring has shape"),
        (edit(t, layers__0__prefix=t["layers.0.prefix"].double()), "layers.0.prefix has shape"),
        (edit(t, layers__0__ring=nan_ring), "NaN or infinite"),
        (edit(t, **{"layers.9.ring": torch.zeros(1)}), "unexpected tensors layers.9.ring"),
    ]
    for i, (tensors, match) in enumerate(cases):
        refused(stream, craft(tmp_path / f"f{i}", meta, tensors), match)


def test_a_good_crafted_file_still_loads(stream, saved, tmp_path):
    meta, tensors = saved
    path = craft(tmp_path / "same", meta, tensors)
    expected = stream.generate(max_new_tokens=8, do_sample=False)
    stream.reset()
    stream.load_state(path)
    assert stream.generate(max_new_tokens=8, do_sample=False) == expected


def test_state_at_position_zero_round_trips(tiny_dir, tmp_path):
    s = StreamingMHLA.from_pretrained(tiny_dir)
    s.save_state(tmp_path / "empty")
    s.feed("hello")
    s.load_state(tmp_path / "empty")
    assert s.position == 0 and s._logits is None


def test_restore_is_all_or_nothing(tiny_dir, stream):
    far = StreamingMHLA.from_pretrained(tiny_dir, policy="window+far")
    far.feed(STORY)
    snap = far.snapshot()
    before = live(stream)
    with pytest.raises(ValueError, match="another policy"):
        stream.restore(snap)
    assert_unchanged(stream, before)
    good = stream.snapshot()
    bad = stream.snapshot()
    bad.history = [10 ** 9]
    with pytest.raises(ValueError, match="history holds token ids outside"):
        stream.restore(bad)
    bad = stream.snapshot()
    bad.position = bad.position + 3
    with pytest.raises(ValueError, match="tokens were seen"):
        stream.restore(bad)
    bad = stream.snapshot()
    bad.states = bad.states[:1]
    with pytest.raises(ValueError, match="layer count"):
        stream.restore(bad)
    assert_unchanged(stream, before)
    stream.restore(good)
    assert_unchanged(stream, before)


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(stream, tmp_path, monkeypatch):
    path = tmp_path / "s.mhla"
    stream.save_state(path)
    old = path.read_bytes()
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    stream.feed(" more")
    with pytest.raises(StateFileError, match="could not save the state .*No space left"):
        stream.save_state(path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["s.mhla"]
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(StateFileError, match="No space"):
        stream.save_state(path)
    assert path.read_bytes() == old


def test_killed_saves_leave_temporaries_that_the_next_save_removes(stream, tmp_path):
    stale, fresh, foreign = tmp_path / ".state-abc.tmp", tmp_path / ".state-new.tmp", tmp_path / "keep.tmp"
    for p in (stale, fresh, foreign):
        p.write_bytes(b"x" * 100)
    old = time.time() - state_io.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(foreign, (old, old))
    stream.save_state(tmp_path / "s.mhla")
    assert not stale.exists() and fresh.exists() and foreign.exists()


def test_old_version_files_are_refused_with_a_clear_message(stream, saved, tmp_path):
    meta, tensors = saved
    v1 = {**meta, "version": "1", "sha256": state_io.digest(tensors)}  # v1 hashed tensors only
    refused(stream, craft(tmp_path / "v1", v1, tensors, recompute=False), "older release .* save the stream again")


def test_fingerprint_ignores_running_dtype_and_library_version(tmp_path):
    a = MHLAForCausalLM.from_pretrained(PACKAGED / "mhla-stories-17m", dtype=torch.bfloat16)
    b = MHLAForCausalLM.from_pretrained(PACKAGED / "mhla-stories-17m", dtype=torch.float32)
    assert state_io.model_fingerprint(a) == state_io.model_fingerprint(b)
    sa = StreamingMHLA(a)
    sa.feed([1, 5, 9, 200])
    sa.save_state(tmp_path / "bf16.mhla")
    sb = StreamingMHLA(b)
    sb.load_state(tmp_path / "bf16.mhla")  # a bf16 stream's state continues under fp32 weights
    assert sb.position == 4
    d = tmp_path / "copy"
    shutil.copytree(PACKAGED / "mhla-stories-17m", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "transformers_version": "99.0.0", "dtype": "bfloat16"}))
    c = MHLAForCausalLM.from_pretrained(d)
    assert state_io.model_fingerprint(c) == state_io.model_fingerprint(b)


def test_fingerprint_sees_every_single_weight(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    base = state_io.model_fingerprint(MHLAForCausalLM.from_pretrained(tiny_dir))
    d = tmp_path / "one-changed"
    shutil.copytree(tiny_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    sd[key].view(-1)[sd[key].numel() // 2 + 7] += 1e-3  # one value, off any sampling stride
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert state_io.model_fingerprint(MHLAForCausalLM.from_pretrained(d)) != base
    m = MHLAForCausalLM.from_pretrained(tiny_dir)
    m._mhla_stored_weights = None  # a model built in memory hashes every live value
    live_fp = state_io.model_fingerprint(m)
    with torch.no_grad():
        m.model.layers[0].attn.q_proj.weight.view(-1)[-1] += 1e-4
    assert state_io.model_fingerprint(m) != live_fp


def test_fingerprint_of_sharded_and_bin_checkpoints_is_stable(tmp_path):
    from refckpt import reference_state_dict, write_reference_checkpoint
    sd = reference_state_dict()
    prints = []
    for fmt, shards in (("safetensors", 1), ("safetensors", 2), ("bin", 2)):
        d = tmp_path / f"{fmt}{shards}"
        write_reference_checkpoint(d, sd, fmt=fmt, shards=shards)
        a = state_io.model_fingerprint(MHLAForCausalLM.from_pretrained(d, dtype=torch.bfloat16))
        assert a == state_io.model_fingerprint(MHLAForCausalLM.from_pretrained(d))
        prints.append(a)
    assert prints[0] == prints[1] == prints[2]  # the same stored values, however they are split


def test_weights_rewritten_after_loading_are_not_vouched_for(tiny_dir, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(tiny_dir, d)
    m = MHLAForCausalLM.from_pretrained(d)
    stored = m._mhla_stored_weights
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    os.utime(d / "model.safetensors", ns=(1, 1))
    assert stored.digest() is None  # falls back to hashing the live values


def test_version_2_files_without_the_open_buffers_continue_the_stream(stream, saved, tmp_path):
    """Files written before the open block's token form (version 2) hold R alone: they load with
    empty buffers and R complete up to the position, and the stream goes on as the saved one."""
    meta, tensors = saved
    old = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in ("open_keys", "open_values", "partial_end")}
    assert len(old) < len(tensors)
    path = craft(tmp_path / "v2.mhla", {**meta, "version": "2"}, old)
    other = StreamingMHLA(stream.model, stream.tokenizer)
    other.load_state(path)
    assert other.position == stream.position
    for st in other.cache.states:
        assert st.partial_end.tolist() == [[stream.position] * 2] and not bool(st.buffered_slots().any())
    assert other.generate(max_new_tokens=6, do_sample=False) == stream.generate(max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("value", [-1, 10 ** 9])
def test_a_crafted_partial_end_is_refused(stream, saved, tmp_path, value):
    meta, tensors = saved
    bad = edit(tensors, layers__0__partial_end=torch.full_like(tensors["layers.0.partial_end"], value))
    refused(stream, craft(tmp_path / "pe", meta, bad), "partial_end says")


def test_a_version_3_file_missing_its_buffers_is_refused(stream, saved, tmp_path):
    meta, tensors = saved
    refused(stream, craft(tmp_path / "nob", meta, edit(tensors, layers__0__open_keys=None)),
            "tensor layers.0.open_keys is missing")


def test_a_nonzero_r_outside_its_block_and_a_version_2_file_with_buffers_are_refused(stream, saved, tmp_path):
    """R that holds no token of the current block (partial_end at or before the block start) must
    be zero: the decode kernel ignores it, the other forms would not. And a version-2 file has no
    open buffers."""
    meta, tensors = saved
    pos = int(meta["position"])
    start = torch.full_like(tensors["layers.0.partial_end"], pos - pos % 8)  # the tiny model's block size
    refused(stream, craft(tmp_path / "dead", meta, edit(tensors, layers__0__partial_end=start)),
            "layers.0.partial is not zero though it holds no token")
    refused(stream, craft(tmp_path / "v2b", {**meta, "version": "2"}, tensors), "version-2 state file holds tensor")
