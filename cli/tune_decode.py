"""Choose the fused decode step's product shapes on this GPU and save them for later processes.

    python -m mhla_stream.cli.tune_decode --model mhla-340m

Times the captured decode step at each ``--batch`` with each skinny product's launch shape in turn
(``mhla_stream.decode_tuning``, a few minutes on an H100) and merges the winners into the picks
file (``--out``; default ``$MHLA_STREAM_STEP_PICKS`` or ``~/.cache/mhla_stream/step_picks.json``),
which every later process on a GPU of the same name reads. Batch 1 tunes the one-row products,
batch 8 the row block of 16 that batches 2-16 share, batch 32 the row block of 32 of batches
17-32. The shapes depend only on the model's widths and dtype, so the weights do not matter
(random ones). The package ships the picks measured for
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
@click.option("--batch", "batches", default="1,8,32", show_default=True,
              help="comma-separated batch sizes to tune at (each must decode with the fused step: 1-32 by default)")
@click.option("--passes", default=2, show_default=True, type=click.IntRange(1, 5),
              help="rounds over the products (later rounds retry each one's four fastest shapes)")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="picks file to merge into (default: $MHLA_STREAM_STEP_PICKS or ~/.cache/mhla_stream/step_picks.json)")
@click.option("--dry-run", is_flag=True, help="measure and print, write nothing")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="also write every timed trial here")
def main(model, dtype, batches, passes, out_path, dry_run, json_path):
    """Tune the skinny products of the fused decode step together, in the captured step."""
    try:  # (no assert: python -O would strip it)
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        sizes = []
    if not sizes or not all(1 <= b <= 4096 for b in sizes):
        fail(f"--batch: expected comma-separated batch sizes from 1 to 4096, got {batches[:40]!r}")
    batches = sizes
    # batches of one row block launch the same products: the second would find them all tuned
    # (decode_tuning keeps the first's in force) and fail after the first's minutes of timing
    blocks = {}
    for b in batches:
        block = 1 if b == 1 else min(max(16, 1 << (b - 1).bit_length()), 64)  # (triton_skinny's row block)
        if block in blocks:
            fail(f"--batch: {blocks[block]} and {b} tune the same products (row block of {block}); name one")
        blocks[block] = b
    from mhla_stream.kernels import step_picks
    out_path = out_path or step_picks.user_path()
    if out_path is None and not dry_run:
        fail("MHLA_STREAM_STEP_PICKS is off (0): pass --out PATH or --dry-run")
    # bad paths are found out now, not after a minute of timing
    for flag, path in (("--out", None if dry_run else out_path), ("--json", json_path)):
        if path and (os.path.isdir(path) or not _can_make(path)):
            fail(f"{flag} {path}: not a writable file path")
    if json_path and out_path and not dry_run and _same(json_path, out_path):
        # the trials are written first: they would replace the picks, and the merge then refuse them
        fail(f"--json {json_path}: the picks file itself (--out); name another file for the trials")
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
    for b in batches:  # every batch checked before the first is timed: a late refusal loses the run
        plan = m.make_plan(b, cuda_graphs=True, rows_picked=True)  # (as it runs once picked)
        if not plan.fused_decode:
            fail(f"--batch {b} does not decode with the fused step ({plan.describe()}): nothing to tune (the "
                 "fused step runs up to 32 sequences, or MHLA_STREAM_FUSED_BATCH if set, and not with MHLA_STREAM_FUSED_DECODE=0)")
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
    try:  # (the file may have changed during the run: a message, the picks printed above)
        step_picks.write(out_path, device, picks, note=note)
    except (OSError, ValueError) as e:
        fail(f"picks not written: {e}")
    click.echo(f"# wrote {len(picks)} picks for {device} to {out_path}")


def _can_make(path: str) -> bool:
    """Whether a file can be written at ``path``: its nearest existing folder is a folder we may
    write in (the folders below it are made). A folder path through a file fails here, not at
    the write after the run."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        if os.path.lexists(folder):  # a dangling link or a loop in place of a folder
            return False
        up = os.path.dirname(folder)
        if up == folder:
            return False
        folder = up
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def _same(a: str, b: str) -> bool:
    """Whether two paths name the same file (through links, or the same path spelled twice)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


if __name__ == "__main__":
    main()
