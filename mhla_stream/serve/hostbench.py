"""The server's host cost on its own: the real app, engine, text decoding and HTTP path around a
stand-in runner whose steps cost ~0 (no model runs). What it serves is meaningless text; what it
measures is how many streamed tokens a second the host side of ``mhla-serve`` can deliver, i.e. the
ceiling the server puts on a fast device. For benchmarks and tests only: no console script, no
``mhla-serve`` flag (it takes ``--http-process``, as mhla-serve does).

    python -m mhla_stream.serve.hostbench --port 8123 --max-batch 64    # then drive it, e.g.
    python -m mhla_stream.cli.serve_bench --fake-model --concurrency 1,8,32,64

The stand-in's "model" continues every slot with one fixed cycle of real tokens: a story's, less its
rarer ids (so the logits it hands the engine are narrow and its own tensor work stays ~0), so the
text decoder sees real text. It keeps no state: session requests on it fail cleanly.
"""
from __future__ import annotations

import sys

import torch

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with "
         "her friends. One day, she saw a big red ball in the park and ran to get it. \"Look, Ben!\" she said. "
         "\"Can we play with the ball together?\" Ben smiled and said yes. They played all day until the sun "
         "went down, and then they went home, happy and tired.\n")
NARROW = 2048  # the cycle keeps only the story's ids below this


class FakeRunner:
    """Implements ``StepRunner``'s interface in ~0 time and records every call (``calls``: ("decode",
    rows) and ("feed", tokens) in order), so tests can count the prefill work between decode steps."""

    graphs = False

    def __init__(self, tokenizer, vocab_size: int, max_batch: int, prefill_chunk: int, piece: int | None = None,
                 record: bool = False):
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.prefill_piece = piece or prefill_chunk
        ids = [i for i in tokenizer.encode(STORY) if i < min(vocab_size, NARROW)]
        # row k: logits whose argmax is the cycle's k-th token, only as wide as the ids used
        self.table = torch.full((len(ids), max(ids) + 1), -1.0)
        self.table[torch.arange(len(ids)), torch.tensor(ids)] = 1.0
        self.position = [0] * (max_batch + 1)  # per slot, then the staging row
        self.picks = torch.zeros(max_batch, dtype=torch.long)
        self.record = record
        self.calls: list[tuple[str, int]] = []

    def describe(self) -> str:
        return f"fake runner (no model): {self.max_batch} slots, prefill chunk {self.prefill_chunk}"

    def info(self) -> dict[str, str]:
        return {"slots": str(self.max_batch), "prefill_chunk": str(self.prefill_chunk), "fake": "True"}

    def rows(self, start: int, stop: int):
        raise RuntimeError("the host-cost harness keeps no state: sessions are not served by it")

    def decode(self, tokens: dict[int, int], auto=()):
        from .runner import DecodeStep
        slots = [*tokens, *auto]
        lo, hi = min(slots), max(slots) + 1
        if self.record:
            self.calls.append(("decode", len(slots)))
        rows = []
        for slot in range(lo, hi):
            self.position[slot] = (self.position[slot] + 1) % len(self.table)
            rows.append(self.position[slot])
        logits = self.table.index_select(0, torch.tensor(rows))
        torch.argmax(logits, -1, out=self.picks[lo:hi])
        return DecodeStep(logits, lo, self.picks[lo:hi])

    def pick_first(self, slot: int, logits: torch.Tensor):
        from .runner import DecodeStep
        torch.argmax(logits[None], -1, out=self.picks[slot:slot + 1])
        return DecodeStep(logits[None], slot, self.picks[slot:slot + 1])

    def stage_begin(self, tensors) -> None:
        if tensors is not None:
            raise RuntimeError("the host-cost harness keeps no state: sessions are not served by it")
        self.position[self.max_batch] = 0

    def stage_feed(self, ids: list[int]) -> torch.Tensor:
        if not 0 < len(ids) <= self.prefill_piece:
            raise ValueError(f"a staging piece holds 1 to {self.prefill_piece} ids, got {len(ids)}")
        if self.record:
            self.calls.append(("feed", len(ids)))
        return self.table[0]

    def stage_finish(self, slot: int) -> None:
        self.position[slot] = 0


def build_fake_server(max_batch: int = 64, max_queue: int = 1024, prefill_chunk: int = 512,
                      prefill_piece: int | None = None, admit_tokens: int | None = None):
    """The real app (routes, engine, metrics, session store) around a ``FakeRunner`` and the shipped
    model's tokenizer and config (the model is loaded on the CPU but never run)."""
    import tempfile

    from mhla_stream import StreamingMHLA

    from .server import build_server
    ref = StreamingMHLA.from_pretrained(device="cpu", dtype="float32")
    runner = FakeRunner(ref.tokenizer, ref.model.config.vocab_size, max_batch, prefill_chunk, prefill_piece)
    return build_server(ref.model, ref.tokenizer, model_name="fake", max_batch=max_batch, max_queue=max_queue,
                        prefill_chunk=prefill_chunk, prefill_piece=prefill_piece, admit_tokens=admit_tokens,
                        sessions_dir=tempfile.mkdtemp(prefix="mhla-hostbench-"), runner=runner)


def main(argv=None) -> None:
    import argparse
    import signal

    import uvicorn
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-queue", type=int, default=1024)
    ap.add_argument("--prefill-piece", type=int, default=None, help="as mhla-serve's (default: the chunk, 512)")
    ap.add_argument("--admit-tokens", type=int, default=None, help="as mhla-serve's (default: the piece)")
    ap.add_argument("--http-process", action=argparse.BooleanOptionalAction, default=False,
                    help="the HTTP side in its own process, as mhla-serve --http-process")
    args = ap.parse_args(argv)
    # the engine's few tensor ops on tiny CPU tensors: intra-op threads would only spin and skew the CPU figures
    torch.set_num_threads(1)
    app = build_fake_server(args.max_batch, args.max_queue, prefill_piece=args.prefill_piece,
                            admit_tokens=args.admit_tokens)
    signal.signal(signal.SIGTERM, lambda *_: None)
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))  # as mhla-serve does
    from mhla_stream.cli.serve import _fast_http
    http, loop = _fast_http()  # as mhla-serve picks them
    print(f"hostbench: {http} parser, {loop} event loop{', HTTP in its own process' if args.http_process else ''}",
          file=sys.stderr)
    if args.http_process:
        from mhla_stream.hub import DEFAULT_MODEL, resolve_model

        from .bridge import serve_split
        s = app.state
        sys.exit(serve_split(s.engine, s.store, s.metrics, s.config, tokenizer_spec=(resolve_model(DEFAULT_MODEL), None),
                             host="127.0.0.1", port=args.port, log_level="warning", http=http, loop=loop,
                             announce=lambda: None))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", timeout_graceful_shutdown=5, http=http,
                loop=loop)


if __name__ == "__main__":
    main()
