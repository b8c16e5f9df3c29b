"""Session 24 probe (GPU): a batch's fused decode step as two (or four) independent chains on
concurrent streams of one CUDA graph.

Question: the fused step is a chain of 120 dependent launches bound by each launch's start, wait
and drain, not by its rows (H100, session 23: 681 us at 8 rows, 807 at 16, 978 at 32). Two
chains of half the rows on two streams could hide each other's latency while the second reads
the layer's weights from L2 (a layer's 27.7 MB fits in 50 MB). For each case the layers (and the
final norm) of one decode step are captured in a graph from states of the whole batch (each
chain takes a slice of the rows: views, written in place) and replayed; the split-K and close
workspaces are kept apart per chain (the library shares one a device: two chains at once would
share ticket counters). Timing only. Writes argv[1] (JSON)."""
import json
import sys

import torch

from mhla_stream.cli.common import load_model
from mhla_stream.kernels import triton_common, triton_decode

model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
dev, D = model.device, model.config.hidden_size
WS = {}  # chain -> (split-K workspaces, close workspaces)


def use_workspaces(chain):
    ws = WS.setdefault(chain, ({}, {}))
    triton_common._workspaces, triton_decode._workspaces = ws


def step_graph(batch, chains, concurrent):
    """A graph of one step of ``batch`` rows as ``chains`` slices, on their own streams or one."""
    states = model.new_state(batch, device=dev)
    rows = batch // chains
    parts = [[s._map(lambda t, i=i: t[i * rows:(i + 1) * rows]) for s in states] for i in range(chains)]
    x = torch.randn(batch, 1, D, device=dev, dtype=model.dtype)
    plan = model.make_plan(rows, cuda_graphs=True, fused_decode=True)
    streams = [torch.cuda.Stream() for _ in range(chains)] if concurrent else [torch.cuda.Stream()] * chains

    def run():
        main = torch.cuda.current_stream()
        for i in range(chains):
            streams[i].wait_stream(main)
        outs = []
        for i in range(chains):
            use_workspaces(i if concurrent else 0)
            with torch.cuda.stream(streams[i]):
                outs.append(model.model(inputs_embeds=x[i * rows:(i + 1) * rows], states=parts[i], plan=plan))
        for s in set(streams):
            main.wait_stream(s)
        return outs

    with torch.no_grad():
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
    return g, states  # (the graph writes the states: they live as long as it is replayed)


def timed(g, steps=200, reps=3):
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        a.record()
        for _ in range(steps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / steps)
    return sorted(times)[len(times) // 2]


CASES = [(32, 1, False), (16, 1, False), (32, 2, True), (32, 2, False), (32, 4, True), (8, 1, False),
         (64, 2, True), (32, 1, False), (32, 2, True)]
out = []
for batch, chains, concurrent in CASES:
    try:
        g, states = step_graph(batch, chains, concurrent)
        us = timed(g)
        del g, states
    except Exception as e:
        print(f"batch {batch} chains {chains} concurrent {concurrent}: failed {type(e).__name__}: {str(e)[:200]}",
              flush=True)
        continue
    out.append({"batch": batch, "chains": chains, "concurrent": concurrent, "us": round(us, 1)})
    print(f"batch {batch:>3} as {chains} chain(s) of {batch // chains:>2} rows, "
          f"{'concurrent' if concurrent else 'one stream'}: {us:8.1f} us ({batch * 1e6 / us:,.0f} rows/s)", flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
