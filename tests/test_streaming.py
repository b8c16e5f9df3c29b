"""StreamingMHLA: feeding, generation (vs transformers generate), forks, state files, bounds."""
import os

import pytest
import torch
from conftest import STORY, rel_err

from mhla_stream import MHLAForCausalLM, SamplingParams, StateFileError, StreamingMHLA, preset_config


@pytest.fixture
def stream(tiny_dir):
    return StreamingMHLA.from_pretrained(tiny_dir)


def test_feed_in_pieces_equals_feed_at_once(tiny_dir):
    ids = torch.randint(3, 300, (300,)).tolist()
    a = StreamingMHLA.from_pretrained(tiny_dir)
    a.feed(ids)
    b = StreamingMHLA.from_pretrained(tiny_dir, prefill_chunk=7)  # chunking inside feed, too
    for cut in ([0, 1], [1, 40], [40, 41], [41, 100], [100, 300]):
        b.feed(ids[cut[0]:cut[1]])
    assert a.position == b.position == 300
    assert rel_err(b._logits, a._logits) < 1e-5
    for sa, sb in zip(a.cache.states, b.cache.states):
        assert rel_err(sb.ring, sa.ring) < 1e-5 and rel_err(sb.prefix, sa.prefix) < 1e-5


@pytest.mark.parametrize("settings", [dict(do_sample=False),
                                      dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3),
                                      dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0)])
def test_generate_ids_match_transformers_generate(tiny_dir, settings):
    s = StreamingMHLA.from_pretrained(tiny_dir)
    prompt = s.tokenizer.encode(STORY[:120], add_bos=True)
    mine = list(s.generate_ids(prompt, max_new_tokens=50, seed=7, **settings))
    model = MHLAForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(7)
    hf_kw = {k: v for k, v in settings.items()}
    if settings.get("do_sample"):
        hf_kw.setdefault("top_k", 0)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=50, pad_token_id=0, eos_token_id=2, **hf_kw)
    theirs = theirs[0, len(prompt):].tolist()
    assert mine == [t for t in theirs if t != 2] and len(mine) > 10


def test_text_streamer_matches_stream(tiny_dir, capsys):
    from transformers import TextStreamer

    class Tok:  # the minimal tokenizer interface TextStreamer uses
        def __init__(self, t):
            self.t = t

        def decode(self, ids, **kw):
            return self.t.decode(ids)

    s = StreamingMHLA.from_pretrained(tiny_dir)
    text = s.generate("The fox", max_new_tokens=30, do_sample=False, stop_at_eos=False)
    model = MHLAForCausalLM.from_pretrained(tiny_dir)
    prompt = s.tokenizer.encode("The fox", add_bos=True)
    model.generate(torch.tensor([prompt]), max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                   streamer=TextStreamer(Tok(s.tokenizer), skip_prompt=True))
    assert capsys.readouterr().out.strip() == text.strip()


def test_stream_yields_pieces_and_cuts_stop_strings(stream):
    pieces = list(stream.stream("Once upon a time", max_new_tokens=40, do_sample=False, stop_at_eos=False))
    full = "".join(pieces)
    assert len(pieces) > 1
    stream.reset()
    stop = full[len(full) // 2: len(full) // 2 + 3]
    if stop.strip():
        cut = stream.generate("Once upon a time", max_new_tokens=40, do_sample=False, stop=[stop], stop_at_eos=False)
        assert cut == full[: full.find(stop)]


def test_snapshot_forks_are_independent(stream):
    stream.feed(STORY)
    snap = stream.snapshot()
    first = stream.generate(max_new_tokens=20, seed=1, temperature=1.0)
    pos_after = stream.position
    stream.restore(snap)
    assert stream.position == snap.position
    other = stream.generate(max_new_tokens=20, seed=2, temperature=1.0)
    stream.restore(snap)
    again = stream.generate(max_new_tokens=20, seed=1, temperature=1.0)
    assert again == first and stream.position == pos_after
    assert isinstance(other, str)


def test_save_load_state_round_trip(stream, tmp_path):
    stream.feed(STORY * 3)
    path = tmp_path / "s.mhla"
    stream.save_state(path)
    expected = stream.generate(max_new_tokens=25, do_sample=False)
    stream.reset()
    assert stream.position == 0
    stream.load_state(path)
    assert stream.generate(max_new_tokens=25, do_sample=False) == expected


def test_state_file_refusals_leave_live_state_intact(stream, tiny_dir, tmp_path):
    stream.feed(STORY)
    good = tmp_path / "good.mhla"
    stream.save_state(good)
    before = stream.snapshot()

    def check(path, match):
        with pytest.raises(StateFileError, match=match):
            stream.load_state(path)
        assert stream.position == before.position
        assert torch.equal(stream.cache.states[0].prefix, before.states[0].prefix)

    data = good.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    check(tmp_path / "trunc", "truncated or damaged")
    altered = bytearray(data)
    altered[-5] ^= 0xFF
    (tmp_path / "alt").write_bytes(bytes(altered))
    check(tmp_path / "alt", "altered or damaged")
    check(tmp_path / "missing", "no such state file")
    # another model (different weights, same shapes)
    other = StreamingMHLA(MHLAForCausalLM(preset_config("mhla-tiny", vocab_size=300)), stream.tokenizer)
    other.feed([5, 6, 7])
    other.save_state(tmp_path / "other")
    check(tmp_path / "other", "made by another model")
    # an unknown version
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "v9"), metadata={**meta, "version": "9"})
    check(tmp_path / "v9", "version '9' is not known")


def test_save_is_atomic(stream, tmp_path, monkeypatch):
    stream.feed(STORY)
    path = tmp_path / "s.mhla"
    stream.save_state(path)
    old = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    stream.feed(" more text")
    with pytest.raises(KeyboardInterrupt):
        stream.save_state(path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["s.mhla"]


def test_long_stream_has_constant_state_bytes(tiny_dir):
    s = StreamingMHLA.from_pretrained(tiny_dir, prefill_chunk=2048)
    c = s.model.config
    tiles = (c.num_blocks - 1) + 2 + (s.policy == "window+far")  # ring, prefix, partial (+ far sum)
    buffers = c.num_heads * c.block_size * (c.head_k_dim + c.head_v_dim)  # the open block's keys and values
    per_layer = 3 * 8 + 4 * c.num_heads * c.head_k_dim * c.head_v_dim * tiles + 4 * buffers
    assert s.state_bytes == c.num_hidden_layers * per_layer
    sizes = []
    ids = torch.randint(3, 300, (20_000,)).tolist()
    for i in range(0, 20_000, 2500):
        s.feed(ids[i:i + 2500])
        sizes.append(s.state_bytes)
    assert s.position == 20_000 and len(set(sizes)) == 1
    assert torch.isfinite(s._logits).all()
    text = s.generate(max_new_tokens=5, do_sample=False)
    assert isinstance(text, str)


@pytest.mark.parametrize("bad,match", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                       (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
                                       (dict(repetition_penalty=0), "repetition_penalty"),
                                       (dict(max_new_tokens=-1), "max_new_tokens"), (dict(stop=[""]), "stop"),
                                       (dict(seed="x"), "seed")])
def test_invalid_sampling_values_are_rejected(stream, bad, match):
    with pytest.raises(ValueError, match=match):
        stream.generate("hi", **bad)
    assert stream.position == 0  # nothing was fed
    with pytest.raises(TypeError, match="unknown sampling argument"):
        SamplingParams.from_kwargs(temprature=1)


def test_bad_feed_input_is_rejected_before_any_change(stream):
    stream.feed("hello")
    pos = stream.position
    for bad, exc in (([1, 2, 10 ** 6], ValueError), ([1, -1], ValueError), (3.5, TypeError), ([["a"]], TypeError)):
        with pytest.raises(exc):
            stream.feed(bad)
    assert stream.position == pos


def test_unicode_round_trip_through_stream(stream):
    ids = stream.tokenizer.encode("café 東京 ✓")
    from mhla_stream.tokenizer import IncrementalDecoder
    dec = IncrementalDecoder(stream.tokenizer)
    assert "".join(dec.push(i) for i in ids) == stream.tokenizer.decode(ids)


def test_packaged_name_and_missing_340m_weights(tmp_path, monkeypatch):
    from mhla_stream import ModelNotFound
    monkeypatch.setenv("MHLA_STREAM_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelNotFound, match=r"(?s)no weights for mhla-340m found.*" + str(tmp_path)):
        StreamingMHLA.from_pretrained("mhla-340m")
    with pytest.raises(ModelNotFound, match="not a known name"):
        StreamingMHLA.from_pretrained("no-such-model")
    assert not os.path.exists(tmp_path / "mhla-340m")
