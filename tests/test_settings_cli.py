"""One source of generation settings; the command lines' help, threads, progress; mhla-chat's commands."""
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import click
import pytest
import torch
from click.testing import CliRunner

from mhla_stream import MHLAForCausalLM, SamplingParams, StreamingMHLA
from mhla_stream.cli import chat, generate
from mhla_stream.cli.common import feed_with_progress
from mhla_stream.sampling import DEFAULTS

from conftest import STORY


def test_settings_come_from_arguments_then_folder_then_defaults():
    p = SamplingParams.resolve(None)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_new_tokens) == (
        DEFAULTS["temperature"], DEFAULTS["top_k"], DEFAULTS["top_p"], 1.0, DEFAULTS["max_new_tokens"])
    folder = {"top_k": 7, "repetition_penalty": 1.2, "max_new_tokens": 9, "num_beams": 1}
    p = SamplingParams.resolve(folder, top_k=None, temperature=0.5)
    assert (p.top_k, p.repetition_penalty, p.max_new_tokens, p.temperature, p.do_sample) == (7, 1.2, 9, 0.5, True)
    greedy = SamplingParams.resolve(folder, temperature=0)  # -t 0: transformers' greedy with this folder
    assert greedy.greedy and greedy.top_k == 0 and greedy.repetition_penalty == 1.2
    assert SamplingParams.resolve({"do_sample": False}).greedy
    assert not SamplingParams.resolve({"do_sample": False}, temperature=0.7).greedy  # a temperature asks to sample
    for bad in (dict(min_p=1.5), dict(top_p=0), dict(do_sample="yes"), dict(temperature=-0.1)):
        with pytest.raises(ValueError, match="invalid sampling parameter"):
            SamplingParams.resolve(None, **bad)
    with pytest.raises(TypeError, match="unknown sampling argument"):
        SamplingParams.resolve(None, top_q=1)


def _folder_with_settings(tiny_dir, tmp_path, **settings):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    config = json.loads((d / "generation_config.json").read_text())
    config.update(settings)
    (d / "generation_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("settings,hf_kw", [
    (dict(temperature=0), dict(do_sample=False)),
    (dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.2), dict(do_sample=True, temperature=1.0,
                                                                                 top_k=0, top_p=1.0, min_p=0.2))])
def test_runtime_equals_generate_with_the_folders_settings(tiny_dir, tmp_path, settings, hf_kw):
    d = _folder_with_settings(tiny_dir, tmp_path, repetition_penalty=1.3, top_k=5, max_new_tokens=30)
    s = StreamingMHLA.from_pretrained(d)
    prompt = s.tokenizer.encode(STORY[:120], add_bos=True)
    mine = list(s.generate_ids(prompt, seed=3, stop_at_eos=False, **settings))
    model = MHLAForCausalLM.from_pretrained(d)
    torch.manual_seed(3)
    theirs = model.generate(torch.tensor([prompt]), pad_token_id=0, eos_token_id=None, **hf_kw)[0, len(prompt):]
    assert len(mine) == 30 and mine == theirs.tolist()


def test_cli_greedy_equals_the_api(tiny_dir):
    r = CliRunner().invoke(generate.main, ["--model", str(tiny_dir), "-t", "0", "-n", "12", "--json", "The fox"])
    assert r.exit_code == 0, r.output
    api = StreamingMHLA.from_pretrained(tiny_dir).generate("The fox", max_new_tokens=12, do_sample=False)
    assert json.loads(r.output)["text"] == api


def test_help_and_version_are_fast_and_load_nothing():
    code = ("import sys\nfrom mhla_stream.cli import bench, chat, generate, serve, train\n"
            "for cmd in (chat, generate, bench, train, serve):\n"
            "    try:\n        cmd.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in r.stdout, r.stdout + r.stderr
    for cmd in (chat, generate):
        h = CliRunner().invoke(cmd.main, ["-h"])
        assert h.exit_code == 0 and "--temperature" in h.output and "--threads" in h.output
        undocumented = [p.name for p in cmd.main.params if isinstance(p, click.Option) and not p.help]
        assert undocumented == []
        v = CliRunner().invoke(cmd.main, ["--version"])
        assert v.exit_code == 0 and "0.1.0" in v.output


def test_threads_option(tiny_dir):
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(generate.main, ["--model", str(tiny_dir), "--threads", "1", "-n", "2", "hi"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
        r = CliRunner().invoke(generate.main, ["--threads", "0", "hi"])
        assert r.exit_code != 0 and "threads" in r.output
    finally:
        torch.set_num_threads(before)


def test_prefill_progress(tiny_dir, monkeypatch):
    s = StreamingMHLA.from_pretrained(tiny_dir, prefill_chunk=16)
    calls = []
    s.feed(list(range(3, 53)), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(16, 50), (32, 50), (48, 50), (50, 50)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    s.reset()
    assert feed_with_progress(s, list(range(3, 53))) == 50
    assert "prefill" in err.getvalue() and "/50 " in err.getvalue()


@pytest.fixture
def session(tiny_dir):
    out = []
    s = StreamingMHLA.from_pretrained(tiny_dir)
    sess = chat.Session(s, {"max_new_tokens": 6, "temperature": 0}, out=lambda t="", nl=True: out.append(str(t)))
    return sess, out


def test_chat_undo_regen_system(session):
    sess, out = session
    sess.user_turn("The fox ran")
    first = sess.stream.position
    snap_logits = sess.stream._logits.clone()
    sess.user_turn("to the river")
    assert sess.stream.position > first
    assert any("tok/s" in line for line in out)  # the speed line after each reply
    sess.command("/undo")
    assert sess.stream.position == first and torch.equal(sess.stream._logits, snap_logits)
    sess.command("/regen")
    assert sess.stream.position == first  # same prompt, greedy: same length again
    sess.command("/undo")
    sess.command("/undo")
    assert sess.stream.position == 0
    sess.command("/undo")
    assert "(nothing to undo)" in out
    sess.command("/system You tell stories.")
    assert sess.system == "You tell stories." and sess.stream.position == 0
    sess.user_turn("Hello")
    assert sess.stream.position > len(sess.stream.tokenizer.encode("Hello"))  # the system text was fed too


def test_chat_load_and_save_failures_leave_the_conversation(session, tmp_path, monkeypatch):
    sess, out = session
    sess.user_turn("The fox ran")
    before = sess.stream.snapshot()
    bad = tmp_path / "bad.mhla"
    bad.write_bytes(b"\x00garbage" * 50)
    for target in (bad, tmp_path / "missing.mhla", tmp_path):
        n = len(out)
        sess.command(f"/load {target}")
        assert len(out) == n + 1 and out[-1].startswith("error:") and "\n" not in out[-1]
        assert sess.stream.position == before.position and torch.equal(sess.stream._logits, before.logits)

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sess.stream, "save_state", disk_full)
    sess.command(f"/save {tmp_path / 'x.mhla'}")
    assert out[-1] == f"error: cannot save {tmp_path / 'x.mhla'}: [Errno 28] No space left on device"
    sess.user_turn("and on")  # the session goes on
    assert sess.stream.position > before.position


def test_chat_piped_multiline_and_bad_bytes(tiny_dir):
    script = (b"The fox \\\nran far\n\"\"\"\nline a\nline b\n\"\"\"\n\xff\xfe\x80 odd bytes\n/help\n/undo\n/stats\n/quit\n")
    r = CliRunner().invoke(chat.main, ["--model", str(tiny_dir), "-t", "0", "-n", "4"], input=script)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and r.output.count("tok/s;") == 3  # three inputs, three replies
    assert "/system TEXT" in r.output and '"""' in r.output and "undone" in r.output


def test_chat_process_with_invalid_utf8_on_stdin(tiny_dir):
    r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.chat", "--model", str(tiny_dir), "-t", "0", "-n", "3"],
                       input=b"\xff\xfe\xfd hello \xc3\n/quit\n", capture_output=True, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")
    assert b"tok/s" in r.stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_chat_line_editing_history_and_multiline_in_tmux(tiny_dir, tmp_path):
    name = f"mhla-{uuid.uuid4().hex[:8]}"
    cmd = f"{sys.executable} -m mhla_stream.cli.chat --model {tiny_dir} -t 0 -n 3"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MHLA_CHAT_HISTORY": str(tmp_path / "history"), "TERM": "xterm"}
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "150", "-y", "50", cmd], check=True, env=env)

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name, "-S", "-200"], capture_output=True,
                              text=True).stdout

    def send(*keys):
        subprocess.run(["tmux", "send-keys", "-t", name, *keys], check=True)

    def wait_for(text, count=1, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if screen().count(text) >= count:
                return
            time.sleep(0.3)
        raise AssertionError(f"{text!r} x{count} not on screen:\n{screen()}")

    try:
        wait_for("/help for commands")
        send("/sytem", "Left", "Left", "Left", "s", "Enter")  # edit the line: /sytem -> /system
        wait_for("no system prompt")
        send("Up", "Enter")  # history: the same line again
        wait_for("no system prompt", count=2)
        send("The fox \\", "Enter")
        wait_for("\n...")
        send("ran", "Enter")
        wait_for("tok/s;")
        send("/quit", "Enter")
        wait_for("bye")
        text = screen()
        assert "^[[" not in text and "Traceback" not in text
        assert "/system" in (tmp_path / "history").read_text()  # the history outlives the session
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


@pytest.mark.parametrize("args,word", [(["--gil-switch-us", "5"], "gil-switch-us"),
                                       (["--gil-switch-us", "x"], "gil-switch-us"),
                                       (["--gil-switch-us", "100001"], "gil-switch-us"),
                                       (["--run-ahead=no"], "run-ahead")])
def test_serve_tuning_flags_refuse_bad_values_before_loading(args, word):
    """mhla-serve's --gil-switch-us and --run-ahead: a bad value is a one-line usage error (exit 2),
    said before any model loads, and the interpreter's switch interval is left as it was."""
    from mhla_stream.cli import serve
    before = sys.getswitchinterval()
    r = CliRunner().invoke(serve.main, args)
    assert r.exit_code == 2 and word in r.output and "Traceback" not in r.output, r.output
    assert sys.getswitchinterval() == before
