"""Where the persistent layer decode spends its time (GPU): per-launch times, from CUDA graphs of
24 launches, of the whole kernel and of each phase alone, of a kernel that only runs the four
barriers, and of the five-launch decode step, at the 340M shape (random weights, bf16)."""
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from mhla_stream import MHLAForCausalLM, preset_config
from mhla_stream.kernels.triton_decode_layer import _grid_barrier, _layer_kernel, layer_launch


@triton.jit
def _barriers_only(sync_ptr, G, N: tl.constexpr):
    for _ in tl.static_range(N):
        _grid_barrier(sync_ptr, G)


def per_launch(fn, n=24):
    return do_bench_cudagraph(lambda: [fn() for _ in range(n)], rep=50) * 1e3 / n  # us


def main():
    torch.manual_seed(0)
    cfg = preset_config("mhla-340m", vocab_size=32000)
    model = MHLAForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    block = model.model.layers[0]
    state = model.new_state(1)[0]
    x = torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(1, cfg.head_k_dim // 2, device="cuda")
    cos, sin = ang.cos(), ang.sin()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = {}
    with torch.inference_mode():
        for G in (sms, sms // 2):
            for w in (16, 8):
                for ahead in (True, False):
                    out, args, meta = layer_launch(x, block, state, cos, sin, G, ahead)
                    def full():
                        _layer_kernel[(G,)](*args, PHASE=0, PDL=False, **meta, num_warps=w)
                    full()
                    torch.cuda.synchronize()
                    rows[f"full G={G} warps={w} ahead={ahead}"] = per_launch(full)
                if w == 16:
                    for ph in (1, 2, 3, 4, 5):
                        def one(ph=ph):
                            _layer_kernel[(G,)](*args, PHASE=ph, PDL=False, **meta, num_warps=w)
                        rows[f"phase {ph} alone G={G} warps={w}"] = per_launch(one)
            sync = torch.zeros(2, dtype=torch.int32, device="cuda")
            for nb in (1, 4):
                rows[f"{nb} barrier(s) only G={G} warps=16"] = per_launch(
                    lambda: _barriers_only[(G,)](sync, G, N=nb, num_warps=16))
        state.pos.zero_()
        rows["five launches (decode_step)"] = per_launch(lambda: block.decode_step(x[:, None], cos, sin, state))
    for k, v in rows.items():
        print(f"{v:8.2f} us  {k}")
    out = os.environ.get("OUT", ".")
    json.dump(rows, open(os.path.join(out, "layer_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
