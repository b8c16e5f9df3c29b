"""The training loop behind ``mhla-train`` (one process of a torchrun job, or the only one)."""
from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import click
import torch

from . import checkpoint as ckpt_io
from .data import Batches, DataError, evaluate, load_tokens, read_vocab_size
from .distributed import DistContext
from .flops import mfu, peak_bf16_flops, train_flops_per_token
from .model import (ArchError, LossModule, build_model, check_shape, context_of, enable_activation_checkpointing,
                    load_fla, resolve_shape)


def train(ctx: DistContext, data, out, arch, preset, hidden, layers, heads, block_size, num_blocks, policy, batch,
          grad_accum, lr, warmup, steps, stop_at, minutes, stories_frac, eval_every, eval_windows, log_every, seed,
          fused_loss, loss_chunk, activation_checkpointing, compile, resume, save, device, attn_backend="auto"):
    from tqdm import tqdm
    args = {k: v for k, v in locals().items() if k not in ("ctx", "tqdm")}
    data, out, dev = Path(data), Path(out), ctx.device
    if compile is None:  # measured (README, Train): the fused elementwise work is most of the gain
        # (fla's GLA brings its own Triton kernels and was never measured compiled: left eager)
        compile = args["compile"] = dev.type == "cuda" and arch != "gla"
    if preset is None and block_size * num_blocks > 1 << 20:
        raise DataError(f"--block-size x --num-blocks = {block_size * num_blocks} tokens of context, more than {1 << 20}")
    try:  # the shape each arch is built with, and fla for GLA: refused here, before any folder exists
        check_shape(arch, resolve_shape(preset, hidden, layers, heads, block_size, num_blocks))
        if arch == "gla":
            load_fla()
    except ArchError as e:
        raise DataError(str(e)) from None
    if arch == "mhla" and attn_backend != "auto":  # e.g. triton on a machine without CUDA: one line, not a traceback
        from ..attention import resolve_backend
        try:
            resolve_backend(attn_backend, dev)
        except (RuntimeError, ValueError) as e:
            raise DataError(f"--attn-backend {attn_backend}: {e}") from None
    vocab = read_vocab_size(data)
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    try:
        model = build_model(arch, vocab, hidden, layers, heads, block_size, num_blocks, policy, preset).to(dev)
    except ValueError as e:  # MHLAConfig refuses impossible shapes with one line
        raise DataError(str(e))
    context = context_of(model)
    batches = Batches(data, context, stories_frac, seed, vocab)
    valid = load_tokens(data / "valid.bin", context + 2, vocab)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = train_flops_per_token(model, arch)
    peak = peak_bf16_flops(dev)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "mixing" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "mixing" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    try:  # only now, after every input was checked: a refused run leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create the folder ({e.strerror})")
    step, best, elapsed = 0, float("inf"), 0.0
    ckpt = out / ckpt_io.FILENAME
    found = ckpt if ckpt.exists() else (out / ckpt_io.LEGACY_FILENAME)
    if resume and found.exists():
        meta = ckpt_io.load(found, model, opt, dev)
        step, best, elapsed = meta["step"], meta["best"], meta["elapsed"]
        if ctx.is_main:
            click.echo(f"resumed from {found} at step {step} (written by {meta.get('world', 1)} rank(s), "
                       f"now {ctx.world})", err=True)
    step_module = LossModule(model, fused_loss, loss_chunk, attn_backend)
    if ctx.distributed:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[dev.index] if dev.type == "cuda" else None)
    run_step = torch.compile(step_module) if compile else step_module
    log = open(out / "log.jsonl", "a") if ctx.is_main else None
    global_batch = batch * grad_accum * ctx.world
    tokens_per_step = global_batch * context
    est_steps = steps

    def lr_at(s):
        horizon = steps if not minutes else max(s + 1, int(est_steps))
        if s < warmup:
            return lr * (s + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, horizon - warmup)))))

    def write(rec):
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    bar = tqdm(total=steps if not minutes else None, initial=step, disable=not ctx.is_main, dynamic_ncols=True,
               desc=f"train {arch} ({n_params / 1e6:.1f}M) x{ctx.world}")
    rates, loss_sum, since = [], torch.zeros((), device=dev), step
    t0 = time.time() - elapsed
    t_mark, paused = time.time(), 0.0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    done = step >= steps or (stop_at and step >= stop_at)
    while not done:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        for micro in range(grad_accum):
            x = batches.get(step, micro * ctx.world + ctx.rank, batch, dev)
            sync = step_module.no_sync() if ctx.distributed and micro < grad_accum - 1 else nullcontext()
            with sync:  # DDP averages the gradients over ranks on the last micro-batch's backward only
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    loss = run_step(x) / grad_accum
                loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - t0
        if minutes:  # rank 0's clock decides for all ranks, so the schedule and the stop agree
            elapsed, est = ctx.from_main([elapsed, step / max(elapsed, 1e-9) * minutes * 60])
            est_steps = est
        bar.update(1)
        done = bool((minutes and elapsed >= minutes * 60) or step >= steps or (stop_at and step >= stop_at))
        evaluate_now = step % eval_every == 0 or done
        if step % log_every == 0 or evaluate_now:
            train_loss = _mean_over_ranks(ctx, loss_sum / (step - since))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.time()
            rate = (step - since) * tokens_per_step / max(now - t_mark - paused, 1e-9)
            rates.append(rate)
            rec = {"step": step, "tokens": step * tokens_per_step, "train_loss": train_loss, "lr": lr_at(step),
                   "tokens_per_s": round(rate, 1), "mfu": _round(mfu(rate, flops_per_token, peak, ctx.world)),
                   "peak_mem_gib": _peak_gib(dev), "elapsed_s": round(elapsed, 1), "params": n_params, "arch": arch,
                   "world": ctx.world, "global_batch": global_batch}
            loss_sum.zero_()
            since, t_mark, paused = step, now, 0.0
            if evaluate_now:
                t_eval = time.time()
                if ctx.is_main:
                    rec["val_loss"] = evaluate(model, valid, context, dev, eval_windows)
                    bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{rec['val_loss']:.3f}")
                    if rec["val_loss"] < best:
                        best = rec["val_loss"]
                        if save:
                            _save_best(model, data, out)
                    if save:
                        ckpt_io.save(ckpt, model, opt, {"step": step, "best": best, "elapsed": elapsed,
                                                        "world": ctx.world, "args": args})
                ctx.barrier()
                paused = time.time() - t_eval  # evaluation and checkpoint time is not training time
            write(rec)
    bar.close()
    if not ctx.is_main:
        return
    steady = rates[1:] or rates  # the first interval includes warm-up and compilation
    rate = sorted(steady)[len(steady) // 2] if steady else None
    summary = {"arch": arch, "preset": preset, "params": n_params, "steps": step, "tokens": step * tokens_per_step,
               "best_val_loss": best, "elapsed_s": round(time.time() - t0, 1), "context": context,
               "world": ctx.world, "batch": batch, "grad_accum": grad_accum, "global_batch": global_batch,
               "tokens_per_s": rate and round(rate, 1), "mfu": _round(rate and mfu(rate, flops_per_token, peak, ctx.world)),
               "peak_mem_gib": _peak_gib(dev), "fused_loss": fused_loss, "attn_backend": attn_backend,
               "activation_checkpointing": activation_checkpointing, "compile": compile,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    click.echo(json.dumps(summary))


def _mean_over_ranks(ctx: DistContext, value: torch.Tensor) -> float:
    if ctx.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= ctx.world
    return float(value)


def _round(x):
    return None if x is None else round(x, 4)


def _peak_gib(dev) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def _save_best(model, data: Path, out: Path) -> None:
    if hasattr(model, "save_pretrained"):
        tok = data / "tokenizer.model"
        # an MHLA model also writes tokenizer.json, shims and generation_config.json (plain transformers)
        extra = {"tokenizer_model": tok} if hasattr(model, "new_state") and tok.exists() else {}
        model.save_pretrained(out / "best", **extra)
        if tok.exists():
            shutil.copy(data / "tokenizer.model", out / "best" / "tokenizer.model")
