"""Probe (GPU, Hopper; triton >= 3.6): what a dependent stage costs when the weights are streamed
ahead by TMA, against one kernel launch per stage (session 18's question for issue 15).

Batch-1 decode is 24 layers x 5 dependent stages, each a launch of about 4.7 us while a layer's
weights need 8.6 us at the copy rate. Two persistent forms were slower than kernel boundaries
(session 11: grid barriers; session 13: counters in global memory), because the weights a
program had loaded for the next stage were waited for at each release. Copies by TMA into shared
memory are tracked by mbarriers, not by the release, so they can run ahead across stages.

The chain: S stages y_{s+1} = W_s y_s, W_s [D, D] bf16 (stacked [S * D, D]), y fp32. One program
per R rows (D / R programs, all resident); each keeps NB stages of its weight rows in flight
(TMA boxes of [R, BOX] behind one mbarrier a slot), waits for stage s - 1 by polling a counter
(acquire), computes its R outputs, stores them and adds one to stage s's counter (release).
Baselines, same weights: S launches of the project's one-row product (``skinny_linear``, PDL,
tuned) and S launches of F.linear (cuBLAS), each in a CUDA graph. Compiled offline for sm_90
with triton 3.6 (65.7 KB of shared memory, 32 registers at R = 8, NB = 4). Run on an H100, it was
slower than the launches (3.3 us a stage at R = 8, 2.7 at R = 16, against 2.1; D = 2048: 6.2
against 3.5). The later forms ask why: flags a program read by ld.acquire instead of one counter
polled by atomic RMWs from every program (SYNC 1; SYNC 2: warp 0 alone polls); one cross-lane sum
a stage instead of one a box, and 8 warps (SUM1); two programs a SM (more streams of weights).

    python .ci/gluon_stage_probe.py [--stages 120] [--dim 1024] [--json OUT]
Prints per-stage microseconds and the bandwidth, and checks the chain against torch.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

MAX_POLLS = gl.constexpr(1 << 20)  # a stage that never completes ends the poll (the check then fails) instead of hanging


@gluon.jit
def _flags_min(fptr):
    """The least of the flags at fptr, each read by ld.acquire: a load (no RMW), ordered before later reads."""
    f = gl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [fptr], dtype=gl.int32,
                                  is_pure=False, pack=1)
    return gl.min(f, axis=0)


@gluon.jit
def _chain_kernel(w_desc, y_ptr, cnt_ptr, S, P, D: gl.constexpr, R: gl.constexpr, BOX: gl.constexpr,
                  NB: gl.constexpr, SYNC: gl.constexpr = 0, PP: gl.constexpr = 128, SUM1: gl.constexpr = False):
    # SYNC 0: one counter a stage, every program polls it by atomic RMW (session 18's form);
    # SYNC 1: one flag a program (flags[p] = s + 1 when p's rows of y_{s+1} are stored), every warp reads
    #         all PP flags by ld.acquire and takes the least (no RMW on one address, no CTA barrier a poll);
    # SYNC 2: as 1, but warp 0 alone polls and the others wait at a barrier.
    # SUM1: one cross-lane sum a stage (a [R, BOX] accumulator) instead of one a box.
    pid = gl.program_id(0)
    NBOX: gl.constexpr = D // BOX
    # registers: a [R, BOX] weight box, 8 contiguous bf16 a thread along the row
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
    col: gl.constexpr = gl.SliceLayout(0, blk)   # [BOX] slice of y_s
    row: gl.constexpr = gl.SliceLayout(1, blk)   # [R] outputs
    # flags: each warp holds all PP of them (the warps replicate), so the least is a shuffle within the warp
    fl: gl.constexpr = gl.BlockedLayout([PP // 32], [32], [gl.num_warps()], [0])
    fptr = cnt_ptr + gl.arange(0, PP, layout=fl)   # PP - P padding flags are set high by the host
    bufs = gl.allocate_shared_memory(gl.bfloat16, [NB * NBOX, R, BOX], w_desc.layout)  # NB stages in flight
    bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NB):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    # prologue: the first NB stages' rows requested before anything waits
    for i in gl.static_range(NB):
        if i < S:
            mbarrier.expect(bars.index(i), NBOX * R * BOX * 2)
            for b in gl.static_range(NBOX):
                tma.async_copy_global_to_shared(w_desc, [i * D + pid * R, b * BOX], bars.index(i),
                                                bufs.index(i * NBOX + b))
    rk = gl.arange(0, BOX, layout=col)
    rr = gl.arange(0, R, layout=row)
    polls = 0  # flags: a budget for the chain, not a stage (programs not all resident end in about a second)
    for s in range(S):
        slot = s % NB
        if s > 0:  # every program's rows of y_s written
            if SYNC == 0:  # the counter of stage s - 1 reached P (the PTX as before the flags were added)
                seen = gl.atomic_add(cnt_ptr + s - 1, 0, sem="acquire", scope="gpu")
                polls = 0
                while (seen < P) & (polls < MAX_POLLS):
                    seen = gl.atomic_add(cnt_ptr + s - 1, 0, sem="acquire", scope="gpu")
                    polls += 1
            elif SYNC == 1:  # every flag reached s, seen by each warp for itself
                seen = _flags_min(fptr)
                while (seen < s) & (polls < MAX_POLLS):
                    seen = _flags_min(fptr)
                    polls += 1
            else:  # warp 0 sees it; the barrier orders the other warps' reads after its acquire
                tid = gl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [pid], dtype=gl.int32,
                                                is_pure=True, pack=1)
                if tid < 32:
                    seen = _flags_min(fptr)
                    while (seen < s) & (polls < MAX_POLLS):
                        seen = _flags_min(fptr)
                        polls += 1
                gl.thread_barrier()
        mbarrier.wait(bars.index(slot), (s // NB) & 1)
        if SUM1:
            acc2 = gl.zeros([R, BOX], gl.float32, layout=blk)
            for b in gl.static_range(NBOX):
                w = bufs.index(slot * NBOX + b).load(blk).to(gl.float32)
                x = gl.load(y_ptr + s * D + b * BOX + rk, cache_modifier=".cg")
                acc2 += w * gl.expand_dims(x, 0)
            acc = gl.sum(acc2, axis=1)
        else:
            acc = gl.zeros([R], gl.float32, layout=row)
            for b in gl.static_range(NBOX):
                w = bufs.index(slot * NBOX + b).load(blk).to(gl.float32)              # [R, BOX]
                x = gl.load(y_ptr + s * D + b * BOX + rk, cache_modifier=".cg")      # [BOX] fp32, L2 (not L1: other SMs wrote it)
                acc += gl.sum(w * gl.expand_dims(x, 0), axis=1)                      # [R]
        gl.store(y_ptr + (s + 1) * D + pid * R + rr, acc)
        gl.thread_barrier()  # every thread's stores and shared reads of this slot done
        if SYNC == 0:
            gl.atomic_add(cnt_ptr + s, 1, sem="release", scope="gpu")
        else:  # a release exchange on this program's own flag: no other program writes that address
            gl.atomic_xchg(cnt_ptr + pid, s + 1, sem="release", scope="gpu")
        if s + NB < S:  # the slot refilled with stage s + NB, NB stages ahead
            fence_async_shared()
            mbarrier.expect(bars.index(slot), NBOX * R * BOX * 2)
            for b in gl.static_range(NBOX):
                tma.async_copy_global_to_shared(w_desc, [(s + NB) * D + pid * R, b * BOX], bars.index(slot),
                                                bufs.index(slot * NBOX + b))
    for i in gl.static_range(NB):
        mbarrier.invalidate(bars.index(i))


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def chain(w: torch.Tensor, y: torch.Tensor, counters: torch.Tensor, S: int, D: int, R: int, NB: int,
          BOX: int = 256, num_warps: int = 4, SYNC: int = 0, SUM1: bool = False):
    """y [S + 1, D] fp32 with y[0] the input; counters [max(S, pow2(D / R))] int32, zero (flags
    past the P programs set high where SYNC > 0). Fills y[1:]; returns the compiled kernel."""
    # no swizzle: a 128-byte swizzle caps a TMA box's rows at 128 bytes (triton would cut each
    # [R, 256] box into four), and a warp reading 512 contiguous bytes of a row has no bank conflict
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    desc = TensorDescriptor.from_tensor(w, [R, BOX], layout)
    P = D // R
    return _chain_kernel[(P,)](desc, y, counters, S, P, D=D, R=R, BOX=BOX, NB=NB, SYNC=SYNC, PP=max(pow2(P), 32),
                               SUM1=SUM1, num_warps=num_warps)  # (a launch option)


def forms(D: int, sms: int) -> list:
    """The persistent forms that fit at D on sms SMs: every program resident, its NB stages in shared memory."""
    out = []
    for R, NB, SYNC, SUM1, nw, per_sm in [
            (8, 1, 0, 0, 4, 1), (8, 2, 0, 0, 4, 1), (8, 4, 0, 0, 4, 1), (8, 8, 0, 0, 4, 1),  # session 18's rows
            (16, 2, 0, 0, 4, 1), (16, 4, 0, 0, 4, 1),                                       # (NB = 1: none ahead)
            (8, 2, 1, 0, 4, 1), (16, 2, 1, 0, 4, 1), (16, 4, 1, 0, 4, 1),  # flags: is it the one polled counter?
            (8, 2, 2, 0, 4, 1), (16, 2, 2, 0, 4, 1),                       # flags, warp 0 polls
            (16, 2, 1, 1, 4, 1), (16, 2, 1, 1, 8, 1),  # one sum a stage; and 8 warps: is it the per-stage compute?
            (4, 4, 1, 1, 4, 2), (8, 2, 1, 1, 4, 2)]:  # 2 programs a SM (against R * 2, flags sum1)
        P = D // R
        if D % R or P > per_sm * sms or per_sm * NB * R * D * 2 > 200 * 1024 or (per_sm > 1 and P <= sms):
            continue
        name = f"gluon chain R={R} NB={NB}" if SYNC == 0 and per_sm == 1 else f"gluon R={R} NB={NB}"
        name += {0: "", 1: " flags", 2: " flags warp0"}[SYNC] + (" sum1" if SUM1 else "")
        name += (f" {nw}w" if nw != 4 else "") + (" 2/SM" if per_sm > 1 else "")
        out.append(dict(name=name, R=R, NB=NB, SYNC=SYNC, SUM1=bool(SUM1), warps=nw, P=P))
    return out


def _graph_time(fn, reps=20):
    """Microseconds per replay of a CUDA graph of ``fn``."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=reps) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=120)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    S, D = a.stages, a.dim
    torch.manual_seed(0)
    w = (torch.randn(S * D, D, device="cuda") / D ** 0.5).to(torch.bfloat16)  # norm-preserving on average
    y = torch.zeros(S + 1, D, device="cuda")
    y[0] = torch.randn(D, device="cuda")
    counters = torch.zeros(max(S, 1024), dtype=torch.int32, device="cuda")  # counters a stage, or flags a program
    ref = [y[0]]
    for s in range(S):
        ref.append(w[s * D:(s + 1) * D].float() @ ref[-1])
    out = {"stages": S, "dim": D, "weight_MB_per_stage": D * D * 2 / 1e6, "rows": []}
    copy = torch.empty(S * D * D // 2, dtype=torch.float32, device="cuda")
    copy_us = _graph_time(lambda: copy.copy_(w.view(torch.float32).view(-1)))
    out["copy_TBps"] = w.numel() * 2 * 2 / (copy_us * 1e-6) / 1e12
    from mhla_stream.kernels.triton_skinny import skinny_linear
    xs = [torch.randn(1, D, device="cuda", dtype=torch.bfloat16) for _ in range(S + 1)]
    ws = [w[s * D:(s + 1) * D] for s in range(S)]
    for name, op in (("skinny_linear launches (PDL)", skinny_linear), ("F.linear launches (cuBLAS)", F.linear)):
        def launches(op=op):
            x = xs[0]
            for s in range(S):
                x = op(x, ws[s])
            return x
        launches()
        torch.cuda.synchronize()
        out["rows"].append({"form": name, "us_per_stage": _graph_time(launches) / S})
    for f in forms(D, torch.cuda.get_device_properties(0).multi_processor_count):
        def run(f=f):
            counters.zero_()
            if f["SYNC"] and f["P"] < max(pow2(f["P"]), 32):
                counters[f["P"]:max(pow2(f["P"]), 32)].fill_(1 << 30)  # flags past the programs hold nothing back
            return chain(w, y, counters, S, D, f["R"], f["NB"], num_warps=f["warps"], SYNC=f["SYNC"], SUM1=f["SUM1"])
        try:  # a form that fails to compile or launch is reported, and the others still run
            k = run()
            torch.cuda.synchronize()
            err = float((y[S] - ref[S]).norm() / ref[S].norm())
            row = {"form": f["name"], "rel_err": err, "smem": k.metadata.shared, "regs": getattr(k, "n_regs", None)}
            if err < 1e-3:  # a wrong chain (a poll that gave up) is not timed
                row["us_per_stage"] = _graph_time(run) / S
            out["rows"].append(row)
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            out["rows"].append({"form": f["name"], "error": f"{type(e).__name__}: {e}"[:400]})
            print(out["rows"][-1], flush=True)
    floor = D * D * 2 / (out["copy_TBps"] * 1e12) * 1e6
    print(f"# {torch.cuda.get_device_name()}: {S} stages of [{D}, {D}] bf16 ({D * D * 2 / 1e6:.1f} MB), "
          f"copy {out['copy_TBps']:.2f} TB/s: {floor:.2f} us a stage at the copy rate")
    for r in out["rows"]:
        if "error" in r:
            print(f"{r['form']:34s} failed: {r['error']}")
            continue
        if "us_per_stage" not in r:
            print(f"{r['form']:34s} wrong: rel err {r['rel_err']:.1e}")
            continue
        print(f"{r['form']:34s} {r['us_per_stage']:7.2f} us a stage" +
              (f"   rel err {r['rel_err']:.1e}" if "rel_err" in r else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
