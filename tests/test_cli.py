"""The command-line tools end to end on the CPU with the shipped model."""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from click.testing import CliRunner

from mhla_stream.cli import bench, chat, generate

FAST = ["--max-new-tokens", "12", "--seed", "0"]


def run(cmd, args, input=None):
    return CliRunner().invoke(cmd.main, args, input=input)


def test_generate_argument_stdin_file_and_json(tmp_path):
    r = run(generate, ["Once upon a time", *FAST])
    assert r.exit_code == 0 and len(r.output.strip()) > 0
    r = run(generate, ["--json", "-t", "0", *FAST], input="The little dog")
    data = json.loads(r.output)
    assert data["new_tokens"] > 0 and data["prompt_tokens"] == 4 and data["decode_tok_s"] > 0
    (tmp_path / "p.txt").write_text("Tom had a red ball.")
    r2 = run(generate, ["--file", str(tmp_path / "p.txt"), "--json", "-t", "0", *FAST])
    assert json.loads(r2.output)["text"]


@pytest.mark.parametrize("args,msg", [(["hi", "--top-p", "0"], "top-p"), (["hi", "--temperature", "-1"], "temperature"),
                                      (["hi", "--model", "nope"], "not a known name"),
                                      (["hi", "--backend", "gpu"], "backend")])
def test_generate_bad_flags(args, msg):
    r = run(generate, args)
    assert r.exit_code != 0 and msg in r.output


def test_missing_340m_weights_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("MHLA_STREAM_HOME", str(tmp_path / "home"))
    r = run(chat, ["--model", "mhla-340m", "--weights", str(tmp_path / "w")])
    assert r.exit_code == 2
    for part in (str(tmp_path / "w"), str(tmp_path / "home" / "mhla-340m"), "reference", "model_type 'gla'"):
        assert part in r.output


def test_chat_piped_stdin_commands(tmp_path):
    state = tmp_path / "conv.mhla"
    script = f"Once upon a time\n/stats\n/save {state}\n/reset\n/load {state}\n/load {tmp_path / 'nope'}\nThen\n/bogus\n/quit\n"
    r = run(chat, ["-t", "0", *FAST], input=script)
    assert r.exit_code == 0, r.output
    assert "position" in r.output and "state" in r.output
    assert f"saved" in r.output and "loaded" in r.output and state.exists()
    assert "no such state file" in r.output and "unknown command /bogus" in r.output


def test_bench_cpu_with_transformer_compare(tmp_path):
    out = tmp_path / "b.json"
    r = run(bench, ["--model", "mhla-stories-17m", "--prompt-len", "128", "--new-tokens", "4", "--compare",
                    "transformer", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert {row["model"] for row in rows} == {"mhla", "transformer"}
    assert all(row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 for row in rows)
    r = run(bench, ["--prompt-len", "x"])
    assert r.exit_code != 0 and "comma-separated" in r.output


def test_bench_decode_only_copies_one_prefill_into_the_batch(tmp_path):
    """--decode-only: MHLA rows have no prefill figures and decode at every batch, with a state the
    size of the batch's; the Transformer rows of the same run are measured in full."""
    out = tmp_path / "d.json"
    r = run(bench, ["--model", "mhla-stories-17m", "--prompt-len", "130", "--batch", "1,3", "--new-tokens", "3",
                    "--decode-only", "--compare", "transformer", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["meta"]["decode_only"] is True
    mhla = [row for row in data["rows"] if row["model"] == "mhla"]
    other = [row for row in data["rows"] if row["model"] == "transformer"]
    assert [row["batch"] for row in mhla] == [1, 3] and [row["batch"] for row in other] == [1, 3]
    assert all("prefill_tok_s" not in row and row["decode_only"] and row["decode_tok_s"] > 0 for row in mhla)
    assert all(row["prefill_tok_s"] > 0 and "decode_only" not in row for row in other)
    assert mhla[1]["state_MiB"] == pytest.approx(3 * mhla[0]["state_MiB"])


def test_bench_decode_only_state_is_the_prompts_in_every_row():
    import torch
    from mhla_stream import MHLACache, MHLAForCausalLM
    from mhla_stream.graphs import prefill
    m = MHLAForCausalLM.from_pretrained("mhla-stories-17m")
    ids = torch.randint(3, m.config.vocab_size, (1, 130))
    one = MHLACache(m.new_state(1))
    prefill(m, one, ids, 64, m.make_plan(1))
    many = MHLACache(m.new_state(3))
    for live, src in zip(many.states, one.states):
        live.copy_(src)  # what run_one(decode_only=True) does
    for live, src in zip(many.states, one.states):
        for b in range(3):
            for n in live.TENSORS:
                assert torch.equal(getattr(live, n)[b], getattr(src, n)[0])


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_chat_in_a_real_terminal(tmp_path):
    """Type into mhla-chat under tmux, read the screen: reply, /stats, /save, /load, Ctrl-C, quit."""
    name = f"mhla-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "t.mhla"
    cmd = f"{sys.executable} -m mhla_stream.cli.chat -t 0 -n 400 --seed 0"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "200", "-y", "50", cmd], check=True,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name, "-S", "-200"], capture_output=True,
                              text=True).stdout

    def send(*keys):
        subprocess.run(["tmux", "send-keys", "-t", name, *keys], check=True)

    def wait_for(text, timeout=120, count=1):
        end = time.time() + timeout
        while time.time() < end:  # capture-pane drops trailing blanks: a prompt line is ">" alone
            found = sum(line.startswith(">") for line in screen().splitlines()) if text == "> " else screen().count(text)
            if found >= count:
                return
            time.sleep(0.3)
        raise AssertionError(f"{text!r} not on screen:\n{screen()}")

    try:
        wait_for("/help for commands")
        wait_for("> ")
        send("Once upon a time, a little cat", "Enter")
        time.sleep(0.5)
        send("C-c")  # stop the reply mid-way; the conversation stays
        wait_for("[stopped]")
        wait_for("> ", count=2)
        send("/stats", "Enter")
        wait_for("position")
        send(f"/save {state}", "Enter")
        wait_for("saved")
        send("/reset", "Enter")
        wait_for("conversation cleared")
        send(f"/load {state}", "Enter")
        wait_for("loaded")
        send("/quit", "Enter")
        wait_for("bye")
        assert state.exists()
        text = screen()
        assert "Traceback" not in text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_examples_run(shared_dir, tmp_path):
    ex = os.path.join(os.path.dirname(__file__), "..", "examples")
    book = os.path.join(shared_dir, "gutenberg", "alices-adventures-in-wonderland.txt.xz")
    r = subprocess.run([sys.executable, os.path.join(ex, "summarize_long_document.py"), book, "--max-chars", "30000",
                        "--chars-per-chunk", "10000", "--max-new-tokens", "10"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "(constant)" in r.stdout and "In short" in r.stdout
    stories = os.path.join(shared_dir, "tinystories", "tinystories_valid_first50.txt")
    r = subprocess.run([sys.executable, os.path.join(ex, "fork_document.py"), stories], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---") == 2


def test_bench_records_tuned_products_only_where_triton_runs(monkeypatch):
    """mhla-bench's ``tuned_products`` meta: CUDA with Triton only. ``--backend auto`` on a CUDA
    machine without Triton (not a dependency off Linux) resolves to torch: the Triton module must
    not be imported (it raised after every row was measured, before the JSON was written)."""
    import json
    import sys

    assert bench.tuned_products("cpu", "auto") is None
    assert bench.tuned_products("cuda", "torch") is None
    json.dumps(bench.tuned_products("cuda", "auto"))  # (Triton here: its picks so far, JSON-serialisable)
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "mhla_stream.kernels.triton_skinny", raising=False)
    assert bench.tuned_products("cuda", "auto") is None
