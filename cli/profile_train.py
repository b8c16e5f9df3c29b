"""Per-kernel profile of one training step (forward + backward + AdamW step), built like mhla-train.

    python -m mhla_stream.cli.profile_train --preset mhla-340m --batch 8 --json train_profile.json
    python -m mhla_stream.cli.profile_train --preset mhla-tiny --device cpu      (CPU: op times, not kernels)

The step is compiled as mhla-train's is (on CUDA by default; ``--no-compile`` for the eager one).
A few warm-up steps (compilation, autotuning), then torch.profiler over --steps steps: the top kernels
by CUDA time per step (on a CPU, the ops by their own CPU time), their share and count, and the
totals: kernel time against wall time per step (wall well above the kernels: the host is the limit).
Synthetic tokens, so no data folder is needed; the weights are random (the time does not depend on them).
"""
from __future__ import annotations

import json
import time

import click

from mhla_stream.presets import PRESETS
from mhla_stream.training import ARCHS

from .common import command, fail


def kernel_table(prof, steps: int, on_cuda: bool) -> list[dict]:
    """Rows {name, us_per_step, count_per_step}, largest first: CUDA kernels on a GPU; on a CPU the
    ops' self CPU time (self, not total, so that nested ops are not counted twice)."""
    if on_cuda:  # the same kernel table as profile_model's (one definition of "kernel time per step")
        from .profile_model import _kernel_table
        return [{"name": r["kernel"], "count_per_step": r["count_per_step"], "us_per_step": r["us_per_step"]}
                for r in _kernel_table(prof, steps)]
    rows: dict[str, list] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep"):
            rows[e.key] = [e.count, e.self_cpu_time_total]
    table = [{"name": k[:100], "count_per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in rows.items()]
    return sorted(table, key=lambda r: -r["us_per_step"])


def print_table(title: str, table: list[dict], wall_us: float, top: int) -> None:
    total = sum(r["us_per_step"] for r in table)
    click.echo(f"## {title}")
    click.echo(f"{'us/step':>11} {'%':>6} {'n/step':>7}  name")
    for r in table[:top]:
        click.echo(f"{r['us_per_step']:11.1f} {100 * r['us_per_step'] / max(total, 1e-9):6.1f} "
                   f"{r['count_per_step']:7.1f}  {r['name']}")
    click.echo(f"total: {total / 1e3:.2f} ms of {'kernel' if 'kernel' in title else 'op'} time, "
               f"{wall_us / 1e3:.2f} ms wall per step ({100 * total / max(wall_us, 1e-9):.0f}%)")


@command
@click.option("--arch", default="mhla", type=click.Choice(ARCHS))
@click.option("--preset", default="mhla-340m", type=click.Choice(sorted(PRESETS)), show_default=True)
@click.option("--vocab", default=32000, type=click.IntRange(3, 65536), show_default=True)
@click.option("--batch", default=8, type=click.IntRange(1, 4096), show_default=True)
@click.option("--context", default=None, type=click.IntRange(1), help="tokens per sequence (default: the preset's)")
@click.option("--fused-loss/--no-fused-loss", default=True, show_default=True)
@click.option("--loss-chunk", default=4096, type=click.IntRange(1), show_default=True)
@click.option("--attn-backend", default="auto", type=click.Choice(["auto", "triton", "torch"]), show_default=True)
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=False)
@click.option("--compile/--no-compile", "compile_step", default=None,
              help="torch.compile the step, as mhla-train does (default: on CUDA, except --arch gla)")
@click.option("--warmup", default=3, type=click.IntRange(0, 1000), show_default=True)
@click.option("--steps", default=3, type=click.IntRange(1, 1000), show_default=True, help="profiled steps")
@click.option("--top", default=30, type=click.IntRange(1), show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
def main(arch, preset, vocab, batch, context, fused_loss, loss_chunk, attn_backend, activation_checkpointing,
         compile_step, warmup, steps, top, device, json_path):
    """Profile one training step of a model built like mhla-train's."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mhla_stream.training.model import (ArchError, LossModule, build_model, context_of,
                                            enable_activation_checkpointing)
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        fail(f"--device {device}: {e}")
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        fail(f"--device {device}: only cpu, or cuda on a machine with a CUDA GPU")
    if arch == "mhla" and attn_backend != "auto":
        from mhla_stream.attention import resolve_backend
        try:
            resolve_backend(attn_backend, dev)
        except (RuntimeError, ValueError) as e:
            fail(f"--attn-backend {attn_backend}: {e}")
    torch.manual_seed(0)
    try:
        model = build_model(arch, vocab, 1, 1, 1, 1, 1, "window+far", preset).to(dev)
    except ArchError as e:
        fail(str(e))
    full = context_of(model)
    context = context or full
    if context > full:
        fail(f"--context {context}: more than the {full} tokens the preset trains on")
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    step_module = LossModule(model, fused_loss, loss_chunk, attn_backend)
    if compile_step is None:  # mhla-train's default: the step it times is the compiled one on CUDA
        compile_step = dev.type == "cuda" and arch != "gla"
    run_step = torch.compile(step_module) if compile_step else step_module
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    windows = torch.randint(0, vocab, (batch, context + 1), device=dev)
    on_cuda = dev.type == "cuda"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = run_step(windows)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if on_cuda:
            torch.cuda.synchronize(dev)

    model.train()
    for _ in range(warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    t0 = time.perf_counter()  # wall time without the profiler's own overhead
    for _ in range(steps):
        step()
    sync()
    wall_us = (time.perf_counter() - t0) / steps * 1e6
    table = kernel_table(prof, steps, on_cuda)
    n_params = sum(p.numel() for p in model.parameters())
    what = "kernels by CUDA time" if on_cuda else "ops by self CPU time"
    title = (f"{arch} {preset} ({n_params / 1e6:.1f}M), batch {batch} x {context}, "
             f"{'fused' if fused_loss else 'plain'} loss{', act. ckpt' if activation_checkpointing else ''}"
             f"{', compiled' if compile_step else ''}, "
             f"{dev}: {what}, per training step")
    print_table(title, table, wall_us, top)
    click.echo(f"{batch * context / wall_us * 1e6:,.0f} tokens/s"
               + (f", peak {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if on_cuda else ""))
    if json_path:
        report = {"arch": arch, "preset": preset, "params": n_params, "vocab": vocab, "batch": batch,
                  "context": context, "fused_loss": fused_loss, "attn_backend": attn_backend,
                  "activation_checkpointing": activation_checkpointing, "compile": compile_step, "device": str(dev),
                  "device_name": torch.cuda.get_device_name(dev) if on_cuda else "cpu",
                  "steps": steps, "wall_us_per_step": wall_us, "table_kind": "cuda_kernels" if on_cuda else "cpu_ops",
                  "total_us_per_step": sum(r["us_per_step"] for r in table), "rows": table}
        try:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=1)
        except OSError as e:
            fail(f"--json {json_path}: {e.strerror}")


if __name__ == "__main__":
    main()
