"""Session 20 probe (GPU): the batch-1 step's one-row product shapes chosen in the step, not alone.

The one-row tuner times each product alone, replaying one launch with its weight in L2. In the
step the products follow each other behind programmatic dependent launch: a product's programs
can load their weights before the previous product ends only if they fit on the SMs beside it,
and the tuner's picks leave no room (offline sm_90 compile, triton 3.6: q/k/v/g 107 registers x
256 threads, 2 programs an SM, 1.45 waves; gate/up 176, 1 an SM, 2.67 waves; output projection
117, 2 an SM; down 80, 3 an SM). This probe times the captured batch-1 decode step with each
product's shape forced, by coordinate descent from the tuner's picks: for each product in turn,
every candidate with the others held at the best so far. Timing only (the forced shapes compute
the same products). Prints a line per candidate and writes JSON.

    python .ci/b1_residency_probe.py --json OUT.json [--passes 2]
"""
import argparse
import json
import time

import torch
import triton

from mhla_stream import decode_tuning as tuning
from mhla_stream.cli.common import load_model
from mhla_stream.cache import MHLACache
from mhla_stream.kernels import triton_skinny as ts

# (BN, BK, num_warps, num_stages, maxnreg): the session-20 first call's candidates (hand-picked), or
# with --generated every whole-slice shape (BK = the padded row, loaded before the wait)
HAND = {
    "qkvg": [(8, 1024, 8, 3, None), (4, 1024, 2, 1, None), (4, 1024, 4, 1, None), (8, 1024, 4, 1, 128),
             (4, 1024, 8, 1, 64), (8, 512, 4, 3, None), (8, 512, 2, 3, None), (2, 1024, 4, 1, None),
             (16, 512, 8, 3, None), (8, 1024, 8, 1, 96)],
    "oproj": [(4, 1024, 8, 3, None), (4, 512, 8, 3, None), (2, 512, 8, 3, None), (8, 512, 8, 3, 96),
              (2, 1024, 8, 1, 96), (4, 1024, 8, 1, 128), (8, 1024, 8, 1, None), (4, 512, 4, 3, 96)],
    "gateup": [(8, 1024, 8, 3, None), (8, 1024, 4, 1, None), (4, 1024, 4, 1, None), (4, 1024, 2, 1, None),
               (8, 512, 4, 3, 128), (4, 512, 2, 3, 128), (16, 512, 4, 3, None), (4, 1024, 8, 1, 96),
               (8, 512, 8, 3, 96), (2, 1024, 8, 1, 64)],
    "down": [(2, 4096, 8, 1, None), (2, 1024, 4, 3, None), (2, 2048, 8, 3, None), (2, 512, 4, 3, None),
             (4, 1024, 8, 3, None), (2, 2048, 4, 3, 128), (4, 4096, 8, 1, None), (1, 4096, 4, 1, None),
             (2, 1024, 2, 3, 64)],
}
START = {"qkvg": (8, 1024, 8, 3, None), "oproj": (4, 1024, 8, 3, None), "gateup": (8, 1024, 8, 3, None),
         "down": (2, 4096, 8, 1, None)}  # the isolated tuner's picks (session 19, every process)
KP = {"qkvg": 1024, "oproj": 1024, "gateup": 1024, "down": 4096}


def generated(name):
    kp = KP[name]
    return [(bn, kp, w, 1, mr) for bn in (1, 2, 4, 8, 16) for w in (2, 4, 8) for mr in (None, 128)
            if bn * kp <= 32768 and not (mr and w == 8 and bn <= 2)]


FORCED: dict = {}


def product(kw) -> str:
    if kw.get("SWIGLU"):
        return "gateup"
    if kw.get("GATE"):
        return "oproj"
    return "qkvg" if kw.get("NORM") else "down"


def _prune(configs, named_args, **kwargs):
    name = product(kwargs)
    bn, bk, w, st, mr = FORCED[name]
    return [triton.Config({"BN": bn, "BK": bk, "SPLIT": 1}, num_warps=w, num_stages=st, maxnreg=mr)]


_TUNERS: dict = {}


def _forced_gemv(kp):
    """A tuner per row size and forced set (two configurations: with one, triton skips the pruning)."""
    key = (kp, tuple(sorted(FORCED.items())))
    if key not in _TUNERS:
        _TUNERS[key] = triton.autotune(configs=ts._GEMV[:2], key=ts._KEY, do_bench=ts.graph_bench,
                                       prune_configs_by={"early_config_prune": _prune})(ts._skinny_kernel)
    return _TUNERS[key]


def step_us(model):
    return tuning.step_us(model, 1, steps=300)


def logits_diff(model):
    """The forced picks' logits against the isolated tuner's, one step from the same state."""
    out = []
    for forced in (True, False):
        ts._gemv = _forced_gemv if forced else _ORIG_GEMV
        torch.manual_seed(1)
        cache = MHLACache(model.new_state(1, device="cuda"))
        ids = torch.randint(3, 1000, (1, 33), device="cuda")
        plan = model.make_plan(1, cuda_graphs=False)
        with torch.inference_mode():
            for t in range(ids.shape[1]):
                logits = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True, plan=plan).logits
        out.append(logits.float())
    ts._gemv = _forced_gemv
    return (out[0] - out[1]).abs().max().item()


_ORIG_GEMV = ts._gemv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--order", default="gateup,qkvg,oproj,down")
    ap.add_argument("--generated", action="store_true", help="every whole-slice shape; later passes the top 4")
    args = ap.parse_args()
    model = load_model("mhla-340m", None, True, "cuda", torch.bfloat16)
    t0 = time.time()
    base = step_us(model)  # the tuner's own picks
    picks = ts.tuned_configs()
    print(f"tuner picks: {base:.1f} us a step ({1e6 / base:.0f} tok/s)", flush=True)
    for k, v in picks.items():
        print("   ", k.split(",")[0:3], v, flush=True)
    ts._gemv = _forced_gemv  # every later step takes the forced shapes (new tuners: the old ones keep their cache)
    FORCED.update(START)
    cands = {n: (generated(n) if args.generated else HAND[n]) for n in START}
    rows = [{"forced": "tuner", "us": base}]
    best = step_us(model)
    print(f"forced = tuner's picks: {best:.1f} us", flush=True)
    rows.append({"forced": dict(FORCED), "us": best})
    for p in range(args.passes):
        for name in args.order.split(","):
            timed = {}
            for cand in cands[name]:
                FORCED[name] = cand
                try:
                    us = step_us(model)
                except Exception as e:  # a shape that does not compile or launch
                    print(f"{name} {cand}: {type(e).__name__} {str(e)[:160]}", flush=True)
                    continue
                timed[cand] = us
                rows.append({"forced": dict(FORCED), "us": us})
                print(f"[{time.time() - t0:.0f} s] pass {p} {name} {cand}: {us:.1f} us ({1e6 / us:.0f} tok/s)", flush=True)
            FORCED[name] = min(timed, key=timed.get)
            if args.generated:  # the next pass: this product's four fastest
                cands[name] = sorted(timed, key=timed.get)[:4]
            print(f"  best {name}: {FORCED[name]} {timed[FORCED[name]]:.1f} us", flush=True)
            save(args.json, rows, base, picks)  # (a call cut by its time limit keeps what it measured)
    final = step_us(model)
    diff = logits_diff(model)
    print(f"logits of the picks against the tuner's, same state and token: max abs diff {diff:.3g}", flush=True)
    print(f"final {FORCED}: {final:.1f} us ({1e6 / final:.0f} tok/s); tuner {base:.1f}", flush=True)
    rows.append({"forced": dict(FORCED), "us": final, "final": True, "logits_max_abs_diff": diff})
    save(args.json, rows, base, picks)


def save(path, rows, base, picks):
    json.dump({"device": torch.cuda.get_device_name(), "rows": [dict(r, forced=str(r["forced"])) for r in rows],
               "best": {k: list(v) for k, v in FORCED.items()}, "tuner_us": base, "tuner_picks": picks},
              open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
