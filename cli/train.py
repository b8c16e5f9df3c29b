"""``mhla-train``: train an MHLA language model (or a baseline) from the token files that
``prepare_data`` writes, on one device or many (``torchrun``, DDP). bf16 autocast on a GPU,
gradient accumulation, periodic validation loss, atomic checkpoints that resume on any number of
ranks, tokens/s and MFU in a JSON-lines log.

    mhla-train --data runs/data --out runs/mhla --minutes 7
    mhla-train --data runs/data --out runs/tfm --arch transformer --steps 3000
    mhla-train --data runs/data --out runs/gla --arch gla --preset mhla-340m --batch 8   # needs fla
    torchrun --nproc_per_node 2 -m mhla_stream.cli.train --data runs/data --out runs/340m --preset mhla-340m --batch 8
"""
from __future__ import annotations


import click

from mhla_stream.presets import PRESETS
from mhla_stream.training import ARCHS

from .common import FiniteRange, command, fail

# torch and the training modules are imported inside main(), so that --help is fast

TRAIN_PRESETS = tuple(sorted(PRESETS))


POS = click.IntRange(1)


@command
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="from prepare_data")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--arch", default="mhla", type=click.Choice(ARCHS),
              help="mhla; linear (every block weighted 1); transformer (transformers' Llama, SDPA); gla (fla's "
                   "GLAForCausalLM at MHLA's shape; needs fla installed)")
@click.option("--preset", default=None, type=click.Choice(TRAIN_PRESETS),
              help="a named architecture (mhla-340m: SPEC section 3); overrides --hidden/--layers/--heads/"
                   "--block-size/--num-blocks; the vocabulary is the data's tokenizer's")
@click.option("--hidden", default=384, type=POS)
@click.option("--layers", default=8, type=POS)
@click.option("--heads", default=4, type=POS)
@click.option("--block-size", default=64, type=POS)
@click.option("--num-blocks", default=16, type=POS, help="L: trained blocks (context = block size x L)")
@click.option("--policy", default="window+far", type=click.Choice(["window", "window+far"]))
@click.option("--batch", default=32, type=click.IntRange(min=1), help="sequences per micro-batch per rank")
@click.option("--grad-accum", default=1, type=click.IntRange(min=1),
              help="micro-batches per optimizer step; global batch = batch x grad-accum x ranks")
@click.option("--lr", default=2e-3, type=FiniteRange(0, 1, min_open=True))
@click.option("--warmup", default=200, type=click.IntRange(min=0))
@click.option("--steps", default=100_000, type=click.IntRange(min=1), help="upper bound on optimizer steps")
@click.option("--stop-at", default=0, type=click.IntRange(min=0),
              help="stop with a checkpoint after this step, keeping the schedule of --steps (0 = off)")
@click.option("--minutes", default=0.0, type=FiniteRange(0, 1e6), help="wall-clock budget for the loop (0 = none)")
@click.option("--stories-frac", default=0.2, type=FiniteRange(0, 1))
@click.option("--eval-every", default=250, type=click.IntRange(min=1))
@click.option("--eval-windows", default=64, type=click.IntRange(min=1), help="validation windows per evaluation")
@click.option("--log-every", default=50, type=click.IntRange(min=1), help="steps between throughput log lines")
@click.option("--seed", default=0, type=click.IntRange(0, 2 ** 32 - 1))
@click.option("--fused-loss/--no-fused-loss", default=True,
              help="cross-entropy fused with the LM head, chunk by chunk: the full logits never exist")
@click.option("--loss-chunk", default=4096, type=click.IntRange(min=1), help="tokens per chunk of the fused loss")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=False,
              help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)")
@click.option("--attn-backend", default="auto", type=click.Choice(["auto", "triton", "torch"]),
              help="MHLA operator while training: auto = Triton forward + backward on CUDA, the torch chunk form "
                   "elsewhere; torch forces the torch form")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the training step (default: on for CUDA, where it measured 1.3-1.6x faster with "
                   "42%% less memory at the 340M shape; off on the CPU)")
@click.option("--resume/--no-resume", default=True)
@click.option("--save/--no-save", default=True, help="write checkpoints and the best model (off for benchmarks)")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
def main(data, out, arch, preset, hidden, layers, heads, block_size, num_blocks, policy, batch, grad_accum, lr, warmup,
         steps, stop_at, minutes, stories_frac, eval_every, eval_windows, log_every, seed, fused_loss, loss_chunk,
         activation_checkpointing, attn_backend, compile, resume, save, device):
    """Train an MHLA language model (or a baseline) from prepare_data's token files."""
    args = dict(locals())
    from mhla_stream.training.checkpoint import TrainCheckpointError
    from mhla_stream.training.data import DataError
    from mhla_stream.training.distributed import setup
    from mhla_stream.training.loop import train
    ctx = setup(device)
    try:
        train(ctx, **args)
    except (DataError, TrainCheckpointError) as e:
        fail(str(e))
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
