"""Probe (GPU, session 14): a decode kernel that keeps the open block as its tokens (keys and
values at slot pos % C) instead of R = sum k v^T, so a token reads P plus the slots filled so
far and writes 1.5 KB a head, where the kernel on main reads P and R and writes R (3 * 128 KB a
head). Scores q . k_s are formed per slot chunk (no tensor-core product, no shared-memory
staging). Timed against main's kernel (`decode_into`) from CUDA graphs of 24 launches, one per
layer, each on its own state (HBM traffic as in a real step), at the 340M shape, mid-block.
Standalone: the state-format plumbing is not written unless this kernel wins."""
import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from mhla_stream import MHLAForCausalLM, preset_config
from mhla_stream.kernels.triton_common import PDL, pow2, window_coef
from mhla_stream.kernels.triton_decode import _features, decode_into


@triton.jit
def _tokens_kernel(q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, p_ptr, kb_ptr, vb_ptr, pe_ptr, pos_ptr, m_ptr, cos_ptr, sin_ptr,
                   L, C, scale, sq_b, sq_h, sv_b, sv_h, so_b, so_h, sc_b,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, PDL: tl.constexpr,
                   BK2: tl.constexpr, BV: tl.constexpr, SC: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    K2: tl.constexpr = (K + 1) // 2
    j = tl.arange(0, BK2)
    m1, m2 = j < K2, j < K - K2
    ov = tl.program_id(1) * BV + tl.arange(0, BV)
    mv = ov < V
    DT: tl.constexpr = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + b)
    i = pos // C
    c = pos - i * C
    lo = tl.minimum(tl.maximum(tl.load(pe_ptr + b) - i * C, 0), C)
    rows = tl.where(lo > 0, K, 0)
    t1 = j[:, None] * V + ov[None, :]                                                       # [BK2, BV]
    t2 = (K2 + j[:, None]) * V + ov[None, :]
    mt1, mt2 = m1[:, None] & mv[None, :], m2[:, None] & mv[None, :]
    head = bh * K * V
    p1 = tl.load(p_ptr + head + t1, mask=mt1, other=0.0)
    p2 = tl.load(p_ptr + head + t2, mask=mt2, other=0.0)
    r1 = tl.load(r_ptr + head + t1, mask=(j < rows)[:, None] & mt1, other=0.0)
    r2 = tl.load(r_ptr + head + t2, mask=(K2 + j < rows)[:, None] & mt2, other=0.0)
    diag = window_coef(m_ptr, L, i, i)
    qh, kh = q_ptr + b * sq_b + h * sq_h, k_ptr + b * sq_b + h * sq_h
    cs = tl.load(cos_ptr + b * sc_b + j, mask=m1, other=1.0)
    sn = tl.load(sin_ptr + b * sc_b + j, mask=m1, other=0.0)
    q1, q2 = _features(tl.load(qh + j, mask=m1, other=0.0).to(tl.float32),
                       tl.load(qh + K2 + j, mask=m2, other=0.0).to(tl.float32), cs, sn, True, DT)
    k1, k2 = _features(tl.load(kh + j, mask=m1, other=0.0).to(tl.float32),
                       tl.load(kh + K2 + j, mask=m2, other=0.0).to(tl.float32), cs, sn, True, DT)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + ov, mask=mv, other=0.0).to(tl.float32)        # [BV]
    kbh, vbh = kb_ptr + bh * C * K, vb_ptr + bh * C * V
    intra = tl.sum(q1[:, None] * r1, axis=0) + tl.sum(q2[:, None] * r2, axis=0) \
        + (tl.sum(q1 * k1, axis=0) + tl.sum(q2 * k2, axis=0)) * v                           # [BV]
    for s0 in range((lo // SC) * SC, c, SC):      # only the chunks holding buffered slots
        sl = s0 + tl.arange(0, SC)
        ok = (sl >= lo) & (sl < c)
        kb1 = tl.load(kbh + sl[:, None] * K + j[None, :], mask=ok[:, None] & m1[None, :], other=0.0)   # [SC, BK2]
        kb2 = tl.load(kbh + sl[:, None] * K + K2 + j[None, :], mask=ok[:, None] & m2[None, :], other=0.0)
        vc = tl.load(vbh + sl[:, None] * V + ov[None, :], mask=ok[:, None] & mv[None, :], other=0.0)   # [SC, BV]
        score = tl.sum(kb1 * q1[None, :], axis=1) + tl.sum(kb2 * q2[None, :], axis=1)                # [SC]
        intra += tl.sum(score[:, None] * vc, axis=0)
    o = tl.sum(q1[:, None] * p1, axis=0) + tl.sum(q2[:, None] * p2, axis=0) + diag * intra
    tl.store(o_ptr + b * so_b + h * so_h + ov, (o * scale).to(o_ptr.dtype.element_ty), mask=mv)
    tl.store(vbh + c * V + ov, v, mask=mv)
    if tl.program_id(1) == 0:
        tl.store(kbh + c * K + j, k1, mask=m1)
        tl.store(kbh + c * K + K2 + j, k2, mask=m2)


def tokens_into(o, q, k, v, mix, st, kb, vb, pe, scale, rope, BV, SC, warps):
    B, H, K = q.shape
    V = v.shape[-1]
    cos, sin = rope
    _tokens_kernel[(B * H, triton.cdiv(V, BV))](
        q, k, v, o, st.partial, st.prefix, kb, vb, pe, st.pos, mix, cos, sin, mix.shape[0], st.block_size, scale,
        q.stride(0), q.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), cos.stride(0),
        H=H, K=K, V=V, PDL=PDL, BK2=pow2((K + 1) // 2), BV=BV, SC=SC, num_warps=warps, launch_pdl=PDL)


def main():
    cfg = preset_config("mhla-340m", vocab_size=32000)
    model = MHLAForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    H, K, V, C = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.block_size
    mix = model.model.layers[0].attn.mixing_matrix
    slot = int(os.environ.get("SLOT", "32"))
    rows = []
    for B in (int(b) for b in os.environ.get("BATCHES", "1,8,32,128").split(",")):
        states = model.new_state(B)
        bufs = []
        for s in states:
            s.pos.fill_(slot)
            bufs.append((torch.randn(B, H, C, K, device="cuda"), torch.randn(B, H, C, V, device="cuda"),
                         torch.zeros(B, dtype=torch.int64, device="cuda")))
        qkv = torch.randn(B, 2 * H * K + H * V, device="cuda", dtype=torch.bfloat16)
        q, k = qkv[:, :H * K].view(B, H, K), qkv[:, H * K:2 * H * K].view(B, H, K)
        v = qkv[:, 2 * H * K:].view(B, H, V)
        o = torch.empty(B, H, V, device="cuda", dtype=torch.bfloat16)
        cs = torch.rand(B, K // 2, device="cuda")
        runs = [("main (R)", None, None, None, 3 * B * H * K * V * 4)]
        new_bytes = B * H * 4 * (K * V + slot * (K + V) + K + V)
        for bv in ((16, 32) if B < 8 else (32, 64)):
            for sc in (16, 64):
                for w in (4, 8):
                    runs.append(("tokens", bv, sc, w, new_bytes))
        for name, bv, sc, w, traffic in runs:
            def step():
                for s, (kb, vb, pe) in zip(states, bufs):
                    if bv is None:
                        decode_into(o, q, k, v, mix, s, K ** -0.5, rope=(cs, cs))
                    else:
                        tokens_into(o, q, k, v, mix, s, kb, vb, pe, K ** -0.5, (cs, cs), bv, sc, w)
            try:
                step()
                us = do_bench_cudagraph(step, rep=50) * 1e3 / len(states)
            except Exception as e:
                print(f"B={B} {name} BV={bv} SC={sc} w={w}: {type(e).__name__} {str(e)[:100]}", flush=True)
                continue
            rows.append(dict(kernel=name, batch=B, slot=slot, BV=bv, SC=sc, warps=w, us=us, GBps=traffic / us / 1e3))
            print(f"B={B:4d} {name:9s} BV={str(bv):>4s} SC={str(sc):>4s} w={str(w):>4s} {us:8.2f} us "
                  f"{traffic / us / 1e3:7.0f} GB/s", flush=True)
        del states, bufs
        torch.cuda.empty_cache()
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "tokens_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
