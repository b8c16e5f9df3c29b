"""Hostile inputs to the stream, the sampler, the tokenizer path and the command-line tools: each is
refused with one clear line before anything is fed, and the stream is left as it was."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mhla_stream import SamplingParams, StreamingMHLA
from mhla_stream.cli import bench, generate, train
from mhla_stream.tokenizer import TokenizerError


@pytest.fixture(scope="module")
def stream(tiny_dir):
    return StreamingMHLA.from_pretrained(tiny_dir)


@pytest.mark.parametrize("bad", [b"abc", bytearray(b"ab"), memoryview(b"a"), [1.0, 2.0], [1, 2.5], [True, 3], ["1", "2"],
                                 [None], {1, 2}, {1: 2}, 7, 3.0, torch.tensor([1.0, 2.0]), torch.tensor([True]),
                                 np.array([1.5])])
def test_feed_refuses_what_is_not_text_or_int_ids(stream, bad):
    before = stream.position
    with pytest.raises(TypeError):
        stream.feed(bad)
    assert stream.position == before


def test_feed_accepts_int_like_ids(stream):
    stream.reset()
    assert stream.feed(np.array([1, 5, 9], dtype=np.int32)) == 3
    assert stream.feed(torch.tensor([[4, 6]])) == 2
    assert stream.feed((np.int64(3), 7)) == 2
    with pytest.raises(ValueError, match="token ids must be in"):
        stream.feed([1, 10 ** 6])
    assert stream.position == 7


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(seed=2 ** 64), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
    (dict(top_k=-1), "top_k"), (dict(top_k=True), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(top_p=0), "top_p"), (dict(top_p=float("nan")), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(do_sample="yes"), "do_sample"), (dict(stop=[""]), "stop"), (dict(stop=[3]), "stop"),
    (dict(stop_at_eos="no"), "stop_at_eos")])
def test_sampling_values_are_checked_before_the_prompt_is_fed(stream, kw, match):
    stream.reset()
    stream.feed("Once")
    before = stream.position
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
        stream.generate(" upon a time " * 20, **kw)
    assert stream.position == before
    with pytest.raises(ValueError, match=match):
        list(stream.generate_ids([5, 6, 7], **kw))
    assert stream.position == before


def test_largest_seed_works(stream):
    SamplingParams(seed=2 ** 64 - 1)
    assert isinstance(stream.generate("Hi", max_new_tokens=2, seed=2 ** 64 - 1), str)


@pytest.mark.parametrize("text", ["abc\udcff", "\ud800", "ok \udfff ok"])
def test_lone_surrogates_are_a_clear_tokenizer_error(stream, text):
    before = stream.position
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        stream.feed(text)
    assert stream.position == before


def test_backend_that_cannot_run_here_fails_at_construction(tiny_dir, no_triton_interpreter):
    with pytest.raises(RuntimeError, match="needs CUDA"):
        StreamingMHLA.from_pretrained(tiny_dir, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        StreamingMHLA.from_pretrained(tiny_dir, backend="gpu")


# -- the command-line tools: one line on stderr, exit 2, never a traceback --------------------

def cli(cmd, args, input=None):
    r = CliRunner().invoke(cmd.main, args, input=input)
    assert isinstance(r.exception, SystemExit) or r.exception is None, r.exception
    return r


@pytest.mark.parametrize("args,input,match", [
    (["abc\udcff"], None, "prompt argument is not UTF-8"),
    ([], b"abc\xff\xfe", "standard input is not UTF-8 .byte 0xff at offset 3"),
    (["hi", "--weights", "/tmp"], None, "--weights is only for mhla-340m"),
    (["hi", "--seed", str(2 ** 64)], None, "seed"),
    (["hi", "--device", "tpu"], None, "--device tpu"),
])
def test_generate_bad_bytes_and_flags(args, input, match):
    r = cli(generate, [*args, "-n", "2"], input=input)
    assert r.exit_code == 2 and match.split(" .")[0] in r.output and "Traceback" not in r.output


def test_generate_bad_file_bytes(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\xc3\x28 broken")
    r = cli(generate, ["--file", str(tmp_path / "p.txt"), "-n", "2"])
    assert r.exit_code == 2 and "is not UTF-8 text" in r.output


def test_generate_triton_on_a_cpu(no_triton_interpreter):
    r = cli(generate, ["hi", "--backend", "triton", "--device", "cpu", "-n", "2"])
    assert r.exit_code == 2 and "needs CUDA" in r.output


def test_bench_checks_json_folder_and_weights_before_running(tmp_path):
    r = cli(bench, ["--model", "mhla-stories-17m", "--json", str(tmp_path / "missing" / "x.json")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = cli(bench, ["--model", "mhla-stories-17m", "--weights", str(tmp_path)])
    assert r.exit_code == 2 and "--weights is only for" in r.output


@pytest.fixture
def train_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("stories", "books", "valid"):
        rng.integers(3, 100, 600).astype(np.uint16).tofile(d / f"{name}.bin")
    (d / "info.json").write_text(json.dumps({"vocab_size": 100}))
    from mhla_stream.hub import PACKAGED  # a real tokenizer: the best checkpoint gets a tokenizer.json
    (d / "tokenizer.model").write_bytes((PACKAGED / "mhla-stories-17m" / "tokenizer.model").read_bytes())
    return d


TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--block-size", "8", "--num-blocks", "2", "--batch", "2",
        "--eval-every", "1"]


@pytest.mark.parametrize("args,match", [
    (["--hidden", "0"], "--hidden"), (["--heads", "-1"], "--heads"), (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"), (["--stories-frac", "nan"], "--stories-frac"), (["--policy", "sliding"], "--policy"),
    (["--stories-frac", "2"], "--stories-frac"),
    (["--minutes", "-1"], "--minutes"), (["--batch", "x"], "--batch"), (["--block-size", "0"], "--block-size"),
    (["--hidden", "30", "--heads", "4"], "not divisible"), (["--num-blocks", "200000"], "context"),
    (["--arch", "transformer", "--hidden", "96"], "multiple of 64"), (["--seed", "-3"], "--seed"),
])
def test_train_bad_arguments(train_data, tmp_path, args, match):
    r = cli(train, ["--data", str(train_data), "--out", str(tmp_path / "o"), *TINY, *args])
    assert r.exit_code == 2 and match in r.output


def test_train_bad_data_folder(train_data, tmp_path):
    (train_data / "info.json").write_text("{broken")
    r = cli(train, ["--data", str(train_data), "--out", str(tmp_path / "o"), *TINY])
    assert r.exit_code == 2 and "info.json: not JSON with a vocab_size" in r.output
    (train_data / "info.json").write_text(json.dumps({"vocab_size": 100}))
    (train_data / "valid.bin").write_bytes(b"\x00\x01")
    r = cli(train, ["--data", str(train_data), "--out", str(tmp_path / "o"), *TINY])
    assert r.exit_code == 2 and "valid.bin: 1 tokens, need at least" in r.output


@pytest.mark.slow
def test_train_resume_works_and_never_unpickles(train_data, tmp_path):
    out = tmp_path / "o"
    r = cli(train, ["--data", str(train_data), "--out", str(out), *TINY, "--steps", "1"])
    assert r.exit_code == 0, r.output
    r = cli(train, ["--data", str(train_data), "--out", str(out), *TINY, "--steps", "2"])
    summary = json.loads(r.output[r.output.rindex('{"arch"'):].splitlines()[0])
    assert r.exit_code == 0 and "resumed from" in r.output and summary["steps"] == 2
    r = cli(train, ["--data", str(train_data), "--out", str(out), *TINY, "--steps", "3", "--hidden", "64"])
    assert r.exit_code == 2 and "model.embeddings.weight has shape" in r.output
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (out / "ckpt.safetensors").unlink()  # so the legacy torch.save file is the one resumed from
    torch.save({"model": Evil(), "opt": {}, "step": 1, "best": 1.0, "elapsed": 0.0}, out / "ckpt.pt")
    r = cli(train, ["--data", str(train_data), "--out", str(out), *TINY, "--steps", "3"])
    assert r.exit_code == 2 and "pickled objects, which are never run" in r.output
    assert not marker.exists()


def test_two_threads_decoding_on_one_model_do_not_abort():
    """numba's workqueue layer aborts the process on concurrent launches (it did here without the
    launch lock): run it in a child, on the shipped model so that the launches really overlap."""
    from mhla_stream.hub import PACKAGED
    model_dir = PACKAGED / "mhla-stories-17m"
    code = textwrap.dedent(f"""
        import threading, torch
        from mhla_stream import StreamingMHLA, MHLAForCausalLM
        model = MHLAForCausalLM.from_pretrained({str(model_dir)!r})
        outs, errors = {{}}, []
        def work(i):
            try:
                s = StreamingMHLA(model, backend="numba")
                s.feed([1, 5 + i, 9])
                outs[i] = list(s.generate_ids(None, max_new_tokens=30, do_sample=False, stop_at_eos=False))
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
        ref = StreamingMHLA(model, backend="numba"); ref.feed([1, 5, 9])
        assert not errors, errors
        assert outs[0] == list(ref.generate_ids(None, max_new_tokens=30, do_sample=False, stop_at_eos=False))
        print("ok", len(outs[0]), len(outs[1]))
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok 30 30" in r.stdout, r.stderr[-2000:]
