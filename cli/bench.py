"""``mhla-bench``: time to first token, prefill and decode tokens/s, peak memory and state bytes
on long prompts; ``--compare transformer`` runs a same-size softmax Transformer (transformers
Llama, SDPA) in the same run. Each row is printed as soon as it is measured; ``--plot`` draws
tokens/s and memory against prompt length.

    mhla-bench --model mhla-340m --random-weights --prompt-len 2048,32768,131072 --compare transformer
"""
from __future__ import annotations

import json
import os
import time

import click

from .common import check_backend, check_weights_flag, command, fail, load_model, pick_device, state_dtype_option

COLUMNS = ["model", "prompt_len", "batch", "ttft_s", "prefill_tok_s", "decode_tok_s", "decode_ms_per_step",
           "peak_mem_GiB", "state_MiB", "floor_tok_s", "pct_of_floor"]


def format_row(r: dict) -> str:
    return " | ".join(r.get("error", "") if c == "ttft_s" and "error" in r else
                      (f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))) for c in COLUMNS)


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """Prefill and decode tokens/s and peak memory against prompt length, MHLA against the
    Transformer (batch 1 rows; log-log axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"), ("peak_mem_GiB", "peak GiB"))
    for kind, style in (("mhla", "o-"), ("transformer", "s--")):
        mine = sorted((r for r in rows if r["model"] == kind and r.get("batch", 1) == 1 and "error" not in r),
                      key=lambda r: r["prompt_len"])
        if not mine:
            continue
        for ax, (key, label) in zip(axes, panels):
            have = [r for r in mine if key in r]  # --decode-only rows have no prefill figures
            ax.plot([r["prompt_len"] for r in have], [r[key] for r in have], style,
                    label="MHLA" if kind == "mhla" else "Transformer (SDPA)")
            ax.set(xscale="log", yscale="log", xlabel="prompt tokens", title=label)
            ax.grid(alpha=0.3, which="both")
    axes[1].legend()  # the decode panel always has both models' series (--decode-only: no prefill ones)
    fig.suptitle(f"{meta.get('model')} on {meta.get('device')}, {meta.get('dtype', '').replace('torch.', '')}, "
                 f"{meta.get('date')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tuned_products(device: str, backend: str) -> dict[str, str] | None:
    """The skinny products' tuned launch shapes for the JSON meta: CUDA runs whose backend
    resolves to Triton only (``auto`` on a CUDA machine without Triton resolves to torch)."""
    from mhla_stream.attention import resolve_backend
    if not device.startswith("cuda") or resolve_backend(backend, device) != "triton":
        return None
    from ..kernels.triton_skinny import tuned_configs  # (imports Triton)
    return tuned_configs()


@command
@click.option("--model", default="mhla-340m", show_default=True)
@click.option("--weights", default=None, type=click.Path())
@click.option("--random-weights", is_flag=True, help="random weights of the model's shape (fine for throughput)")
@click.option("--prompt-len", default="2048,32768", show_default=True, help="comma-separated prompt lengths")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batch", default="1", show_default=True, help="comma-separated batch sizes")
@click.option("--prefill-chunk", default=16384, show_default=True, type=click.IntRange(1),
              help="prompt tokens per prefill step, over the whole batch (at least 64 per sequence)")
@click.option("--fused-decode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="the five-launch Triton decode step (auto: batch 1 on CUDA)")
@click.option("--decode-only", is_flag=True,
              help="time decode alone: prefill one prompt (untimed) and copy its state into every sequence of the "
                   "batch; a step costs the same whatever the tokens, and it keeps batch 128 at 128k tokens to "
                   "seconds instead of minutes of prefill (no prefill columns)")
@click.option("--compare", type=click.Choice(["transformer"]), default=None)
@click.option("--device", default=None)
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--backend", default="auto", type=click.Choice(["auto", "torch", "triton", "numba"]))
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="capture the MHLA decode step and full prefill chunks (before timing)")
@state_dtype_option
@click.option("--json", "json_path", default=None, type=click.Path(), help="also write the rows here")
@click.option("--plot", "plot_path", default=None, type=click.Path(),
              help="draw tokens/s and memory against prompt length into this PNG (matplotlib)")
def main(model, weights, random_weights, prompt_len, new_tokens, batch, prefill_chunk, fused_decode, decode_only,
         compare, device, dtype, backend, cuda_graph, state_dtype, json_path, plot_path):
    """Measure prefill and decode speed of an MHLA model on long prompts."""
    try:
        lengths = [int(x) for x in prompt_len.split(",")]
        batches = [int(x) for x in batch.split(",")]
        assert all(x > 0 for x in lengths + batches)
    except (ValueError, AssertionError):
        raise click.BadParameter("expected comma-separated positive integers", param_hint="--prompt-len/--batch")
    device = pick_device(device)
    check_weights_flag(model, weights)
    check_backend(backend, device)
    if fused_decode == "on":
        from mhla_stream.attention import resolve_backend
        if not (backend in ("auto", "triton") and resolve_backend(backend, device) == "triton"):
            fail(f"--fused-decode on: the fused decode step is made of Triton kernels; --backend {backend} on "
                 f"{device} does not run Triton (use a CUDA device, or --backend triton with TRITON_INTERPRET=1)")
    for flag, path in (("--json", json_path), ("--plot", plot_path)):  # found out now, not after the whole run
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(path):
                fail(f"{flag} {path}: folder {folder} does not exist or is not writable (or the path is a folder)")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install matplotlib (or mhla-stream[plot])")
    import torch
    from tqdm import tqdm

    from .bench_runs import reset_peak, run_one, same_size_transformer
    if not device.startswith("cuda"):
        click.echo("# note: no GPU here, so no Triton kernels and no CUDA graphs; the README's figures come from a "
                   "GPU, and a 340M model at long prompts takes a very long time on a CPU", err=True)
    dtype = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    m = load_model(model, weights, random_weights, device, dtype)
    fused = {"auto": None, "on": True, "off": False}[fused_decode]
    plan_options = dict(backend=backend, cuda_graphs=cuda_graph, state_dtype=state_dtype, fused_decode=fused)
    click.echo(f"# plan (batch {batches[0]}): {m.make_plan(batches[0], **plan_options).describe()}")
    kinds = [("mhla", m)]
    if compare:
        kinds.append(("transformer", same_size_transformer(m.config, device, dtype)))
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "dtype": str(dtype),
            "date": time.strftime("%Y-%m-%d"), "model": model, "random_weights": random_weights,
            "params": sum(p.numel() for p in m.parameters()), "new_tokens": new_tokens, "decode_only": decode_only,
            "state_dtype": m.make_plan(1, **plan_options).state_dtype,
            "plans": {b: m.make_plan(b, **plan_options).describe() for b in batches}}
    bandwidth = None
    if device.startswith("cuda"):  # the decode floor's bandwidth, measured in this run
        from .bench_floor import copy_bandwidth
        bandwidth = copy_bandwidth(device)
        meta["copy_bandwidth_TBps"] = bandwidth / 1e12
    click.echo(f"# {meta['device']}, {meta['dtype']}, {meta['date']}, {model} ({meta['params'] / 1e6:.0f}M params)"
               + (f"; copy bandwidth {bandwidth / 1e12:.2f} TB/s (decode floor: weights once + each sequence's "
                  f"state traffic)" if bandwidth else ""))
    click.echo(" | ".join(COLUMNS))
    rows = []
    jobs = [(k, mod, L, b) for L in lengths for b in batches for k, mod in kinds]
    bar = tqdm(jobs, desc="bench", dynamic_ncols=True, leave=False)
    for kind, mod, L, b in bar:
        graphs = cuda_graph and device.startswith("cuda")
        # warm-up at the timed chunk shape: kernels compiled and tuned, graphs captured once before timing
        chunk = max(64, prefill_chunk // b)  # per sequence: the step's activations stay bounded at any batch
        only = decode_only and kind == "mhla"
        run_one(kind, mod, min(L, chunk), 2, b, chunk, device, graphs, backend, state_dtype, fused_decode=fused,
                decode_only=only)
        try:
            rows.append(run_one(kind, mod, L, new_tokens, b, chunk, device, graphs, backend, state_dtype, bandwidth,
                                fused, only))
        except torch.OutOfMemoryError:
            rows.append({"model": kind, "prompt_len": L, "batch": b, "error": "out of memory"})
            reset_peak(device)
        bar.write(format_row(rows[-1]))  # each row as soon as it is measured: a killed run keeps what it had
    products = tuned_products(device, backend)
    if products is not None:
        meta["tuned_products"] = products
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
        except OSError as e:
            fail(f"--json {json_path}: cannot write the results ({e.strerror})")
    if plot_path:
        plot(rows, meta, plot_path)
        click.echo(f"# plot: {plot_path}", err=True)


if __name__ == "__main__":
    main()
