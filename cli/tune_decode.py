"""Choose the batch-1 decode step's product shapes on this GPU and save them for later processes.

    python -m mhla_stream.cli.tune_decode --model mhla-340m

Times the captured batch-1 decode step with each one-row product's launch shape in turn
(``mhla_stream.decode_tuning``, about a minute on an H100) and merges the winners into the picks
file (``--out``; default ``$MHLA_STREAM_ONE_ROW_PICKS`` or ``~/.cache/mhla_stream/one_row_picks.json``),
which every later process on a GPU of the same name reads. The shapes depend only on the model's
widths and dtype, so the weights do not matter (random ones by default). The package ships the
picks measured for mhla-340m on an H100; run this on other GPUs or model shapes.
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
@click.option("--passes", default=2, show_default=True, type=click.IntRange(1, 5),
              help="rounds over the products (later rounds retry each one's four fastest shapes)")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="picks file to merge into (default: $MHLA_STREAM_ONE_ROW_PICKS or ~/.cache/mhla_stream/one_row_picks.json)")
@click.option("--dry-run", is_flag=True, help="measure and print, write nothing")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="also write every timed trial here")
def main(model, dtype, passes, out_path, dry_run, json_path):
    """Tune the one-row products of the batch-1 decode step together, in the captured step."""
    from mhla_stream.kernels import one_row_picks
    out_path = out_path or one_row_picks.user_path()
    if out_path is None and not dry_run:
        fail("MHLA_STREAM_ONE_ROW_PICKS is off (0): pass --out PATH or --dry-run")
    # bad paths are found out now, not after a minute of timing
    for flag, path in (("--out", None if dry_run else out_path), ("--json", json_path)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path and (os.path.isdir(path) or (os.path.isdir(folder) and not os.access(folder, os.W_OK))
                     or (os.path.exists(folder) and not os.path.isdir(folder))):
            fail(f"{flag} {path}: not a writable file path")
    if out_path and not dry_run:
        try:  # an existing file that is not a picks file is refused before the run, not overwritten after it
            one_row_picks.existing(out_path)
        except ValueError as e:
            fail(str(e))
    import torch
    if not torch.cuda.is_available():
        fail("tune_decode needs a CUDA GPU: it times the captured decode step")
    from mhla_stream.decode_tuning import tune_one_row

    from .common import load_model
    m = load_model(model, None, True, "cuda", getattr(torch, dtype))
    device = torch.cuda.get_device_name()
    click.echo(f"# {device}, {model} widths, {dtype}, {passes} pass(es)")
    try:
        result = tune_one_row(m, passes=passes, log=click.echo)
    except RuntimeError as e:
        fail(str(e))
    gain = result["start_us"] / result["best_us"] - 1
    note = (f"{model} widths, {dtype}: {result['best_us']:.1f} us a step against {result['start_us']:.1f} "
            f"(+{100 * gain:.1f}%), tune_decode")
    click.echo(json.dumps({k: list(v) for k, v in result["picks"].items()}, indent=1))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"device": device, "model": model, "dtype": dtype, **{k: result[k] for k in ("start_us", "best_us")},
                       "picks": {k: list(v) for k, v in result["picks"].items()},
                       "trials": [{"us": t["us"], "picks": {k: list(v) for k, v in t["picks"].items()}}
                                  for t in result["trials"]]}, f, indent=1)
    if dry_run:
        click.echo("# --dry-run: nothing written")
        return
    one_row_picks.write(out_path, device, result["picks"], note=note)
    click.echo(f"# wrote {len(result['picks'])} picks for {device} to {out_path}")


if __name__ == "__main__":
    main()
