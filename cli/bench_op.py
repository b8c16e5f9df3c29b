"""Operator benchmark (GPU): MHLA prefill and decode against fla's linear attention and SDPA.

    python -m mhla_stream.cli.bench_op --lengths 2048,8192,32768,65536,131072 --json out.json

Shapes: B = 1, H = 4, K = 128, V = 256 (the 340M layer); SDPA uses 16 heads x 64 (the same-size
Transformer). fla is optional: its columns are skipped when it is not installed.

``--variants lean,base``: the Triton forward in each layout of ``triton_chunk.VARIANTS`` in the same
run (``mhla_ms`` is the first; the others as ``mhla_<name>_ms``), each with the bytes its traffic
model predicts (``forward_bytes``) and the bandwidth that implies.

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


def forward_bytes(T, H, K, V, C=64, L=32, variant="lean", elem=2, B=1, mix_bi=64):
    """Predicted DRAM traffic of one stateless 16-bit prefill (``triton_chunk``'s three passes), per
    (block, sequence, head): pass 1 reads k (once per 64 value columns when the programs split V) and
    v and writes S; pass 2 reads S with its halo (the W = L - 1 older blocks of each tile of
    ``mix_bi`` targets, in chunks of 32) and writes P in the input dtype; pass 3 reads q, k (as
    pass 1), v and P, writes o. The base layout's mix tile is 64 blocks; lean's is tuned (64 or 128)."""
    nb = -(-T // C)
    lean = variant == "lean"
    wide = lean and nb * B * H >= 264                  # triton_chunk._WIDE_PROGRAMS: V walked in-program
    split = 1 if wide else -(-V // 64)
    tile = mix_bi if lean else 64                      # mix targets a program
    halo = -(-(tile + L - 2) // 32) * 32 / tile        # sources loaded per target
    s_b = K * V * (2 if lean else 4)
    p_b = K * V * elem
    q_b, k_b, v_b, o_b = C * K * elem, C * K * elem, C * V * elem, C * V * elem
    per_block = (k_b * split + v_b + s_b) + (s_b * halo + p_b) + ((q_b + k_b) * split + v_b + p_b + o_b)
    return per_block * nb * H * B


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
@click.option("--variants", default="lean", help="Triton forward layouts to time, comma-separated (lean,base; lean is the default layout)")
@click.option("--no-decode", is_flag=True, help="prefill columns only (no decode step timings)")
def main(lengths, dtype, json_path, torch_max, profile_T, backward, batch, variants, no_decode):
    from mhla_stream.kernels import triton_chunk
    variants = [x for x in variants.split(",") if x]
    bad = [x for x in variants if x not in triton_chunk.VARIANTS]
    if bad or not variants:
        raise click.BadParameter(f"{bad or variants}: expected names from {', '.join(triton_chunk.VARIANTS)}",
                                 param_hint="--variants")
    triton_chunk.set_variant(variants[0])
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
        for name in variants:
            triton_chunk.set_variant(name)
            ms = bench(lambda: mhla_attention(q, k, v, m, backend="triton"))
            # the mix tile the tuner chose (T > one block: the mix pass ran last with this layout)
            best = getattr(triton_chunk._mix_kernel, "best_config", None)
            tile = best.kwargs if best is not None and T > C else {"BI": 64, "BCOL": 0}
            gb = forward_bytes(T, H, K, V, C, L, name, mix_bi=tile["BI"]) / 1e9
            # BIxBCOL, then warps and stages
            how = f"/{best.num_warps}w{best.num_stages}s" if best is not None and T > C else ""
            r.update({f"mhla_{name}_ms": ms, f"{name}_model_GB": gb, f"{name}_GBs": gb / (ms * 1e-3),
                      f"{name}_mix_tile": f"{tile['BI']}x{tile['BCOL']}{how}"})
        triton_chunk.set_variant(variants[0])
        r["mhla_ms"] = r[f"mhla_{variants[0]}_ms"]
        if T <= torch_max:
            r["torch_chunk_ms"] = bench(lambda: mhla_attention(q, k, v, m, backend="torch"))
        if chunk_la:
            r["fla_chunk_ms"] = bench(lambda: chunk_la(q, k, v, normalize=False))
        qs = torch.randn(1, 16, T, 64, device=dev, dtype=dt)
        ks, vs = torch.randn_like(qs), torch.randn_like(qs)
        r["sdpa_ms"] = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        r["mhla_tok_s"] = T / r["mhla_ms"] * 1e3
        r["mhla_tflops"] = mhla_flops(T, H, K, V, C, L) / r["mhla_ms"] * 1e-9
        state = None
        if not no_decode:  # decode: one more token after a T-token prefix
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
            for name in variants:
                r[f"{name}_over_fla"] = r[f"mhla_{name}_ms"] / r["fla_chunk_ms"]
        r["sdpa_over_mhla"] = r["sdpa_ms"] / r["mhla_ms"]
        rows.append(r)
        del q, k, v, qs, ks, vs, state
        torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
    if profile_T:
        for name in variants:
            triton_chunk.set_variant(name)
            print(f"layout {name}:")
            _profile(profile_T, dev, dt, H, K, V, m)
        triton_chunk.set_variant(variants[0])
    per_variant = [f"{c}" for name in variants[1:] for c in (f"mhla_{name}_ms", f"{name}_over_fla")]
    per_variant += [c for name in variants for c in (f"{name}_GBs", f"{name}_mix_tile")]
    cols = ["T", "mhla_ms", "fla_chunk_ms", "mhla_over_fla", *per_variant, "sdpa_ms", "sdpa_over_mhla", "torch_chunk_ms",
            "mhla_tok_s", "mhla_tflops", "mhla_decode_us", "fla_recurrent_us", "sdpa_decode_us", "mhla_decode_GBs"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "dtype": dtype,
            "torch": torch.__version__, "shapes": dict(B=1, H=H, K=K, V=V, C=C, L=L), "variants": variants}
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
