"""Model folders work with plain transformers; tokenizer ids equal the runtime's; loading is offline."""
import json
import os
import random
import runpy
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from mhla_stream import MHLAForCausalLM, ModelNotFound, StreamingMHLA
from mhla_stream.hub import PACKAGED, resolve_model
from mhla_stream.tokenizer import Tokenizer

SHIPPED = PACKAGED / "mhla-stories-17m"
PROMPT = "The old castle"

# Runs in a fresh interpreter that never imports mhla_stream itself: only the folder's shims do.
PLAIN = r'''
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline
shipped, saved = sys.argv[1:]
out = {}
for path in (shipped, saved):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tok("The old castle", return_tensors="pt")["input_ids"]
    out[path] = {"ids": ids[0].tolist()}
    if path == saved:  # dtype "auto" = as stored (fp16)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto")
        out[path].update(cls=type(model).__name__, dtype=str(model.dtype))
        continue
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="float32")
    gen = model.generate(ids, max_new_tokens=16, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    pipe = pipeline("text-generation", model=path, trust_remote_code=True, dtype="float32")
    text = pipe("The old castle", max_new_tokens=16, do_sample=False)[0]["generated_text"]
    out[path].update(cls=type(model).__name__, new=gen[0, ids.shape[1]:].tolist(), pipeline=text)
print("RESULT" + json.dumps(out))
'''


def runtime_greedy(path):
    s = StreamingMHLA.from_pretrained(path)
    ids = s.tokenizer.encode(PROMPT, add_bos=True)
    new = list(s.generate_ids(ids, max_new_tokens=16, temperature=0, stop_at_eos=False))
    s.reset()
    return ids, new, s.generate(PROMPT, max_new_tokens=16, temperature=0, stop_at_eos=False)


def test_plain_transformers_loads_shipped_and_saved_folders(tmp_path):
    saved = tmp_path / "saved"
    MHLAForCausalLM.from_pretrained("mhla-stories-17m", dtype="auto").save_pretrained(saved)
    for name in ("configuration_mhla.py", "modeling_mhla.py", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "tokenizer.model"):
        assert (saved / name).exists(), name
    assert "auto_map" in json.loads((saved / "config.json").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PLAIN, str(SHIPPED), str(saved)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.split("RESULT", 1)[1])
    ids, new, text = runtime_greedy(SHIPPED)
    shipped, copy = results[str(SHIPPED)], results[str(saved)]
    assert shipped["cls"] == copy["cls"] == "MHLAForCausalLM" and copy["dtype"] == "torch.float16"
    assert shipped["ids"] == copy["ids"] == ids and shipped["new"] == new
    assert shipped["pipeline"] == PROMPT + text  # the runtime's greedy text, word for word
    assert text.strip() and text.strip() in r.stdout  # TextStreamer printed it


def test_shim_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mhla_stream.modeling", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install mhla-stream"):
        runpy.run_path(str(SHIPPED / "modeling_mhla.py"))


def corpus():
    texts = ["Once upon a time, there was a little fox", " leading space", "   three leading", "trailing   ",
             "a   b\t\tc\n\nd", "12345 3.14159 2026-11-22 007", "café naïve über 東京 ✓ 🦊", "Ünïcödé ΑΒΓ привет",
             "", " ", "\n", "x", "tabs\tand\r\nCRLF", "zero\u200bwidth", "ﬁ ligature ＦＵＬＬ", "\"Hi!\" -- ok...",
             "\x00\x01 control \x7f", "a" * 300]
    rng = random.Random(0)
    chars = "ab cdé東 \t\n1239🦊-.,Ω"
    return texts + ["".join(rng.choice(chars) for _ in range(rng.randint(1, 40))) for _ in range(150)]


def _hf_tokenizer(directory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory, trust_remote_code=True)


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_tokenizer_json_ids_equal_the_runtime(which, tiny_dir, shared_dir):
    directory = SHIPPED if which == "shipped" else tiny_dir  # identity vs nmt_nfkc normalisation
    rt = Tokenizer.from_sentencepiece(directory / "tokenizer.model")
    hf = _hf_tokenizer(directory)
    story = open(os.path.join(shared_dir, "tinystories", "tinystories_valid_first50.txt"), encoding="utf-8").read()
    for text in corpus() + [story[:20000]]:
        ids = rt.encode(text, add_bos=True)
        assert hf(text)["input_ids"] == ids, repr(text[:80])
        # decoding keeps the dummy-prefix space that sentencepiece drops (see hf_tokenizer)
        assert hf.decode(ids, skip_special_tokens=True).removeprefix(" ") == rt.decode(ids[1:]), repr(text[:80])
    assert hf.bos_token_id == rt.bos_id and hf.eos_token_id == rt.eos_id


def test_saved_folder_without_sentencepiece_file_still_has_text(tmp_path):
    model = MHLAForCausalLM.from_pretrained("mhla-stories-17m")
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink()  # only tokenizer.json remains
    s = StreamingMHLA.from_pretrained(tmp_path)
    assert s.tokenizer.encode(PROMPT, add_bos=True) == Tokenizer.from_sentencepiece(SHIPPED / "tokenizer.model").encode(
        PROMPT, add_bos=True)
    assert s.generate(PROMPT, max_new_tokens=5, temperature=0)


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_shipped_name_and_hub_cache_resolve_offline(no_network, tmp_path, monkeypatch):
    model = MHLAForCausalLM.from_pretrained("mhla-stories-17m")
    assert model.config.num_hidden_layers == 8
    assert StreamingMHLA.from_pretrained("mhla-stories-17m").tokenizer is not None
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFound, match="hf download someone/mhla-small"):
        MHLAForCausalLM.from_pretrained("someone/mhla-small")
    repo = tmp_path / "hub" / "models--someone--mhla-small"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(SHIPPED, snapshot, ignore=shutil.ignore_patterns("training"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert resolve_model("someone/mhla-small") == snapshot
    s = StreamingMHLA.from_pretrained("someone/mhla-small")
    assert s.generate(PROMPT, max_new_tokens=4, temperature=0)


def test_dtype_strings_auto_and_rejected_arguments():
    assert MHLAForCausalLM.from_pretrained("mhla-stories-17m", dtype="auto").dtype == torch.float16  # as stored
    assert MHLAForCausalLM.from_pretrained("mhla-stories-17m", dtype="bfloat16").dtype == torch.bfloat16
    assert MHLAForCausalLM.from_pretrained("mhla-stories-17m", torch_dtype="float16").dtype == torch.float16
    assert MHLAForCausalLM.from_pretrained("mhla-stories-17m").dtype == torch.float32
    with pytest.raises(ValueError, match="device_map"):
        MHLAForCausalLM.from_pretrained("mhla-stories-17m", device_map="auto")
    with pytest.raises(TypeError, match="unsupported argument.*bogus"):
        MHLAForCausalLM.from_pretrained("mhla-stories-17m", bogus=1)
    for bad in ("int8", "float64x", torch.int32):
        with pytest.raises(ValueError, match="dtype"):
            MHLAForCausalLM.from_pretrained("mhla-stories-17m", dtype=bad)


def test_loading_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    MHLAForCausalLM.from_pretrained("mhla-stories-17m")
    StreamingMHLA.from_pretrained("mhla-stories-17m")
    assert torch.equal(torch.rand(3), expected)


def test_save_with_a_bad_tokenizer_fails_before_writing(tmp_path):
    from mhla_stream.hf_tokenizer import TokenizerConversionError
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    model = MHLAForCausalLM.from_pretrained("mhla-stories-17m")
    with pytest.raises(TokenizerConversionError, match="cannot convert the SentencePiece tokenizer"):
        model.save_pretrained(tmp_path / "out", tokenizer_model=bad)
    assert not (tmp_path / "out").exists()
