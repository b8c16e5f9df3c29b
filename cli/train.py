"""``mhla-train``: train an MHLA language model (or a baseline) from the token files that
``prepare_data`` writes. bf16 autocast on a GPU, progress bar, periodic validation loss,
checkpoints with resume, and a JSON-lines log.

    mhla-train --data runs/data --out runs/mhla --minutes 7
    mhla-train --data runs/data --out runs/tfm --arch transformer --steps 3000
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import click
import numpy as np
import torch

from .common import fail

ARCHS = ("mhla", "linear", "transformer")


def build_model(arch, vocab, hidden, layers, heads, block_size, num_blocks, policy):
    from mhla_stream import MHLAConfig, MHLAForCausalLM
    if arch == "transformer":
        from transformers import LlamaConfig, LlamaForCausalLM
        from mhla_stream.configuration import mlp_intermediate_size
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          intermediate_size=mlp_intermediate_size(hidden, 4), max_position_embeddings=block_size * num_blocks,
                          rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
        return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    cfg = MHLAConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, block_size=block_size,
                     num_blocks=num_blocks, mixing_policy=policy, bos_token_id=1, eos_token_id=2)
    model = MHLAForCausalLM(cfg)
    if arch == "linear":  # plain causal linear attention: every block weighted 1, frozen
        for layer in model.model.layers:
            layer.attn.mixing_matrix.data.fill_(1.0)
            layer.attn.mixing_matrix.requires_grad_(False)
    return model


class Batches:
    """Random windows of ``context + 1`` tokens, a fraction from the stories, the rest from books."""

    def __init__(self, data: Path, context: int, stories_frac: float, seed: int):
        self.stories = np.fromfile(data / "stories.bin", dtype=np.uint16)
        self.books = np.fromfile(data / "books.bin", dtype=np.uint16)
        self.context, self.frac = context, stories_frac
        self.rng = np.random.default_rng(seed)

    def next(self, batch, device):
        rows = []
        for _ in range(batch):
            src = self.stories if self.rng.random() < self.frac else self.books
            i = self.rng.integers(0, len(src) - self.context - 1)
            rows.append(src[i:i + self.context + 1])
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        return x.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, context: int, device, max_windows=64) -> float:
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // context)
    losses = []
    for i in range(0, n, 16):
        x = np.stack([tokens[j * context: j * context + context + 1] for j in range(i, min(n, i + 16))]).astype(np.int64)
        x = torch.from_numpy(x).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none"))
    model.train()
    return float(torch.cat(losses).mean())


def save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_resume(ckpt: Path, model, opt) -> tuple[int, float, float]:
    """Resume state from ``ckpt.pt``: read with ``weights_only=True`` (tensors and plain values only,
    so a pickled object that would run code is refused, never executed), checked, then applied."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{ckpt}: cannot resume, not a plain checkpoint ({type(e).__name__}: truncated, damaged, or holding "
             "pickled objects, which are never run); move it away or pass --no-resume")
    ok = (isinstance(state, dict) and isinstance(state.get("model"), dict) and isinstance(state.get("opt"), dict)
          and isinstance(state.get("step"), int) and not isinstance(state.get("step"), bool) and state["step"] >= 0
          and all(isinstance(state.get(k), (int, float)) for k in ("best", "elapsed")))
    if not ok:
        fail(f"{ckpt}: cannot resume, expected model, opt, step, best and elapsed entries; pass --no-resume")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        fail(f"{ckpt}: cannot resume, it was saved for another model or settings "
             f"({' '.join(str(e).split())[:240]}); pass --no-resume or another --out")
    return state["step"], float(state["best"]), float(state["elapsed"])


def read_data_info(data: Path, context: int) -> int:
    """The vocabulary size, after checking that the token files exist and hold a full window."""
    try:
        vocab = json.loads((data / "info.json").read_text(encoding="utf-8"))["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{data}: not a prepare_data folder (info.json: {type(e).__name__}); run python -m "
             "mhla_stream.cli.prepare_data first")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 3 <= vocab <= 65536:
        fail(f"{data / 'info.json'}: vocab_size must be an int in [3, 65536] (uint16 token files), got {vocab!r}")
    for name in ("stories.bin", "books.bin", "valid.bin"):
        f = data / name
        if not f.is_file():
            fail(f"{f}: token file missing; run prepare_data first")
        if f.stat().st_size // 2 < context + 2:
            fail(f"{f}: holds {f.stat().st_size // 2} tokens, fewer than one window of {context + 1}")
    if not (data / "tokenizer.model").is_file():
        fail(f"{data / 'tokenizer.model'}: missing (it is copied next to the best checkpoint); run prepare_data first")
    return vocab


POS = click.IntRange(1)


class FiniteRange(click.FloatRange):
    """click's FloatRange lets NaN through (every comparison with NaN is false)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="from prepare_data")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--arch", default="mhla", type=click.Choice(ARCHS))
@click.option("--hidden", default=384, type=POS)
@click.option("--layers", default=8, type=POS)
@click.option("--heads", default=4, type=POS)
@click.option("--block-size", default=64, type=POS)
@click.option("--num-blocks", default=16, type=POS, help="L: trained blocks (context = block size x L)")
@click.option("--policy", default="window+far", type=click.Choice(["window", "window+far"]))
@click.option("--batch", default=32, type=POS)
@click.option("--lr", default=2e-3, type=FiniteRange(0, 1, min_open=True))
@click.option("--warmup", default=200, type=click.IntRange(0))
@click.option("--steps", default=100_000, type=POS, help="upper bound on optimizer steps")
@click.option("--minutes", default=0.0, type=FiniteRange(0, 1e6), help="wall-clock budget for the loop (0 = none)")
@click.option("--stories-frac", default=0.2, type=FiniteRange(0, 1))
@click.option("--eval-every", default=250, type=POS)
@click.option("--seed", default=0, type=click.IntRange(0, 2 ** 32 - 1))
@click.option("--compile/--no-compile", default=False)
@click.option("--resume/--no-resume", default=True)
def main(data, out, arch, hidden, layers, heads, block_size, num_blocks, policy, batch, lr, warmup, steps, minutes,
         stories_frac, eval_every, seed, compile, resume):
    from tqdm import tqdm
    data, out = Path(data), Path(out)
    context = block_size * num_blocks
    if context > 1 << 20:
        fail(f"--block-size x --num-blocks = {context} tokens of context, more than {1 << 20}")
    if arch == "transformer" and hidden % 64:
        fail(f"--hidden {hidden}: the transformer baseline needs a multiple of 64 (heads of 64)")
    vocab = read_data_info(data, context)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create the folder ({e.strerror})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    try:
        model = build_model(arch, vocab, hidden, layers, heads, block_size, num_blocks, policy).to(device)
    except ValueError as e:  # MHLAConfig refuses impossible shapes with one line
        fail(str(e))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "mixing" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "mixing" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    step, best, elapsed = 0, float("inf"), 0.0
    ckpt = out / "ckpt.pt"
    if resume and ckpt.exists():
        step, best, elapsed = load_resume(ckpt, model, opt)
        click.echo(f"resumed from {ckpt} at step {step}")
    batches = Batches(data, context, stories_frac, seed + step)
    valid = np.fromfile(data / "valid.bin", dtype=np.uint16)
    fwd = torch.compile(model) if compile else model
    total = steps if not minutes else None
    log = open(out / "log.jsonl", "a")

    def lr_at(s):
        horizon = steps if not minutes else max(s + 1, int(est_steps))
        if s < warmup:
            return lr * (s + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, horizon - warmup)))))

    est_steps = steps
    bar = tqdm(total=total, initial=step, desc=f"train {arch} ({n_params / 1e6:.1f}M)", dynamic_ncols=True)
    t0 = time.time() - elapsed
    model.train()
    while step < steps:
        x = batches.next(batch, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = fwd(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.time() - t0
        if minutes:
            est_steps = step / elapsed * minutes * 60
        bar.update(1)
        done = (minutes and elapsed >= minutes * 60) or step >= steps
        if step % eval_every == 0 or done:
            val = evaluate(model, valid, context, device)
            rec = {"step": step, "tokens": step * batch * context, "train_loss": float(loss), "val_loss": val,
                   "lr": lr_at(step), "elapsed_s": round(elapsed, 1), "params": n_params, "arch": arch}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{val:.3f}")
            if val < best:
                best = val
                if hasattr(model, "save_pretrained"):
                    model.save_pretrained(out / "best")
                    shutil.copy(data / "tokenizer.model", out / "best" / "tokenizer.model")
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                         "elapsed": elapsed}, ckpt)
        if done:
            break
    bar.close()
    summary = {"arch": arch, "params": n_params, "steps": step, "tokens": step * batch * context,
               "best_val_loss": best, "elapsed_s": round(time.time() - t0, 1), "context": context,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
