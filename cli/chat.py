"""``mhla-chat``: an interactive session with a streaming MHLA model.

A base model continues what you type; a model whose tokenizer has a chat template gets turns.
Tokens appear as they are produced; Ctrl-C stops a reply and keeps the conversation.
"""
from __future__ import annotations

import signal
import sys
import time

import click

from .common import friendly_errors, load_stream, model_options, sampling_kwargs, sampling_options

HELP = """commands:
  /reset        forget the conversation
  /save FILE    save the conversation state (atomic)
  /load FILE    restore a saved state
  /stats        position, state bytes, speed of the last reply
  /help         this text
  /quit         leave (Ctrl-D too)"""


class Session:
    def __init__(self, stream, params, out=click.echo):
        self.stream, self.params, self.out = stream, params, out
        self.stop_requested = False
        self.last = {}

    def reply(self, text: str) -> None:
        """Feeds the user's text and streams the continuation; Ctrl-C ends the reply between tokens."""
        self.stop_requested = False
        previous = signal.signal(signal.SIGINT, self._on_interrupt) if _main_thread() else None
        try:
            t0 = time.perf_counter()
            n_in = self.stream.feed(text)
            t1 = time.perf_counter()
            start = self.stream.position
            for piece in self.stream.stream(None, **self.params):
                self.out(piece, nl=False)
                if self.stop_requested:
                    self.out(" [stopped]", nl=False)
                    break
            t2 = time.perf_counter()
            n_out = self.stream.position - start
            self.last = {"prompt_tokens": n_in, "prefill_tok_s": n_in / max(t1 - t0, 1e-9),
                         "new_tokens": n_out, "decode_tok_s": n_out / max(t2 - t1, 1e-9)}
            self.out("")
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _on_interrupt(self, *_):
        self.stop_requested = True

    def command(self, line: str) -> bool:
        """Runs a /command; False means quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        from mhla_stream import StateFileError
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.out(HELP)
        elif name == "/reset":
            self.stream.reset()
            self.out("(conversation cleared)")
        elif name in ("/save", "/load"):
            if not arg:
                self.out(f"usage: {name} FILE")
                return True
            try:
                if name == "/save":
                    self.stream.save_state(arg)
                    self.out(f"(saved {self.stream.position} tokens of state to {arg})")
                else:
                    self.stream.load_state(arg)
                    self.out(f"(loaded {arg}: position {self.stream.position})")
            except (StateFileError, OSError) as e:
                self.out(f"error: {e}")
        elif name == "/stats":
            s = self.stream
            parts = [f"position {s.position} tokens", f"state {s.state_bytes / 2**20:.2f} MiB", f"policy {s.policy}",
                     f"device {s.device}"]
            if self.last:
                parts.append(f"last reply {self.last['new_tokens']} tokens at {self.last['decode_tok_s']:.1f} tok/s")
                parts.append(f"prompt {self.last['prompt_tokens']} tokens at {self.last['prefill_tok_s']:.0f} tok/s")
            self.out("(" + ", ".join(parts) + ")")
        else:
            self.out(f"unknown command {name}; /help lists them")
        return True


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _lines(interactive: bool):
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:
            click.echo("\n(use /quit or Ctrl-D to leave)")
            continue
        if not interactive and line == "":
            return
        yield line.rstrip("\n")


@click.command()
@model_options
@sampling_options
@friendly_errors
def main(model, weights, device, dtype, backend, policy, **kw):
    """Chat with an MHLA model (the shipped default unless --model says otherwise)."""
    from mhla_stream.sampling import SamplingParams
    params = sampling_kwargs(kw)
    SamplingParams.from_kwargs(**params)  # reject bad values before loading anything
    stream = load_stream(model, weights, device, dtype, backend, policy)
    interactive = sys.stdin.isatty()
    n_params = sum(p.numel() for p in stream.model.parameters())
    click.echo(f"mhla-chat: {model} ({n_params / 1e6:.1f}M parameters) on {stream.device}, "
               f"state {stream.state_bytes / 2**20:.2f} MiB. /help for commands.")
    session = Session(stream, params)
    for line in _lines(interactive):
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
            continue
        if stream.tokenizer is not None and stream.tokenizer.chat is not None:
            session.reply(stream.tokenizer.chat(line))  # a chat model: one templated turn
        else:
            session.reply(line if stream.position == 0 else " " + line)  # a base model continues the text
    if interactive:
        click.echo("bye")


if __name__ == "__main__":
    main()
