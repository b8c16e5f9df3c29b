"""Session 18 A/B: variants of the batched decode step (batches > 16), picked by X18 (comma list),
patched into the build before mhla-bench runs. Measurement only; the kept variant moves into
modeling.py.
    qkvg   the q/k/v/g product by the skinny product (programmatic dependent launch: the decode
           kernel starts while it runs)
    oproj  the output projection by the skinny product
    early  the decode kernel reads its state before waiting on the q/k/v/g product (state_early)
    bv32 / bv128 / nw8   the decode kernel's column block / warps
    gu     gate/up by the skinny tensor-core product with SwiGLU in its epilogue (no SwiGLU launch)
    noindpdl  the compiled elementwise kernels without programmatic dependent launch (main's
           default from session 18)
    down   down projection by the skinny product with the residual in its epilogue (no cuBLAS split-K
           reduction), then a plain norm
(TORCHINDUCTOR_ENABLE_PDL=1, an environment variable, is the other variant: the compiled
elementwise kernels launched with programmatic dependent launch.)"""
import os
import torch
import torch.nn.functional as F
import mhla_stream.modeling as m
from mhla_stream.kernels.triton_skinny import skinny_linear

X = set(filter(None, os.environ.get("X18", "").split(",")))


def batched(self, x, xn, cos, sin, state, next_norm):
    attn, mlp = self.attn, self.mlp
    B = x.shape[0]
    H, K, V = attn.num_heads, attn.head_k_dim, attn.head_v_dim
    state.check_compatible(B, H, K, V, attn.config.block_size, attn.mixing_matrix.shape[0])
    # qkvg: the skinny product, which lets the decode kernel launch early (with early: its state
    # loads overlap this product)
    qkvg = skinny_linear(xn, attn.qkvg_weight.get()) if "qkvg" in X else F.linear(xn, attn.qkvg_weight.get())
    hk, hv = H * K, H * V
    q = qkvg[:, :hk].view(B, H, K)
    k = qkvg[:, hk:2 * hk].view(B, H, K)
    v = qkvg[:, 2 * hk:2 * hk + hv].view(B, H, V)
    g = qkvg[:, 2 * hk + hv:].view(B, H, V)
    o = torch.empty(B, H, V, device=x.device, dtype=x.dtype)
    kw = {}
    if "early" in X:
        kw["state_early"] = True
    for bv in (32, 128):
        if f"bv{bv}" in X:
            kw["block_v"] = bv
    if "nw8" in X:
        kw["num_warps"] = 8
    m.decode_into(o, q, k, v, attn.mixing_matrix, state, K ** -0.5, rope=(cos, sin), **kw)
    gn = attn.g_norm_swish_gate
    o = m.gated_norm_fast(o, gn.weight, g, gn.eps)
    attn_out = (skinny_linear(o.reshape(B, hv), attn.o_proj.weight) if "oproj" in X
                else F.linear(o.reshape(B, hv), attn.o_proj.weight))
    h, hn = m.add_rms_norm_fast(x, attn_out, self.mlp_norm.weight, self.mlp_norm.eps)
    if "gu" in X:
        a = skinny_linear(hn, mlp.gate_up_weight.get(), swiglu=True)
    else:
        gate, up = F.linear(hn, mlp.gate_up_weight.get()).chunk(2, -1)
        a = m.swiglu_fast(gate, up)
    if "down" in X:
        h2 = skinny_linear(a, mlp.down_proj.weight, residual=h)
        return h2, m.rms_norm_fast(h2, next_norm.weight, next_norm.eps)
    return m.add_rms_norm_fast(h, F.linear(a, mlp.down_proj.weight), next_norm.weight, next_norm.eps)


m.MHLABlock.decode_step_batched = batched
if "noindpdl" in X:  # the compiled elementwise kernels without programmatic dependent launch
    import mhla_stream.fused as fused
    _orig = fused._compile
    fused._compile = lambda fn, options: _orig(fn, {**options, "triton.enable_pdl": False})
if __name__ == "__main__":
    print(f"# variants18: {sorted(X)} TORCHINDUCTOR_ENABLE_PDL={os.environ.get('TORCHINDUCTOR_ENABLE_PDL', '0')}",
          flush=True)
    from mhla_stream.cli.bench import main
    main()
