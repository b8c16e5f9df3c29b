"""GPU diagnostic: stateless and stateful Triton prefill against the definition (the sweep's
T=5000 window case failed with rel err 1.0 and a with-state case hit an illegal memory access on
2026-11-23, session 4). Usage: gpu_diag_prefill.py T POLICY DTYPE [onecfg] [state]"""
import sys
import torch
sys.path.insert(0, "tests")
from conftest import rand_qkv, rel_err  # noqa: E402
from mhla_stream import mhla_attention, mhla_reference  # noqa: E402
from mhla_stream.kernels import triton_chunk as tc  # noqa: E402

T, policy, dt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
flags = sys.argv[4:]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
kerns = [tc._summary_kernel, tc._mix_kernel, tc._output_kernel]
if "onecfg" in flags:
    for kern in kerns:
        kern.configs = kern.configs[:1]
for f in flags:  # force=KERNEL:CONFIG (indexes into kerns and the tuning list); the others take config 0
    if f.startswith("force="):
        ki, ci = map(int, f[6:].split(":"))
        for j, kern in enumerate(kerns):
            kern.configs = [kern.configs[ci if j == ki else 0]]
H, K, V, L, C = 4, 128, 256, 32, 64
q, k, v, m = rand_qkv(2, T, H, K, V, L, dtype=dtype, seed=T, device="cuda")
ref = mhla_reference(q, k, v, m, block_size=C, policy=policy)
errs = []
for rep in range(2):
    if "state" in flags:
        cut = C // 2 + 3
        o1, st = mhla_attention(q[:, :cut], k[:, :cut], v[:, :cut], m, block_size=C, backend="triton", policy=policy,
                                return_state=True)
        o2 = mhla_attention(q[:, cut:], k[:, cut:], v[:, cut:], m, block_size=C, backend="triton", policy=policy,
                            state=st)
        out = torch.cat([o1, o2], 1)
    else:
        out = mhla_attention(q, k, v, m, block_size=C, backend="triton", policy=policy)
    torch.cuda.synchronize()
    errs.append(rel_err(out, ref))
tok = (out.double() - ref).flatten(2).norm(dim=2).norm(dim=0) / ref.flatten(2).norm(dim=2).norm(dim=0).clamp_min(1e-30)
bad = (tok > 1e-2).nonzero()
print(f"T={T} {policy} {dt} {flags}: rel_err {errs[0]:.3g} / {errs[1]:.3g}  |out| {float(out.float().norm()):.4g} "
      f"|ref| {float(ref.norm()):.4g}  first bad token {int(bad[0]) if len(bad) else -1} ({len(bad)} bad)  "
      f"configs {[str(c) for kern in kerns for c in getattr(kern, 'cache', {}).values()]}", flush=True)
