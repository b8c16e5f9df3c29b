"""``mhla-chat``: an interactive session with a streaming MHLA model.

A base model continues what you type; a model whose tokenizer has a chat template gets turns.
Tokens appear as they are produced; Ctrl-C stops a reply and keeps the conversation. On a
terminal: line editing and history (readline), colours. Every turn starts from a snapshot of the
state, so /undo and /regen cost one state copy, not a re-read of the conversation.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import click

from .common import (check_sampling, command, feed_with_progress, friendly_errors, load_stream, model_options,
                     sampling_kwargs, sampling_options, state_dtype_option)

HELP = """commands:
  /system TEXT  start over with TEXT as the system prompt (a base model reads it as the opening text);
                /system alone shows it
  /undo         take back the last exchange (your text and the reply)
  /regen        a new reply to your last text
  /reset        forget the conversation (the system prompt stays)
  /save FILE    save the conversation state (atomic)
  /load FILE    restore a saved state (/undo goes back to before it)
  /stats        position, state bytes, speed of the last reply
  /help         this text
  /quit         leave (Ctrl-D too)
input:
  a line ending in \\ continues on the next line;
  a line with only \"\"\" starts a block that ends at the next line with only \"\"\"
  Up/Down recall earlier lines, Left/Right/Home/End edit (on a terminal); Ctrl-C stops a reply"""

UNDO_DEPTH = 16  # snapshots kept: each is one copy of the state (9.6 MiB for the default model)


class Session:
    def __init__(self, stream, params, out=click.echo, colour: bool = False):
        self.stream, self.params, self.out, self.colour = stream, dict(params), out, colour
        self.stop_requested = False
        self.last = {}
        self.system = ""
        self.turns: list[tuple[object, str]] = []  # (snapshot before the turn, the user's text)
        self.regens = 0

    # -- output ------------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.out(click.style(text, dim=True) if self.colour else text)

    def error(self, text: str) -> None:
        self.out(click.style(f"error: {text}", fg="red") if self.colour else f"error: {text}")

    # -- turns -------------------------------------------------------------------------------------
    def user_turn(self, text: str) -> None:
        self.turns.append((self.stream.snapshot(), text))
        del self.turns[:-UNDO_DEPTH]
        self.regens = 0
        self.reply(self._prompt_for(text))

    def _prompt_for(self, text: str) -> str:
        tok = self.stream.tokenizer
        if tok is not None and tok.chat is not None:  # a chat model: one templated turn
            return tok.chat(text, self.system or None) if self.stream.position == 0 else tok.chat(text, None)
        if self.stream.position == 0:  # a base model continues the text; the system prompt opens it
            return f"{self.system}\n{text}" if self.system else text
        return " " + text

    def reply(self, prompt: str) -> None:
        """Feeds the prompt and streams the continuation; Ctrl-C ends the reply between tokens."""
        self.stop_requested = False
        previous = signal.signal(signal.SIGINT, self._on_interrupt) if _main_thread() else None
        try:
            t0 = time.perf_counter()
            n_in = feed_with_progress(self.stream, prompt)
            t1 = time.perf_counter()
            start = self.stream.position
            params = dict(self.params)
            if self.regens and params.get("seed") is not None:
                params["seed"] += self.regens  # a fixed seed would give the same reply again
            for piece in self.stream.stream(None, **params):
                self.out(piece, nl=False)
                if self.stop_requested:
                    self.out(" [stopped]", nl=False)
                    break
            t2 = time.perf_counter()
            n_out = self.stream.position - start
            self.last = {"prompt_tokens": n_in, "prefill_tok_s": n_in / max(t1 - t0, 1e-9),
                         "new_tokens": n_out, "decode_tok_s": n_out / max(t2 - t1, 1e-9)}
            self.out("")
            self.note(f"({n_out} tokens at {self.last['decode_tok_s']:.1f} tok/s; prompt {n_in} tokens at "
                      f"{self.last['prefill_tok_s']:.0f} tok/s)")
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _on_interrupt(self, *_):
        self.stop_requested = True

    # -- commands ----------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Runs a /command; False means quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        handler = {"/help": lambda a: self.out(HELP), "/reset": self._reset, "/system": self._system,
                   "/undo": self._undo, "/regen": self._regen, "/save": self._save, "/load": self._load,
                   "/stats": self._stats}.get(name)
        if handler is None:
            self.error(f"unknown command {name}; /help lists them")
        else:
            handler(arg)
        return True

    def _reset(self, _arg) -> None:
        self.stream.reset()
        self.turns.clear()
        self.note("(conversation cleared)")

    def _system(self, arg) -> None:
        if not arg:
            self.note(f"(system prompt: {self.system!r})" if self.system else "(no system prompt; /system TEXT sets one)")
            return
        self.stream.reset()
        self.turns.clear()
        self.system = arg
        self.note("(new conversation with this system prompt)")

    def _undo(self, _arg) -> None:
        if not self.turns:
            self.note("(nothing to undo)")
            return
        snap, _text = self.turns.pop()
        self.stream.restore(snap)
        self.note(f"(undone; position {self.stream.position})")

    def _regen(self, _arg) -> None:
        if not self.turns or self.turns[-1][1] is None:
            self.note("(nothing to regenerate)")
            return
        snap, text = self.turns[-1]
        self.stream.restore(snap)
        self.regens += 1
        self.reply(self._prompt_for(text))

    def _save(self, arg) -> None:
        if not arg:
            self.error("usage: /save FILE")
            return
        try:
            self.stream.save_state(arg)
        except Exception as e:  # full disk, no permission, bad path: one line, the session goes on
            self.error(f"cannot save {arg}: {_one_line(e)}")
            return
        self.note(f"(saved {self.stream.position} tokens of state to {arg})")

    def _load(self, arg) -> None:
        if not arg:
            self.error("usage: /load FILE")
            return
        before = self.stream.snapshot()
        try:
            self.stream.load_state(arg)
        except Exception as e:  # a bad file leaves the conversation exactly as it was
            self.stream.restore(before)
            self.error(_one_line(e))
            return
        self.turns.append((before, None))
        del self.turns[:-UNDO_DEPTH]
        self.note(f"(loaded {arg}: position {self.stream.position})")

    def _stats(self, _arg) -> None:
        s = self.stream
        parts = [f"position {s.position} tokens", f"state {s.state_bytes / 2**20:.2f} MiB", f"policy {s.policy}",
                 f"device {s.device}", f"summaries stored in {str(s.state_dtype).replace('torch.', '')}"]
        if self.last:
            parts.append(f"last reply {self.last['new_tokens']} tokens at {self.last['decode_tok_s']:.1f} tok/s")
            parts.append(f"prompt {self.last['prompt_tokens']} tokens at {self.last['prefill_tok_s']:.0f} tok/s")
        self.note("(" + ", ".join(parts) + ")")


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def history_path() -> str:
    return os.environ.get("MHLA_CHAT_HISTORY") or os.path.join(os.path.expanduser("~"), ".mhla_chat_history")


def setup_readline():
    """Line editing and a persistent history on a terminal; None where readline is missing."""
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(history_path())
    except (OSError, UnicodeDecodeError):
        pass  # first run, or an unreadable history: start empty
    readline.set_history_length(1000)
    return readline


def save_history(readline) -> None:
    if readline is None:
        return
    try:
        readline.write_history_file(history_path())
    except OSError:
        pass  # a read-only home must not spoil leaving


def line_reader(interactive: bool):
    """``read(prompt)`` -> one physical line, or None at the end of input. Undecodable bytes arrive
    as U+FFFD (stdin is reconfigured in main)."""
    def read(prompt: str):
        while True:
            try:
                line = input(prompt) if interactive else sys.stdin.readline()
            except EOFError:
                return None
            except KeyboardInterrupt:
                click.echo("\n(use /quit or Ctrl-D to leave)")
                continue
            if not interactive and line == "":
                return None
            return line.rstrip("\n").rstrip("\r")
    return read


def logical_lines(read):
    """Inputs made of one or more lines: a trailing backslash continues a line; a line with only
    \"\"\" opens a block that the next such line closes."""
    while True:
        line = read("> ")
        if line is None:
            return
        if line.strip() == '"""':
            block = []
            while (more := read("... ")) is not None and more.strip() != '"""':
                block.append(more)
            yield "\n".join(block)
            continue
        parts = []
        while line is not None and line.endswith("\\"):
            parts.append(line[:-1])
            line = read("... ")
        parts.append(line or "")
        yield "\n".join(parts)


@command
@model_options
@state_dtype_option
@sampling_options
@friendly_errors
def main(model, weights, device, dtype, backend, policy, threads, state_dtype, **kw):
    """Chat with an MHLA model (the shipped default unless --model says otherwise). /help inside lists
    the commands and how to type several lines."""
    params = sampling_kwargs(kw)
    check_sampling(params)  # reject bad values before loading anything
    try:  # bytes that are not UTF-8 become U+FFFD instead of a traceback
        sys.stdin.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    stream = load_stream(model, weights, device, dtype, backend, policy, threads, state_dtype=state_dtype)
    interactive = sys.stdin.isatty()
    colour = sys.stdout.isatty()
    readline = setup_readline() if interactive else None
    n_params = sum(p.numel() for p in stream.model.parameters())
    banner = (f"mhla-chat: {model} ({n_params / 1e6:.1f}M parameters) on {stream.device}, "
              f"state {stream.state_bytes / 2**20:.2f} MiB. /help for commands.")
    click.echo(click.style(banner, bold=True) if colour else banner)
    session = Session(stream, params, colour=colour)
    try:
        for line in logical_lines(line_reader(interactive)):
            if not line.strip():
                continue
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            session.user_turn(line)
    finally:
        save_history(readline)
    if interactive:
        click.echo("bye")


if __name__ == "__main__":
    main()
