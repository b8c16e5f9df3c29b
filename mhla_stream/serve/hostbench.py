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

``--device-model h100-340m`` gives the stand-in a modelled device instead of a free one: work is
queued behind earlier work as on a GPU stream and takes the time measured for mhla-340m on an H100
(bf16, CUDA graphs; ``DEVICE_MODELS``); the host waits only where the real runner synchronises (a
step's picks). So the real engine, HTTP path and clients run on this machine's CPU against a device
that costs what the GPU costs: how a scheduling change moves the served tokens/s can be measured
without a GPU (a model of the device, not a measurement of it: confirm on the GPU).
"""
from __future__ import annotations

import sys
import time

import torch

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with "
         "her friends. One day, she saw a big red ball in the park and ran to get it. \"Look, Ben!\" she said. "
         "\"Can we play with the ball together?\" Ben smiled and said yes. They played all day until the sun "
         "went down, and then they went home, happy and tired.\n")
NARROW = 2048  # the cycle keeps only the story's ids below this


# Device costs in ms, H100 80GB HBM3, mhla-340m bf16 random weights (.ci/results/2026-11-23-h100/session5/):
# decode steps per captured bucket (mhla-bench --batch; the in-process column of serve_bench), a prompt
# piece of t tokens over r rows as fixed + per_token * r * t (fixed from the long-prompt phase: a 256-token
# piece beside 32 streams added ~2.9 ms to their 1.69 ms step), zeroing and copying one state row (396 MiB
# at ~3 TB/s).
DEVICE_MODELS = {
    "h100-340m": {"decode": {1: 0.696, 8: 1.154, 32: 1.689, 64: 2.531}, "piece_fixed": 1.6, "piece_per_token": 0.002,
                  "zero_row": 0.13, "copy_row": 0.26},
}


class ModelledDevice:
    """An asynchronous device that only keeps time: ``run(ms)`` queues work after what is queued
    and returns when it will be done; ``wait(t)`` blocks the host until then."""

    def __init__(self, name: str):
        if name not in DEVICE_MODELS:
            raise ValueError(f"unknown device model {name!r}; known: {', '.join(DEVICE_MODELS)}")
        self.name, self.cost = name, DEVICE_MODELS[name]
        self.free_at = 0.0
        import collections
        import os
        self.busy = collections.Counter()
        # MHLA_DEVICE_REPORT_S=2: every 2 s, the share of each kind of work and of idle time (stderr)
        self.report_s = float(os.environ.get("MHLA_DEVICE_REPORT_S", "0"))
        self._reported = time.perf_counter()

    def run(self, ms: float, kind: str = "other") -> float:
        now = time.perf_counter()
        if now > self.free_at:
            self.busy["idle"] += now - self.free_at
        self.free_at = max(now, self.free_at) + ms / 1e3
        self.busy[kind] += ms / 1e3
        if self.report_s and now - self._reported > self.report_s:  # where the modelled device's time went
            total = sum(self.busy.values())
            if total:
                print("modelled device: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(self.busy.items())),
                      file=sys.stderr, flush=True)
            self.busy.clear()
            self._reported = now
        return self.free_at

    @staticmethod
    def wait(until: float) -> None:
        left = until - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def decode_ms(self, rows: int) -> float:
        """A step over ``rows`` rows: linear between the measured buckets."""
        table = sorted(self.cost["decode"].items())
        for (n0, t0), (n1, t1) in zip(table, table[1:]):
            if rows <= n1:
                return t0 + (t1 - t0) * max(rows - n0, 0) / (n1 - n0)
        (n0, t0), (n1, t1) = table[-2], table[-1]
        return t1 + (t1 - t0) * (rows - n1) / (n1 - n0)

    def piece_ms(self, rows: int, tokens: int) -> float:
        return self.cost["piece_fixed"] + self.cost["piece_per_token"] * rows * tokens

    def tok_s(self, batch: int) -> float:
        """The in-process batched decode this model stands for (tokens/s at ``batch`` rows)."""
        return batch / self.decode_ms(batch) * 1e3


def _timed(step, ready_at: float, device: "ModelledDevice"):
    """A ``DecodeStep`` whose results are read only once the modelled device has produced them."""
    tokens, row_logits = step.tokens, step.row_logits

    def wait_tokens():
        device.wait(ready_at)
        return tokens()

    def wait_row(slot):
        device.wait(ready_at)
        return row_logits(slot)
    step.tokens, step.row_logits = wait_tokens, wait_row
    return step


class FakeRunner:
    """Implements ``StepRunner``'s interface in ~0 time and records every call (``calls``: ("decode",
    rows) and ("feed", tokens) in order), so tests can count the prefill work between decode steps."""

    graphs = False

    def __init__(self, tokenizer, vocab_size: int, max_batch: int, prefill_chunk: int, piece: int | None = None,
                 record: bool = False, device: str | None = None, admit_batch: int = 1):
        self.max_batch, self.prefill_chunk, self.admit_batch = max_batch, prefill_chunk, admit_batch
        self.device = ModelledDevice(device) if device else None
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
        dev = f", modelled device {self.device.name}" if self.device else ""
        return f"fake runner (no model): {self.max_batch} slots, prefill chunk {self.prefill_chunk}{dev}"

    def info(self) -> dict[str, str]:
        return {"slots": str(self.max_batch), "prefill_chunk": str(self.prefill_chunk), "fake": "True"}

    def rows(self, start: int, stop: int):
        raise RuntimeError("the host-cost harness keeps no state: sessions are not served by it")

    def snapshot(self, slot: int, logits):
        raise RuntimeError("the host-cost harness keeps no state: sessions are not served by it")

    def decode(self, tokens: dict[int, int], auto=(), samplers=None):
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
        from .runner import draw_samples
        draw_samples(self.picks, logits, lo, samplers)
        step = DecodeStep(logits, lo, self.picks[lo:hi])
        if self.device is None:
            return step
        from .runner import bucket_for, decode_buckets  # the real runner steps a whole captured bucket
        return _timed(step, self.device.run(self.device.decode_ms(bucket_for(hi, decode_buckets(self.max_batch))),
                                            "decode"), self.device)

    def pick_first(self, slot: int, logits: torch.Tensor, sampler=None):
        from .runner import DecodeStep
        if sampler is None:
            torch.argmax(logits[None], -1, out=self.picks[slot:slot + 1])
        else:
            self.picks[slot:slot + 1].copy_(sampler(logits[None]))
        step = DecodeStep(logits[None], slot, self.picks[slot:slot + 1])
        return step if self.device is None else _timed(step, self.device.run(0.0), self.device)

    def stage_begin(self, tensors) -> None:
        if tensors is not None:
            raise RuntimeError("the host-cost harness keeps no state: sessions are not served by it")
        self.position[self.max_batch] = 0
        if self.device is not None:
            self.device.run(self.device.cost["zero_row"], "zero")

    def stage_feed(self, ids: list[int]) -> torch.Tensor:
        if not 0 < len(ids) <= self.prefill_piece:
            raise ValueError(f"a staging piece holds 1 to {self.prefill_piece} ids, got {len(ids)}")
        if self.record:
            self.calls.append(("feed", len(ids)))
        if self.device is not None:
            self.device.run(self.device.piece_ms(1, len(ids)), "prefill")
        return self.table[0]

    def admit(self, items) -> torch.Tensor:
        """Batched admission (runner.admit): every prompt's slot starts its cycle; on a modelled device
        one padded forward over the row bucket, then a copy per prompt."""
        if self.record:
            self.calls.append(("admit", sum(len(ids) for _, _, ids in items)))
        for slot, stored, _ in items:
            if stored is not None:
                raise RuntimeError("the host-cost harness keeps no state: sessions are not served by it")
            self.position[slot] = 0
        if self.device is not None:
            from .admission import pad_sizes
            from .runner import decode_buckets
            rows = next(b for b in decode_buckets(self.admit_batch) if b >= len(items))
            longest = max(len(ids) for _, _, ids in items)
            padded = next(n for n in pad_sizes(self.prefill_piece) if n >= longest)
            cost = self.device.cost
            self.device.run(rows * cost["zero_row"], "zero")
            self.device.run(self.device.piece_ms(rows, padded), "prefill")
            self.device.run(len(items) * cost["copy_row"], "copy")
        return self.table[0].expand(len(items), -1)

    def stage_finish(self, slot: int) -> None:
        self.position[slot] = 0
        if self.device is not None:
            self.device.run(self.device.cost["copy_row"], "copy")


def build_fake_server(max_batch: int = 64, max_queue: int = 1024, prefill_chunk: int = 512,
                      prefill_piece: int | None = None, admit_tokens: int | None = None, device: str | None = None,
                      admit_batch: int = 1, admit_wait_ms: float = 0.0):
    """The real app (routes, engine, metrics, session store) around a ``FakeRunner`` and the shipped
    model's tokenizer and config (the model is loaded on the CPU but never run)."""
    import tempfile

    from mhla_stream import StreamingMHLA

    from .server import build_server
    ref = StreamingMHLA.from_pretrained(device="cpu", dtype="float32")
    runner = FakeRunner(ref.tokenizer, ref.model.config.vocab_size, max_batch, prefill_chunk, prefill_piece,
                        device=device, admit_batch=admit_batch)
    return build_server(ref.model, ref.tokenizer, model_name="fake", max_batch=max_batch, max_queue=max_queue,
                        prefill_chunk=prefill_chunk, prefill_piece=prefill_piece, admit_tokens=admit_tokens,
                        admit_batch=admit_batch, admit_wait_ms=admit_wait_ms,
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
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--admit-batch", type=int, default=1, help="as mhla-serve's")
    ap.add_argument("--admit-wait-ms", type=float, default=0.0, help="as mhla-serve's")
    ap.add_argument("--device-model", default=None, choices=sorted(DEVICE_MODELS),
                    help="a modelled device (queued work that takes the GPU's measured time) instead of a free one")
    ap.add_argument("--http-process", action=argparse.BooleanOptionalAction, default=False,
                    help="the HTTP side in its own process, as mhla-serve --http-process")
    args = ap.parse_args(argv)
    # the engine's few tensor ops on tiny CPU tensors: intra-op threads would only spin and skew the CPU figures
    torch.set_num_threads(1)
    app = build_fake_server(args.max_batch, args.max_queue, prefill_chunk=args.prefill_chunk,
                            prefill_piece=args.prefill_piece, admit_tokens=args.admit_tokens, device=args.device_model,
                            admit_batch=args.admit_batch, admit_wait_ms=args.admit_wait_ms)
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
