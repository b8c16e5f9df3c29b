"""Choose the fused decode step's product shapes on this GPU and save them for later processes.

    python -m mhla_stream.cli.tune_decode --model mhla-340m

Times the captured decode step at each ``--batch`` with each skinny product's launch shape in turn
(``mhla_stream.decode_tuning``, a few minutes on an H100) and merges the winners into the picks
file (``--out``; default ``$MHLA_STREAM_STEP_PICKS`` or ``~/.cache/mhla_stream/step_picks.json``),
which every later process on a GPU of the same name reads. Batch 1 tunes the one-row products,
batch 8 the row block of 16 that batches 2-16 share. The shapes depend only on the model's widths
and dtype, so the weights do not matter (random ones). The package ships the picks measured for
mhla-340m on the GPUs in ``kernels/step_picks.json``; run this on other GPUs or model shapes.
"""
from __future__ import annotations

import json
import os

import click

from .common import command, fail


@command()
@click.option("--model", default="mhla-340m", show_default=True,
              help="a preset (mhla-340m, mhla-tiny) or a checkpoint folder: its widths are what is tuned")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float32"]))
@click.option("--batch", "batches", default="1,8", show_default=True,
              help="comma-separated batch sizes to tune at (each must decode with the fused step: 1-16 by default)")
@click.option("--passes", default=2, show_default=True, type=click.IntRange(1, 5),
              help="rounds over the products (later rounds retry each one's four fastest shapes)")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="picks file to merge into (default: $MHLA_STREAM_STEP_PICKS or ~/.cache/mhla_stream/step_picks.json)")
@click.option("--dry-run", is_flag=True, help="measure and print, write nothing")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="also write every timed trial here")
def main(model, dtype, batches, passes, out_path, dry_run, json_path):
    """Tune the skinny products of the fused decode step together, in the captured step."""
    try:
        batches = [int(b) for b in batches.split(",")]
        assert batches and all(1 <= b <= 4096 for b in batches)
    except (ValueError, AssertionError):
        fail(f"--batch: expected comma-separated batch sizes from 1 to 4096, got {batches!r}")
    from mhla_stream.kernels import step_picks
    out_path = out_path or step_picks.user_path()
    if out_path is None and not dry_run:
        fail("MHLA_STREAM_STEP_PICKS is off (0): pass --out PATH or --dry-run")
    # bad paths are found out now, not after a minute of timing
    for flag, path in (("--out", None if dry_run else out_path), ("--json", json_path)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path and (os.path.isdir(path) or (os.path.isdir(folder) and not os.access(folder, os.W_OK))
                     or (os.path.exists(folder) and not os.path.isdir(folder))):
            fail(f"{flag} {path}: not a writable file path")
    if out_path and not dry_run:
        try:  # an existing file that is not a picks file is refused before the run, not overwritten after it
            step_picks.existing(out_path)
        except ValueError as e:
            fail(str(e))
    import torch
    if not torch.cuda.is_available():
        fail("tune_decode needs a CUDA GPU: it times the captured decode step")
    from mhla_stream.decode_tuning import tune_step

    from .common import load_model
    m = load_model(model, None, True, "cuda", getattr(torch, dtype))
    device = torch.cuda.get_device_name()
    click.echo(f"# {device}, {model} widths, {dtype}, batch {batches}, {passes} pass(es)")
    picks, notes, runs = {}, [], []
    for b in batches:
        try:
            result = tune_step(m, batch=b, passes=passes, log=click.echo)
        except RuntimeError as e:
            fail(str(e))
        picks.update(result["picks"])
        gain = result["start_us"] / result["best_us"] - 1
        notes.append(f"batch {b}: {result['best_us']:.1f} us a step against {result['start_us']:.1f} (+{100 * gain:.1f}%)")
        runs.append({"batch": b, "start_us": result["start_us"], "best_us": result["best_us"],
                     "picks": {k: list(v) for k, v in result["picks"].items()},
                     "trials": [{"us": t["us"], "picks": {k: list(v) for k, v in t["picks"].items()}}
                                for t in result["trials"]]})
    note = f"{model} widths, {dtype}, tune_decode: " + "; ".join(notes)
    click.echo(json.dumps({k: list(v) for k, v in picks.items()}, indent=1))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"device": device, "model": model, "dtype": dtype, "runs": runs}, f, indent=1)
    if dry_run:
        click.echo("# --dry-run: nothing written")
        return
    step_picks.write(out_path, device, picks, note=note)
    click.echo(f"# wrote {len(picks)} picks for {device} to {out_path}")


if __name__ == "__main__":
    main()
