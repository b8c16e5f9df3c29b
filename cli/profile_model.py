"""Per-kernel profile of the whole model (GPU): where a prefill chunk and a decode step spend time.

    python -m mhla_stream.cli.profile_model --model mhla-340m --chunk 16384 --json prof.json

Prints, for one prefill chunk and for decode steps (eager and CUDA-graph replay), the kernels
grouped by name with their count and total device time, then the wall time of the same work:
wall time well above the kernel sum means launch gaps (host bound); close to it, device bound.
"""
from __future__ import annotations

import json
import time
import warnings

import click
import torch
from torch.profiler import ProfilerActivity, profile

from mhla_stream import MHLACache
from mhla_stream.graphs import GraphDecoder

from .common import fail, load_model


def _kernel_table(prof, steps: int):
    rows = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        r = rows.setdefault(e.name, [0, 0.0])
        r[0] += 1
        r[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    out = [{"kernel": k[:90], "count_per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in rows.items()]
    return sorted(out, key=lambda r: -r["us_per_step"])


def _print(title, table, wall_us, limit=25):
    total = sum(r["us_per_step"] for r in table)
    count = sum(r["count_per_step"] for r in table)
    click.echo(f"\n## {title}: {count:.0f} kernels, {total:.1f} us of kernel time, {wall_us:.1f} us wall per step")
    click.echo(f"{'us':>10} {'%':>6} {'n':>6}  kernel")
    for r in table[:limit]:
        click.echo(f"{r['us_per_step']:10.1f} {100 * r['us_per_step'] / max(total, 1e-9):6.1f} "
                   f"{r['count_per_step']:6.1f}  {r['kernel']}")


def _products(m):
    """Each decode projection alone: the fused skinny kernel against cuBLAS, in GB/s of weights."""
    from mhla_stream.kernels.triton_skinny import skinny_linear  # GPU only: triton is optional
    from triton.testing import do_bench_cudagraph
    layer = m.model.layers[0]
    attn, mlp = layer.attn, layer.mlp
    H, V = attn.num_heads, attn.head_v_dim
    D, dev, dt = m.config.hidden_size, m.device, m.dtype
    x, o, g = (torch.randn(1, n, device=dev, dtype=dt) for n in (D, H * V, H * V))
    wqkvg, wgu = attn.qkvg_weight.get(), mlp.gate_up_weight.get()
    a = torch.randn(1, mlp.down_proj.weight.shape[1], device=dev, dtype=dt)
    gn = attn.g_norm_swish_gate
    cases = {
        "qkvg+norm": (wqkvg, lambda w=wqkvg: skinny_linear(x, w, norm_weight=layer.attn_norm.weight), x),
        "o+gnorm+res": (attn.o_proj.weight, lambda w=attn.o_proj.weight: skinny_linear(
            o, w, norm_weight=gn.weight, group=V, gate=g, residual=x), o),
        "gate/up+swiglu": (wgu, lambda w=wgu: skinny_linear(x, w, norm_weight=layer.mlp_norm.weight, swiglu=True), x),
        "down+res": (mlp.down_proj.weight, lambda w=mlp.down_proj.weight: skinny_linear(a, w, residual=x), a)}
    rows = []
    click.echo(f"\n## decode projections, batch 1, CUDA-graph timed\n"
               f"{'product':>15} {'MB':>6} {'fused us':>9} {'GB/s':>6} {'cuBLAS us':>10} {'GB/s':>6}")
    for name, (w, fused, inp) in cases.items():
        fused()
        # 8 weight copies in turn, as in the model: the weights come from memory, not from L2
        copies = [w.clone() for _ in range(8)]
        run_f = lambda: [fused(c) for c in copies]  # noqa: E731
        run_c = lambda: [torch.nn.functional.linear(inp, c) for c in copies]  # noqa: E731
        t_f = do_bench_cudagraph(run_f, return_mode="median") * 1e3 / 8
        t_c = do_bench_cudagraph(run_c, return_mode="median") * 1e3 / 8
        mb = w.numel() * w.element_size() / 1e6
        rows.append({"product": name, "MB": mb, "fused_us": t_f, "cublas_us": t_c})
        click.echo(f"{name:>15} {mb:6.1f} {t_f:9.2f} {mb * 1e3 / t_f:6.0f} {t_c:10.2f} {mb * 1e3 / t_c:6.0f}")
    return rows


@click.command()
@click.option("--model", default="mhla-340m", show_default=True)
@click.option("--chunk", default=16384, show_default=True, help="prefill chunk length")
@click.option("--context", default=2048, show_default=True, help="tokens before the profiled decode steps")
@click.option("--steps", default=20, show_default=True)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="sequences per decode step")
@click.option("--decode-only", is_flag=True, help="skip the prefill-chunk and projection profiles")
@click.option("--fused-decode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path())
def main(model, chunk, context, steps, batch, decode_only, fused_decode, json_path):
    dev = "cuda"
    if not torch.cuda.is_available():  # it profiles CUDA kernels and graphs: nothing to measure on a CPU
        fail("profile_model needs a CUDA GPU (it profiles the CUDA kernels of a prefill chunk and decode steps)")
    m = load_model(model, None, True, dev, torch.bfloat16)
    plan = m.make_plan(batch, fused_decode={"auto": None, "on": True, "off": False}[fused_decode])
    click.echo(f"plan: {plan.describe()}")
    vocab = m.config.vocab_size
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "model": model}
    with torch.inference_mode():
        ids = torch.randint(3, vocab, (1, chunk), device=dev)
        if not decode_only:
            _profile_prefill(m, ids, chunk, report)
        ids = ids[:, :context].expand(batch, -1).contiguous()
        cache = MHLACache(m.new_state(batch))
        m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = ids[:, :1]
        for _ in range(3):
            m(input_ids=nxt, past_key_values=cache, use_cache=True, plan=plan)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                m(input_ids=nxt, past_key_values=cache, use_cache=True, plan=plan)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            m(input_ids=nxt, past_key_values=cache, use_cache=True, plan=plan)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e6
        report["decode_eager"] = {"batch": batch, "wall_us": wall, "kernels": _kernel_table(prof, steps)}
        _print(f"decode step, batch {batch}, eager", report["decode_eager"]["kernels"], wall)

        dec = GraphDecoder(m, cache, plan=plan)
        for _ in range(3):
            dec.step(nxt)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.step(nxt)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps * 5):
            dec.step(nxt)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / (steps * 5) * 1e6
        report["decode_graph"] = {"batch": batch, "wall_us": wall, "tok_s": batch * 1e6 / wall,
                                  "kernels": _kernel_table(prof, steps)}
        _print(f"decode step, batch {batch}, CUDA graph ({batch * 1e6 / wall:,.0f} tok/s)",
               report["decode_graph"]["kernels"], wall)
        if not decode_only:
            report["products"] = _products(m)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)


def _profile_prefill(m, ids, chunk, report):
    """One prefill chunk: kernels, wall time, and any host synchronisation inside the forward."""
    with torch.inference_mode():
        for _ in range(2):  # compile, tune
            m(input_ids=ids, past_key_values=MHLACache(m.new_state(1)), use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        cache = MHLACache(m.new_state(1))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
        cache = MHLACache(m.new_state(1))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")  # any host synchronisation inside the forward is reported
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            host = (time.perf_counter() - t0) * 1e6
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e6
        torch.cuda.set_sync_debug_mode(0)
        where = sorted({str(w.filename).split("/")[-1] + ":" + str(w.lineno) for w in syncs})
        click.echo(f"prefill chunk: host returns after {host:.0f} us, device done after {wall:.0f} us; "
                   f"{len(syncs)} host synchronisations {where[:8]}")
        report["prefill"] = {"chunk": chunk, "wall_us": wall, "host_us": host, "syncs": len(syncs), "tok_s": chunk / wall * 1e6,
                             "kernels": _kernel_table(prof, 1)}
        _print(f"prefill, one {chunk}-token chunk ({chunk / wall * 1e6:,.0f} tok/s)", report["prefill"]["kernels"], wall)


if __name__ == "__main__":
    main()
