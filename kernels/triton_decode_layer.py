"""Batch-1 decode of a whole model layer in one persistent launch.

At batch 1 a layer's five decode launches (``MHLABlock.decode_step``) each read a few MB of
weights, and each spends about as long starting and draining as transferring: the step ran at a
third of the weight-bandwidth floor. Here one program per SM runs the layer's five phases,
separated by grid-wide barriers (a counter and a generation word in global memory):

    1  qkvg = RMSNorm(x) W_qkvg^T                       rows split evenly over the programs
    2  o    = MHLA decode(relu+RoPE(q), relu+RoPE(k), v) ``triton_decode.decode_columns``
    3  h    = x + (RMSNorm_V(o) * silu(g)) W_o^T
    4  a    = silu(RMSNorm(h) W_gate^T) * (RMSNorm(h) W_up^T)
    5  out  = h + a W_down^T

A program's weight rows do not depend on the data, so it loads them ahead (phase 1's and 3's at
the start, before waiting for the previous launch; phase 4's right after phase 1; phase 5's
before barrier 3): weights stream while the grid synchronises, instead of after each kernel boundary.
Each program holds whole rows ([BN, K] tiles, K up to KP), so the row sums are formed in one
place, in fp32, and rounded like the five-launch path (every value the eager model stores in
the activation dtype is rounded to it here too).

The barriers need every program resident at once: the grid is at most one program per SM, and
16 warps a program cap its registers at what one SM holds. Under the interpreter (programs run
one after another) ``PHASE`` = 1..5 runs one phase per launch instead, with no barriers: the
same code, so the CPU tests check every phase's arithmetic.
"""
import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, PDL, pow2
from .triton_decode import decode_columns

F32: tl.constexpr = tl.float32


@triton.jit
def _grid_barrier(sync_ptr, G):
    """All G programs arrive before any leaves. sync = [arrived, generation]: the last to arrive
    resets the count and moves the generation on; the others wait for it to move."""
    tl.debug_barrier()  # every thread's stores are issued before this program arrives
    gen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
    if tl.atomic_add(sync_ptr, 1, sem="acq_rel") == G - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
        tl.atomic_add(sync_ptr + 1, 1, sem="release")
    else:
        while tl.atomic_add(sync_ptr + 1, 0, sem="acquire") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _rows(p, RPP, N, BN: tl.constexpr):
    """The rows of program ``p`` in a phase of N rows dealt RPP a program."""
    rn = p * RPP + tl.arange(0, BN)
    return rn, (rn < p * RPP + RPP) & (rn < N)


@triton.jit
def _tile(w_ptr, rn, mn, K, KP: tl.constexpr):
    ck = tl.arange(0, KP)
    return tl.load(w_ptr + rn[:, None] * K + ck[None, :], mask=mn[:, None] & (ck < K)[None, :], other=0.0)  # [BN, KP]


@triton.jit
def _prologue(x_ptr, K, nw_ptr, GS, eps, g_ptr, NORM: tl.constexpr, NG: tl.constexpr, GATE: tl.constexpr,
              DT: tl.constexpr, KP: tl.constexpr):
    """The product's input row [KP] in fp32: RMSNorm per group of GS columns (NG groups) times the
    norm weight, then times silu(g); each rounded to DT as the model stores it."""
    ck = tl.arange(0, KP)
    mk = ck < K
    x = tl.load(x_ptr + ck, mask=mk, other=0.0, cache_modifier=".cg").to(F32)              # [KP]
    if NORM:
        grp = ck // GS
        rstd = tl.zeros([KP], dtype=F32)
        for gi in tl.static_range(NG):
            sel = (grp == gi) & mk
            ss = tl.sum(tl.where(sel, x * x, 0.0), axis=0)
            rstd = tl.where(sel, tl.rsqrt(ss / GS + eps), rstd)
        nw = tl.load(nw_ptr + ck % GS, mask=mk, other=0.0).to(F32)
        x = (x * rstd * nw).to(DT).to(F32)
    if GATE:
        g = tl.load(g_ptr + ck, mask=mk, other=0.0, cache_modifier=".cg").to(F32)
        x = (x * (g * tl.sigmoid(g))).to(DT).to(F32)
    return x


@triton.jit
def _finish(acc, rn, mn, y_ptr, res_ptr, RESIDUAL: tl.constexpr, DT: tl.constexpr):
    y = acc.to(DT).to(F32)
    if RESIDUAL:
        y += tl.load(res_ptr + rn, mask=mn, other=0.0, cache_modifier=".cg").to(F32)
    tl.store(y_ptr + rn, y.to(DT), mask=mn)


@triton.jit
def _layer_kernel(x_ptr, out_ptr, qkvg_ptr, o_ptr, h_ptr, a_ptr,
                  n1_ptr, wqkvg_ptr, gn_ptr, wo_ptr, n2_ptr, wgu_ptr, wd_ptr,
                  r_ptr, p_ptr, ring_ptr, far_ptr, pos_ptr, m_ptr, cos_ptr, sin_ptr, sync_ptr,
                  L, C, W, scale, eps1, eps_g, eps2, G, RPP1, RPP3, RPP4, RPP5,
                  D: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, I: tl.constexpr,
                  FAR: tl.constexpr, ROUND: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr, AHEAD: tl.constexpr,
                  BD: tl.constexpr, BHV: tl.constexpr, BI: tl.constexpr,
                  BN1: tl.constexpr, BN3: tl.constexpr, BN4: tl.constexpr, BN5: tl.constexpr,
                  BK2: tl.constexpr, BV: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    ALL: tl.constexpr = PHASE == 0
    HK: tl.constexpr = H * K
    HV: tl.constexpr = H * V
    N1: tl.constexpr = 2 * HK + 2 * HV
    pid = tl.program_id(0)
    # weights of phases 1 and 3, requested before waiting for the previous launch's output
    rn1, mn1 = _rows(pid, RPP1, N1, BN1)
    rn3, mn3 = _rows(pid, RPP3, D, BN3)
    if ALL or PHASE == 1:
        w1 = _tile(wqkvg_ptr, rn1, mn1, D, BD)                                                 # [BN1, BD]
    if ALL or PHASE == 3:
        w3 = _tile(wo_ptr, rn3, mn3, HV, BHV)                                                  # [BN3, BHV]
    if PDL:
        tl.extra.cuda.gdc_wait()

    if ALL or PHASE == 1:  # qkvg = RMSNorm(x) W_qkvg^T
        x = _prologue(x_ptr, D, n1_ptr, D, eps1, x_ptr, True, 1, False, DT, BD)               # [BD]
        acc = tl.sum(w1.to(F32) * x[None, :], axis=1)                                          # [BN1]
        _finish(acc, rn1, mn1, qkvg_ptr, x_ptr, False, DT)
    rn4, mn4 = _rows(pid, RPP4, I, BN4)
    if (ALL and AHEAD) or PHASE == 4:  # gate/up rows stream in during phases 2 and 3
        w4g = _tile(wgu_ptr, rn4, mn4, D, BD)                                                  # [BN4, BD]
        w4u = _tile(wgu_ptr + I * D, rn4, mn4, D, BD)
    if ALL:
        _grid_barrier(sync_ptr, G)

    if ALL or PHASE == 2:  # o = MHLA decode of this token, block close included
        NVB: tl.constexpr = (V + BV - 1) // BV
        for u in range(pid, H * NVB, G):
            decode_columns(qkvg_ptr, qkvg_ptr + HK, qkvg_ptr + 2 * HK, o_ptr, r_ptr, p_ptr, ring_ptr, far_ptr,
                           pos_ptr, m_ptr, cos_ptr, sin_ptr, L, C, W, scale, 0, K, 0, V, 0, V, 0,
                           u // NVB, u % NVB, H, K, V, True, FAR, ROUND, False, BK2, BV)
    if ALL:
        _grid_barrier(sync_ptr, G)

    if ALL or PHASE == 3:  # h = x + (RMSNorm_V(o) * silu(g)) W_o^T
        xo = _prologue(o_ptr, HV, gn_ptr, V, eps_g, qkvg_ptr + 2 * HK + HV, True, H, True, DT, BHV)  # [BHV]
        acc = tl.sum(w3.to(F32) * xo[None, :], axis=1)                                         # [BN3]
        _finish(acc, rn3, mn3, h_ptr, x_ptr, True, DT)
    rn5, mn5 = _rows(pid, RPP5, D, BN5)
    if (ALL and AHEAD) or PHASE == 5:  # down rows stream in during barrier 3 and phase 4
        w5 = _tile(wd_ptr, rn5, mn5, I, BI)                                                    # [BN5, BI]
    if ALL:
        _grid_barrier(sync_ptr, G)
    if ALL and not AHEAD:
        w4g = _tile(wgu_ptr, rn4, mn4, D, BD)
        w4u = _tile(wgu_ptr + I * D, rn4, mn4, D, BD)

    if ALL or PHASE == 4:  # a = silu(RMSNorm(h) W_gate^T) * (RMSNorm(h) W_up^T)
        xh = _prologue(h_ptr, D, n2_ptr, D, eps2, h_ptr, True, 1, False, DT, BD)              # [BD]
        yg = tl.sum(w4g.to(F32) * xh[None, :], axis=1).to(DT).to(F32)                         # [BN4]
        yu = tl.sum(w4u.to(F32) * xh[None, :], axis=1).to(DT).to(F32)
        tl.store(a_ptr + rn4, (yg * tl.sigmoid(yg) * yu).to(DT), mask=mn4)
    if ALL:
        _grid_barrier(sync_ptr, G)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # every program is past its last barrier
    if ALL and not AHEAD:
        w5 = _tile(wd_ptr, rn5, mn5, I, BI)

    if ALL or PHASE == 5:  # out = h + a W_down^T
        xa = _prologue(a_ptr, I, a_ptr, I, 0.0, a_ptr, False, 1, False, DT, BI)                # [BI]
        acc = tl.sum(w5.to(F32) * xa[None, :], axis=1)                                         # [BN5]
        _finish(acc, rn5, mn5, out_ptr, h_ptr, True, DT)


_SYNC: dict = {}


def _programs(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def layer_launch(x, block, state, cos, sin, programs, ahead=True):
    """(out, args, meta) of one ``_layer_kernel`` launch over ``programs`` programs."""
    attn, mlp = block.attn, block.mlp
    H, K, V = attn.num_heads, attn.head_k_dim, attn.head_v_dim
    D, I = x.shape[-1], mlp.down_proj.weight.shape[1]
    assert x.shape[0] == 1 and state.batch_size == 1
    dev, dt = x.device, x.dtype
    gn = attn.g_norm_swish_gate
    qkvg = torch.empty(2 * H * K + 2 * H * V, device=dev, dtype=dt)
    o = torch.empty(H * V, device=dev, dtype=dt)
    h, a, out = torch.empty(D, device=dev, dtype=dt), torch.empty(I, device=dev, dtype=dt), torch.empty_like(x)
    sync = getattr(state, "_grid_sync", None)  # per state: two streams never share a barrier
    if sync is None or sync.device != dev:
        sync = state._grid_sync = torch.zeros(2, dtype=torch.int32, device=dev)
    G = programs
    rpp = lambda n: triton.cdiv(n, G)  # noqa: E731
    N1 = 2 * H * K + 2 * H * V
    args = (x, out, qkvg, o, h, a, block.attn_norm.weight, attn.qkvg_weight.get(), gn.weight, attn.o_proj.weight,
            block.mlp_norm.weight, mlp.gate_up_weight.get(), mlp.down_proj.weight,
            state.partial, state.prefix, state.ring, state.far, state.pos, attn.mixing_matrix, cos, sin, sync,
            attn.mixing_matrix.shape[0], state.block_size, state.window, K ** -0.5,
            block.attn_norm.eps, gn.eps, block.mlp_norm.eps, G, rpp(N1), rpp(D), rpp(I), rpp(D))
    meta = dict(AHEAD=ahead, D=D, H=H, K=K, V=V, I=I, FAR=state.far.numel() > 0, ROUND=state.ring.dtype == torch.bfloat16,
                BD=pow2(D, 1), BHV=pow2(H * V, 1), BI=pow2(I, 1), BN1=pow2(rpp(N1), 1), BN3=pow2(rpp(D), 1),
                BN4=pow2(rpp(I), 1), BN5=pow2(rpp(D), 1), BK2=pow2((K + 1) // 2),
                BV=max(4, pow2(triton.cdiv(H * V, G), 1)))
    return out, args, meta


def decode_layer(x, block, state, cos, sin, phases=None, programs=None, num_warps=16):
    """One decode token through ``block`` (an ``MHLABlock``) for a batch-1 ``state``: x [1, D] ->
    out [1, D]; the state is advanced except its position (as ``MHLABlock.decode_step``).
    ``phases`` (tests, and always under the interpreter): run phases 1..5 as separate launches
    of ``programs`` programs, no barriers. Default: one launch of one program per SM."""
    if INTERPRET and phases is None:
        phases = (1, 2, 3, 4, 5)
    if phases is None:
        out, args, meta = layer_launch(x, block, state, cos, sin, programs or _programs(x.device))
        _layer_kernel[(args[29],)](*args, PHASE=0, PDL=PDL, **meta, num_warps=num_warps, launch_pdl=PDL)
    else:
        out, args, meta = layer_launch(x, block, state, cos, sin, programs or 4)
        for phase in phases:
            _layer_kernel[(args[29],)](*args, PHASE=phase, PDL=False, **meta, num_warps=4)
    return out
