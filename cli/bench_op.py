"""Operator benchmark (GPU): MHLA prefill and decode against fla's linear attention and SDPA.

    python -m mhla_stream.cli.bench_op --lengths 2048,8192,32768,65536,131072 --json out.json

Shapes: B = 1, H = 4, K = 128, V = 256 (the 340M layer); SDPA uses 16 heads x 64 (the same-size
Transformer). fla is optional: its columns are skipped when it is not installed.

``--backward``: forward + backward instead (the training step of one layer's operator), Triton
autograd path against the torch chunk form and fla's chunk_linear_attn, at ``--batch`` sequences:

    python -m mhla_stream.cli.bench_op --backward --batch 8 --lengths 2048,8192 --json bwd.json
"""
from __future__ import annotations

import json
import time

import click
import torch
import torch.nn.functional as F

from mhla_stream import mhla_attention
from mhla_stream.mixing import init_mixing


def _fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
        return chunk_linear_attn, fused_recurrent_linear_attn
    except Exception:
        return None, None


def mhla_flops(T, H, K, V, C=64, L=32):
    """Useful FLOPs: summaries, banded mixing, q P, intra-block scores and values."""
    nb = -(-T // C)
    return H * (2 * T * K * V + 2 * nb * min(nb, L) * K * V + 2 * T * K * V + 2 * T * C * (K + V))


def bench(fn, ms=200):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=ms, return_mode="median")


@click.command()
@click.option("--lengths", default="2048,8192,32768,65536,131072")
@click.option("--dtype", default="bfloat16", type=click.Choice(["bfloat16", "float16"]))
@click.option("--json", "json_path", default=None, help="write the results here as JSON")
@click.option("--torch-max", default=32768, help="longest T for the plain PyTorch chunk form")
@click.option("--profile", "profile_T", default=0, help="print the per-kernel time of one MHLA prefill at this T")
@click.option("--backward", is_flag=True, help="time forward + backward (training) instead of prefill and decode")
@click.option("--batch", default=1, type=click.IntRange(min=1), help="sequences per call (--backward)")
def main(lengths, dtype, json_path, torch_max, profile_T, backward, batch):
    dev, dt = "cuda", getattr(torch, dtype)
    H, K, V, C, L = 4, 128, 256, 64, 32
    chunk_la, recur_la = _fla()
    m = init_mixing(L).to(dev)
    if backward:
        return _backward_table([int(x) for x in lengths.split(",")], batch, dt, dtype, json_path, torch_max,
                               chunk_la, (H, K, V, C, L))
    rows = []
    for T in [int(x) for x in lengths.split(",")]:
        torch.manual_seed(0)
        q = torch.rand(1, T, H, K, device=dev, dtype=dt)
        k = torch.rand(1, T, H, K, device=dev, dtype=dt)
        v = torch.randn(1, T, H, V, device=dev, dtype=dt)
        r = {"T": T}
        r["mhla_ms"] = bench(lambda: mhla_attention(q, k, v, m, backend="triton"))
        if T <= torch_max:
            r["torch_chunk_ms"] = bench(lambda: mhla_attention(q, k, v, m, backend="torch"))
        if chunk_la:
            r["fla_chunk_ms"] = bench(lambda: chunk_la(q, k, v, normalize=False))
        qs = torch.randn(1, 16, T, 64, device=dev, dtype=dt)
        ks, vs = torch.randn_like(qs), torch.randn_like(qs)
        r["sdpa_ms"] = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        r["mhla_tok_s"] = T / r["mhla_ms"] * 1e3
        r["mhla_tflops"] = mhla_flops(T, H, K, V, C, L) / r["mhla_ms"] * 1e-9
        # decode: one more token after a T-token prefix
        _, state = mhla_attention(q, k, v, m, return_state=True, backend="triton")
        q1, k1, v1 = q[:, :1].clone(), k[:, :1].clone(), v[:, :1].clone()
        r["mhla_decode_us"] = bench(lambda: mhla_attention(q1, k1, v1, m, state=state, backend="triton")) * 1e3
        state_bytes = 3 * H * K * V * 4  # R read + written, P read, per step
        r["mhla_decode_GBs"] = state_bytes / (r["mhla_decode_us"] * 1e-6) / 1e9
        if recur_la:
            s0 = torch.zeros(1, H, K, V, device=dev, dtype=torch.float32)
            r["fla_recurrent_us"] = bench(lambda: recur_la(q1, k1, v1, initial_state=s0, output_final_state=True)) * 1e3
        q1s = qs[:, :, :1].contiguous()
        r["sdpa_decode_us"] = bench(lambda: F.scaled_dot_product_attention(q1s, ks, vs)) * 1e3
        if "fla_chunk_ms" in r:
            r["mhla_over_fla"] = r["mhla_ms"] / r["fla_chunk_ms"]
        r["sdpa_over_mhla"] = r["sdpa_ms"] / r["mhla_ms"]
        rows.append(r)
        del q, k, v, qs, ks, vs, state
        torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
    if profile_T:
        _profile(profile_T, dev, dt, H, K, V, m)
    cols = ["T", "mhla_ms", "fla_chunk_ms", "mhla_over_fla", "sdpa_ms", "sdpa_over_mhla", "torch_chunk_ms",
            "mhla_tok_s", "mhla_tflops", "mhla_decode_us", "fla_recurrent_us", "sdpa_decode_us", "mhla_decode_GBs"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "dtype": dtype,
            "torch": torch.__version__, "shapes": dict(B=1, H=H, K=K, V=V, C=C, L=L)}
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _backward_table(lengths, B, dt, dtype, json_path, torch_max, chunk_la, shape):
    """Forward + backward of one call: Triton autograd (mhla), torch chunk form, fla chunk_linear_attn."""
    H, K, V, C, L = shape
    dev = "cuda"
    m = init_mixing(L).to(dev).requires_grad_()
    rows = []
    for T in lengths:
        torch.manual_seed(0)
        q = torch.rand(B, T, H, K, device=dev, dtype=dt, requires_grad=True)
        k = torch.rand(B, T, H, K, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(B, T, H, V, device=dev, dtype=dt, requires_grad=True)
        do = torch.randn(B, T, H, V, device=dev, dtype=dt)

        def step(backend):
            def run():
                q.grad = k.grad = v.grad = m.grad = None
                mhla_attention(q, k, v, m, block_size=C, backend=backend).backward(do)
            return run
        r = {"T": T, "B": B}
        for name, backend in (("mhla", "triton"), ("torch_chunk", "torch")):
            if backend == "torch" and T > torch_max:
                continue
            step(backend)()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            r[f"{name}_fwd_bwd_ms"] = bench(step(backend))
            r[f"{name}_extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        if chunk_la:
            def fla_run():
                q.grad = k.grad = v.grad = None
                chunk_la(q, k, v, normalize=False)[0].backward(do)
            r["fla_fwd_bwd_ms"] = bench(fla_run)
            r["mhla_over_fla"] = r["mhla_fwd_bwd_ms"] / r["fla_fwd_bwd_ms"]
        if "torch_chunk_fwd_bwd_ms" in r:
            r["torch_over_mhla"] = r["torch_chunk_fwd_bwd_ms"] / r["mhla_fwd_bwd_ms"]
        r["mhla_tok_s"] = B * T / r["mhla_fwd_bwd_ms"] * 1e3
        rows.append(r)
        del q, k, v, do
        torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
    cols = ["T", "B", "mhla_fwd_bwd_ms", "fla_fwd_bwd_ms", "mhla_over_fla", "torch_chunk_fwd_bwd_ms", "torch_over_mhla",
            "mhla_tok_s", "mhla_extra_peak_gib", "torch_chunk_extra_peak_gib"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "dtype": dtype,
            "torch": torch.__version__, "mode": "forward+backward", "shapes": dict(B=B, H=H, K=K, V=V, C=C, L=L)}
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _profile(T, dev, dt, H, K, V, m):
    from torch.profiler import ProfilerActivity, profile
    q = torch.rand(1, T, H, K, device=dev, dtype=dt)
    k, v = torch.rand_like(q), torch.randn(1, T, H, V, device=dev, dtype=dt)
    for _ in range(3):
        mhla_attention(q, k, v, m, backend="triton")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            mhla_attention(q, k, v, m, backend="triton")
        torch.cuda.synchronize()
    print(f"per-kernel CUDA time, MHLA prefill T={T} (10 calls):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
