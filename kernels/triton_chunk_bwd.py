"""Backward of the stateless chunk form (training), and the custom ops (torch.library) that pair it
with the Triton prefill (``triton_chunk.chunk_prefill``) as its forward. SPEC section 1.

Training calls: no incoming state, every sequence starts at position 0, right padding through
``lengths``; any T and both policies (the mixing below uses the dense ``M_ext`` of the blocks
touched, so blocks past the trained L follow ``mixing.coefficient`` exactly).

Forward, per (sequence, head), block i of C rows (Q_i, K_i [C, K], V_i, O_i [C, V]), d_i = M_ext[i, i]:

    S_j = K_j^T V_j                         [K, V]   block summary
    P_i = sum_{j<i} M_ext[i, j] S_j         [K, V]   mixed prefix
    A_i = (Q_i K_i^T o causal) V_i          [C, V]   intra-block attention
    O_i = s (Q_i P_i + d_i A_i)

Backward, given dO_i (o: elementwise product, causal: lower triangle with its diagonal):

    dP_i   = s Q_i^T dO_i                                              [K, V]
    G[i,j] = <dP_i, S_j>  (j < i);   G[i,i] = s <dO_i, A_i>            dL/dM_ext, summed over b, h
    dS_j   = sum_{i>j} M_ext[i, j] dP_i                                the transposed mixing
    D_i    = dO_i V_i^T o causal                                       [C, C]
    dQ_i   = s dO_i P_i^T + s d_i D_i K_i
    dK_i   = V_i dS_i^T   + s d_i D_i^T Q_i
    dV_i   = K_i dS_i     + s d_i (Q_i K_i^T o causal)^T dO_i
    dM     = d M_ext / d M  applied to G: autograd of ``coefficient(prepare_mixing(M))``, so the
             clamp's pass-through region, the causal triangle and the policy's index map are
             exactly those of the torch form.

Three steps: (1) a kernel writes S_j and dP_i for every block; (2) torch GEMMs over the block
axis give P = tril(M_ext, -1) S, dS = tril(M_ext, -1)^T dP and G = dP S^T (one [NB, NB] x
[NB, B*H*K*V] product each: cuBLAS, and the reverse mixing is just the transposed matrix);
(3) a kernel per (block, sequence, head) forms dQ, dK, dV and the diagonal of G.

Memory: nothing but q, k, v and M is saved by the forward. S and P are recomputed here rather
than saved, because fp32 per-block tensors ([NB, B*H, K, V], 134 MB a layer at the 340M shape,
batch 8) kept for 24 layers would cost 3+ GiB each; the recompute is one extra K^T V per block.
The fp32 buffers of the backward (S, dP, P, dS) live only during one layer's backward.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..mixing import coefficient, has_far, prepare_mixing
from .triton_chunk import chunk_prefill
from .triton_common import INTERPRET, pow2

_WARPS = 4 if INTERPRET else 8


@triton.jit
def _rows(n_ptr, b, m, C, BT: tl.constexpr):
    # token rows of block m of sequence b: [BT] indices and their mask (the sequence's n tokens)
    c = tl.arange(0, BT)
    t = m * C + c
    return t, (c < C) & (t < tl.load(n_ptr + b))


@triton.jit
def _summary_grad_kernel(q_ptr, k_ptr, v_ptr, do_ptr, s_ptr, dp_ptr, n_ptr, C, BH, scale,
                         sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sd_b, sd_t, sd_h,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """S_m = K_m^T V_m and dP_m = s Q_m^T dO_m for block m, into [NB, B*H, K, V] fp32."""
    m, bh, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    t, mt = _rows(n_ptr, b, m, C, BT)                                                        # [BT]
    ok, ov = tl.arange(0, BK), pv * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    qt = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h * sq_h + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    kt = tl.load(k_ptr + b * sk_b + t[:, None] * sk_t + h * sk_h + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    vt = tl.load(v_ptr + b * sv_b + t[:, None] * sv_t + h * sv_h + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    dot_ = tl.load(do_ptr + b * sd_b + t[:, None] * sd_t + h * sd_h + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    # qt, kt [BT, BK]; vt, dot_ [BT, BV]
    s = tl.dot(tl.trans(kt.to(DOT)), vt.to(DOT), input_precision=PREC)                      # [BK, BV] fp32
    dp = tl.dot(tl.trans(qt.to(DOT)), dot_.to(DOT), input_precision=PREC) * scale           # [BK, BV] fp32
    tile = ((m * BH + bh) * K + ok[:, None]) * V + ov[None, :]
    mtile = mk[:, None] & mv[None, :]
    tl.store(s_ptr + tile, s, mask=mtile)
    tl.store(dp_ptr + tile, dp, mask=mtile)


@triton.jit
def _qkv_grad_kernel(q_ptr, k_ptr, v_ptr, do_ptr, p_ptr, ds_ptr, diag_ptr, dq_ptr, dk_ptr, dv_ptr, g_ptr, n_ptr,
                     T, C, BH, scale, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sd_b, sd_t, sd_h,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """dQ, dK, dV of block m (formulas in the module docstring) and G[m, m] of this (b, h).
    dq, dk, dv are contiguous [B, T, H, K or V] in the input dtype; V is walked in BV columns."""
    m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t, mt = _rows(n_ptr, b, m, C, BT)                                                        # [BT]
    c = tl.arange(0, BT)
    causal = c[:, None] >= c[None, :]                                                        # [BT, BT]
    ok = tl.arange(0, BK)
    mk = ok < K
    qt = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h * sq_h + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    kt = tl.load(k_ptr + b * sk_b + t[:, None] * sk_t + h * sk_h + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
    qt, kt = qt.to(DOT), kt.to(DOT)                                                          # [BT, BK]
    d = tl.load(diag_ptr + m)                                                                # M_ext[m, m] fp32
    scores = tl.where(causal, tl.dot(qt, tl.trans(kt), input_precision=PREC), 0.0)          # [BT, BT] fp32
    dq = tl.zeros((BT, BK), dtype=tl.float32)                                                # dO P^T
    dk = tl.zeros((BT, BK), dtype=tl.float32)                                                # V dS^T
    dov = tl.zeros((BT, BT), dtype=tl.float32)                                               # dO V^T
    for v0 in range(0, V, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < V
        rows_v = mt[:, None] & mv[None, :]
        vt = tl.load(v_ptr + b * sv_b + t[:, None] * sv_t + h * sv_h + ov[None, :], mask=rows_v, other=0.0).to(DOT)
        dot_ = tl.load(do_ptr + b * sd_b + t[:, None] * sd_t + h * sd_h + ov[None, :], mask=rows_v, other=0.0).to(DOT)
        tile = ((m * BH + bh) * K + ok[:, None]) * V + ov[None, :]
        mtile = mk[:, None] & mv[None, :]
        pt = tl.load(p_ptr + tile, mask=mtile, other=0.0).to(DOT)                            # [BK, BV]
        dst = tl.load(ds_ptr + tile, mask=mtile, other=0.0).to(DOT)                          # [BK, BV]
        dq += tl.dot(dot_, tl.trans(pt), input_precision=PREC)
        dk += tl.dot(vt, tl.trans(dst), input_precision=PREC)
        dov += tl.dot(dot_, tl.trans(vt), input_precision=PREC)
        dv = tl.dot(kt, dst, input_precision=PREC) \
            + (scale * d) * tl.dot(tl.trans(scores.to(DOT)), dot_, input_precision=PREC)   # [BT, BV]
        tl.store(dv_ptr + ((b * T + t[:, None]) * H + h) * V + ov[None, :], dv.to(dv_ptr.dtype.element_ty), mask=rows_v)
    dov = tl.where(causal, dov, 0.0)
    tl.store(g_ptr + m * BH + bh, scale * tl.sum(tl.sum(scores * dov, 1), 0))
    dq = scale * dq + (scale * d) * tl.dot(dov.to(DOT), kt, input_precision=PREC)          # [BT, BK]
    dk = dk + (scale * d) * tl.dot(tl.trans(dov.to(DOT)), qt, input_precision=PREC)        # [BT, BK]
    rows_k = mt[:, None] & mk[None, :]
    tl.store(dq_ptr + ((b * T + t[:, None]) * H + h) * K + ok[None, :], dq.to(dq_ptr.dtype.element_ty), mask=rows_k)
    tl.store(dk_ptr + ((b * T + t[:, None]) * H + h) * K + ok[None, :], dk.to(dk_ptr.dtype.element_ty), mask=rows_k)


# --------------------------------------------------------------------------------------------
# Launcher: the three steps of the backward
# --------------------------------------------------------------------------------------------
def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def dense_mixing(raw_mixing, num_blocks: int, policy: str):
    """``M_ext`` [NB, NB] fp32 of the first blocks as a differentiable function of the raw parameter:
    the torch form's ``coefficient(prepare_mixing(M))``, so dM follows its clamp, tril and index map."""
    idx = torch.arange(num_blocks, device=raw_mixing.device)
    return coefficient(prepare_mixing(raw_mixing), idx[:, None], idx[None, :], policy)


def chunk_backward(q, k, v, do, m_ext, scale: float, C: int, lengths=None, mixing_grad=True):
    """Gradients of ``chunk_prefill`` without a state: ``(dq, dk, dv, dM_ext or None)``.
    q, k [B, T, H, K]; v, do [B, T, H, V]; ``m_ext`` [NB, NB] fp32: ``dense_mixing`` of the raw
    parameter the forward read (its gradient reaches the parameter through autograd of that map)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    NB, BH, dev = triton.cdiv(T, C), B * H, q.device
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    # dense: the kernels read sequence b's length at offset b (a strided [B] view would be read wrong)
    n = (lengths if lengths is not None else torch.full((B,), T, device=dev)).to(device=dev, dtype=torch.int32)
    n = n.contiguous()
    f32 = q.dtype == torch.float32
    prec = "ieee" if f32 else "tf32"
    dot_dtype = tl.float32 if (f32 or INTERPRET) else (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16)
    BT, BK, BV = pow2(C), pow2(K), min(pow2(V), 64)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))

    # (1) S_j and dP_i for every block: [NB, B*H, K, V] fp32
    S = torch.empty(NB, BH, K, V, device=dev, dtype=torch.float32)
    dP = torch.empty_like(S)
    _summary_grad_kernel[(NB, BH, triton.cdiv(V, BV))](
        q, k, v, do, S, dP, n, C, BH, scale, *strides, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=dot_dtype, PREC=prec,
        num_warps=4)

    # (2) the mixing and its transpose, and G off the diagonal, as GEMMs over the block axis
    strict = m_ext.tril(-1)                                                      # [NB, NB]
    diag = m_ext.diagonal().contiguous()
    with torch.autocast(dev.type, enabled=False):
        s2, dp2 = S.view(NB, -1), dP.view(NB, -1)
        P = (strict @ s2).view_as(S)                                             # P_i = sum_{j<i} M_ij S_j
        g = (dp2 @ s2.T).tril(-1) if mixing_grad else None                       # G[i, j] = <dP_i, S_j>
        del S, s2
        dS = (strict.T @ dp2).view_as(dP)                                        # dS_j = sum_{i>j} M_ij dP_i
        del dP, dp2

    # (3) dQ, dK, dV and G[i, i]
    alloc = torch.zeros if lengths is not None else torch.empty                # padded rows get no gradient
    dq, dk = alloc(B, T, H, K, device=dev, dtype=q.dtype), alloc(B, T, H, K, device=dev, dtype=q.dtype)
    dv = alloc(B, T, H, V, device=dev, dtype=v.dtype)
    g_diag = torch.empty(NB, BH, device=dev, dtype=torch.float32)
    _qkv_grad_kernel[(NB, BH)](
        q, k, v, do, P, dS, diag, dq, dk, dv, g_diag, n, T, C, BH, scale, *strides, H=H, K=K, V=V, BT=BT, BK=BK,
        BV=BV, DOT=dot_dtype, PREC=prec, num_warps=_WARPS,
        num_stages=1)  # unpipelined V walk (4 steps at V = 256): pipelined, the tiles need 254 KB of shared memory on an H100
    del P, dS
    return dq, dk, dv, (g + torch.diag(g_diag.sum(1)) if mixing_grad else None)


# --------------------------------------------------------------------------------------------
# Autograd: the Triton prefill forward (nothing saved but the inputs), the backward above.
# Both are torch.library custom ops, so torch.compile keeps a training step in one graph around them
# (as an autograd.Function they broke the graph at every layer, forward and backward: the compiled
# 340M step ran 114 ms of kernels in 175 ms of wall time on an H100, the host the limit; 2026-11-24).
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("mhla_stream::chunk_forward", mutates_args=())
def _chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, raw_mixing: torch.Tensor, m_ext: torch.Tensor,
                   scale: float, block_size: int, policy: str, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    return chunk_prefill(q, k, v, raw_mixing, scale, block_size, has_far(policy), None, lengths)


@_chunk_forward.register_fake
def _(q, k, v, raw_mixing, m_ext, scale, block_size, policy, lengths):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1])


@torch.library.custom_op("mhla_stream::chunk_backward", mutates_args=())
def _chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, m_ext: torch.Tensor,
                    scale: float, block_size: int, lengths: Optional[torch.Tensor],
                    mixing_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dm = chunk_backward(q, k, v, do, m_ext, scale, block_size, lengths, mixing_grad=mixing_grad)
    return dq, dk, dv, (dm if dm is not None else torch.zeros_like(m_ext))  # an op returns tensors only


@_chunk_backward.register_fake
def _(q, k, v, do, m_ext, scale, block_size, lengths, mixing_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(m_ext)


def _save_inputs(ctx, inputs, output):
    q, k, v, _, m_ext, scale, block_size, _, lengths = inputs
    ctx.save_for_backward(q, k, v, m_ext, lengths)
    ctx.scale, ctx.block_size = scale, block_size


def _forward_grad(ctx, do):
    q, k, v, m_ext, lengths = ctx.saved_tensors
    mixing_grad = ctx.needs_input_grad[4]
    dq, dk, dv, dm = _chunk_backward(q, k, v, do, m_ext, ctx.scale, ctx.block_size, lengths, mixing_grad)
    return dq, dk, dv, None, (dm if mixing_grad else None), None, None, None, None


def _no_second_order(ctx, *grads):
    # the kernels record no graph: a gradient of the gradient would silently be 0
    raise RuntimeError("the Triton backward of mhla_attention records no graph: cannot differentiate twice "
                       "through it (backend='torch' gives second-order gradients)")


_chunk_forward.register_autograd(_forward_grad, setup_context=_save_inputs)
_chunk_backward.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)


def chunk_trainable(q, k, v, raw_mixing, scale: float, block_size: int, policy: str, lengths=None):
    """The stateless chunk form with gradients for q, k, v and the raw [L, L] mixing parameter
    (``mhla_attention`` validated the inputs). Rows past ``lengths`` give 0 and get no gradient.
    The forward kernels read the raw parameter (they clamp on load); its gradient goes through the
    dense [NB, NB] map of the blocks touched (torch ops: clamp, tril, index map), built here."""
    m_ext = dense_mixing(raw_mixing, triton.cdiv(q.shape[1], block_size), policy)
    return _chunk_forward(q, k, v, raw_mixing.detach(), m_ext, float(scale), int(block_size), policy, lengths)
