"""Session 19 A/B (timing only, wrong logits): where batch-1 decode loses against a plain chain of
products. A chain of 120 launches of the one-row product over [1024, 1024] weights from HBM takes
1.99 us a launch, [2048, 2048] 3.43 us (`.ci/gluon_stage_probe.py`, H100): fitted, 1.5 us + 0.23
us a MB, so the layer's four products would take about 12 us and the decode kernel about 2.5;
the step takes 23 us a layer. Each X19 flag (comma list) removes one piece of work the step folds
into its batch-1 launches, so the difference in tokens/s prices that piece in the real chain:
    nonorm   the RMSNorm prologues of the q/k/v/g and gate/up products
    nogate   the output projection's gated head norm prologue
    nores    the residual epilogues of the output and down projections
    nodecode the decode kernel (o left as it is)
    noswiglu gate/up as a plain product of 2N rows (the next product reads its first N columns)
Runs mhla-bench with the patched batch-1 step (``MHLABlock.decode_step``, the one-row branch)."""
import os

import torch

import mhla_stream.modeling as m
from mhla_stream.kernels.triton_skinny import skinny_linear

X = set(filter(None, os.environ.get("X19", "").split(",")))
_orig = m.MHLABlock.decode_step


def one_row(self, x, cos, sin, state, stats=None):
    if x.shape[0] != 1:
        return _orig(self, x, cos, sin, state, stats)
    attn, mlp = self.attn, self.mlp
    H, K, V = attn.num_heads, attn.head_k_dim, attn.head_v_dim
    x2 = x.reshape(1, -1)
    hk, hv = H * K, H * V
    norm = {} if "nonorm" in X else {"norm_weight": self.attn_norm.weight, "eps": self.attn_norm.eps}
    qkvg = skinny_linear(x2, attn.qkvg_weight.get(), **norm)
    q = qkvg[:, :hk].view(1, H, K)
    k = qkvg[:, hk:2 * hk].view(1, H, K)
    v = qkvg[:, 2 * hk:2 * hk + hv].view(1, H, V)
    g = qkvg[:, 2 * hk + hv:]
    o = torch.empty(1, H, V, device=x.device, dtype=x.dtype)
    gn = attn.g_norm_swish_gate
    if "nodecode" not in X:
        m.decode_into(o, q, k, v, attn.mixing_matrix, state, K ** -0.5, rope=(cos, sin), state_early=True)
    gate = {} if "nogate" in X else {"norm_weight": gn.weight, "group": V, "eps": gn.eps, "gate": g}
    res = (lambda r: {}) if "nores" in X else (lambda r: {"residual": r})
    h = skinny_linear(o.view(1, hv), attn.o_proj.weight, **gate, **res(x2))
    norm = {} if "nonorm" in X else {"norm_weight": self.mlp_norm.weight, "eps": self.mlp_norm.eps}
    if "noswiglu" in X:
        a = skinny_linear(h, mlp.gate_up_weight.get(), **norm)[:, :mlp.down_proj.in_features]  # a view: rows of 2N
    else:
        a = skinny_linear(h, mlp.gate_up_weight.get(), swiglu=True, **norm)
    return skinny_linear(a, mlp.down_proj.weight, **res(h)).view(1, 1, -1), None


m.MHLABlock.decode_step = one_row
if __name__ == "__main__":
    print(f"# variants19: {sorted(X)}", flush=True)
    from mhla_stream.cli.bench import main
    main()
