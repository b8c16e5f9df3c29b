#!/usr/bin/env bash
# Training throughput of the 340M shape on 1 GPU and on 2 GPUs (DDP, torchrun), then a short real
# training on 2 GPUs; writes $OUT/train_ddp.json and $OUT/loss_curve.png. One command, < 9 minutes
# on 2x H200:   bash .ci/gpu_train_ddp.sh          (CPU check of the plumbing: --smoke)
#
# Throughput runs use synthetic tokens with the Llama-2-sized vocabulary (32,000: the paper's exact
# shape). The training run uses $DATA (default runs/data, from prepare_data) if it holds token
# files; else it prepares them from the shared texts (shared/data or ../shared/data) within $PREP_S
# seconds; else it trains on the synthetic tokens (the curve then only shows that training runs).
# Knobs: BENCH_STEPS (40), TRAIN_MIN (3), EXTRA=1 adds activation-checkpointing and compile runs,
# PLAIN_LOSS=0 skips the unfused-loss run, SKIP_TRAIN=1 the training run (throughput only).
# The MHLA operator trains with its Triton forward + backward (--attn-backend auto on CUDA);
# bench_1gpu_torch_op is the same run with the torch chunk form (TORCH_OP=0 skips it).
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
OUT=${OUT:-/tmp/gpu_train_ddp}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/train_ddp.XXXX)
PY=${PYTHON:-python3}
SMOKE=0; [ "${1:-}" = "--smoke" ] && SMOKE=1
if [ $SMOKE = 1 ]; then
  PRESET=mhla-tiny; BATCH=4; BENCH_STEPS=${BENCH_STEPS:-6}; TRAIN="--steps 30"; DEV="--device cpu"; NPROC=2
  LOG_EVERY=2; EVAL_EVERY=10; EVAL_WINDOWS=4; LR="--lr 2e-3 --warmup 5"
else
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1 || cat "$WORK/install.log"
  PRESET=mhla-340m; BATCH=8; BENCH_STEPS=${BENCH_STEPS:-40}; TRAIN="--minutes ${TRAIN_MIN:-3}"; DEV=""
  NPROC=$($PY -c "import torch; print(min(2, torch.cuda.device_count()))"); LOG_EVERY=5; EVAL_EVERY=100
  EVAL_WINDOWS=16; LR="--lr 1e-3 --warmup 100"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi

# ---- data ---------------------------------------------------------------------------------------
DATA=${DATA:-$([ $SMOKE = 1 ] && echo none || echo runs/data)}; DATA_KIND=prepared  # --smoke: synthetic unless DATA is set
PREP_PID=""
if [ ! -f "$DATA/info.json" ] && [ $SMOKE = 0 ]; then
  for S in "${SHARED:-}" shared/data ../shared/data; do
    if [ -n "$S" ] && [ -d "$S/gutenberg" ]; then
      # CPU work: runs beside the GPU throughput runs below, the training waits for it
      echo "preparing $DATA from $S in the background (at most ${PREP_S:-240} s)"
      timeout "${PREP_S:-240}" $PY -m mhla_stream.cli.prepare_data --shared "$S" --out "$DATA" > "$WORK/prep.log" 2>&1 &
      PREP_PID=$!
      break
    fi
  done
fi
SYN="$WORK/synthetic"
VOCAB=$([ $SMOKE = 1 ] && echo 256 || echo 32000)
$PY .ci/synthetic_tokens.py "$SYN" "$VOCAB"
echo "throughput data: $SYN (vocab $VOCAB)"

COMMON="--preset $PRESET --batch $BATCH --log-every $LOG_EVERY --eval-windows $EVAL_WINDOWS --no-resume --no-save $DEV"
bench() {  # bench NAME NPROC [flags...]: BENCH_STEPS steps of the 340M shape, no checkpoints
  local name=$1 n=$2; shift 2
  echo "== $name ($n process(es)) $*"
  if [ "$n" = 1 ]; then
    timeout 240 $PY -m mhla_stream.cli.train $COMMON --data "$SYN" --out "$WORK/$name" --steps "$BENCH_STEPS" --eval-every 100000 "$@" \
      > "$WORK/$name.log" 2>&1
  else
    timeout 240 $PY -m torch.distributed.run --standalone --nproc_per_node "$n" -m mhla_stream.cli.train $COMMON \
      --data "$SYN" --out "$WORK/$name" --steps "$BENCH_STEPS" --eval-every 100000 "$@" > "$WORK/$name.log" 2>&1
  fi
  local rc=$?
  [ $rc = 0 ] && tail -1 "$WORK/$name.log" || { echo "$name failed (rc $rc):"; tail -15 "$WORK/$name.log"; }
}

bench bench_1gpu 1
[ "$NPROC" -ge 2 ] && bench bench_2gpu "$NPROC"
[ "${PLAIN_LOSS:-1}" = 1 ] && bench bench_1gpu_plain_loss 1 --no-fused-loss
[ "${TORCH_OP:-1}" = 1 ] && bench bench_1gpu_torch_op 1 --attn-backend torch
if [ "${EXTRA:-0}" = 1 ]; then
  bench bench_1gpu_act_ckpt 1 --activation-checkpointing
  bench bench_1gpu_compile 1 --compile
fi

if [ -n "$PREP_PID" ]; then
  wait "$PREP_PID" || { echo "data preparation failed or ran out of time:"; tail -3 "$WORK/prep.log"; rm -f "$DATA/info.json"; }
fi
if [ ! -f "$DATA/info.json" ]; then DATA="$SYN"; DATA_KIND=synthetic; fi
[ "${SKIP_TRAIN:-0}" = 1 ] || {
echo "== training ($NPROC process(es), $TRAIN) on $DATA ($DATA_KIND)"
timeout 420 $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m mhla_stream.cli.train $COMMON \
  --data "$DATA" --out "$WORK/train" --eval-every $EVAL_EVERY $TRAIN $LR > "$WORK/train.log" 2>&1 \
  || { echo "training failed:"; tail -15 "$WORK/train.log"; }
tail -1 "$WORK/train.log"
}

$PY - "$WORK" "$OUT" "$DATA_KIND" <<'PY'
import json, sys, pathlib
work, out, data_kind = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
def summary(name):
    p = work / name / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None
runs = {p.name: summary(p.name) for p in sorted(work.iterdir()) if (p / "summary.json").exists()}
one, two = runs.get("bench_1gpu"), runs.get("bench_2gpu")
scaling = round(two["tokens_per_s"] / one["tokens_per_s"], 3) if one and two and one["tokens_per_s"] else None
log = work / "train" / "log.jsonl"
curve = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
report = {"data": data_kind, "runs": runs, "scaling_2_over_1": scaling, "train_log": curve}
(out / "train_ddp.json").write_text(json.dumps(report, indent=1))
for name, s in runs.items():
    print(f"{name:24s} world {s['world']}  tokens/s {s['tokens_per_s']}  mfu {s['mfu']}  peak GiB {s['peak_mem_gib']}"
          f"  best val {s['best_val_loss']:.3f}")
print("scaling 2 GPUs / 1 GPU:", scaling)
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib not installed: no loss_curve.png")
    sys.exit(0)
if curve:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in curve], [r["train_loss"] for r in curve], label="train")
    val = [r for r in curve if "val_loss" in r]
    ax.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    s = runs.get("train") or {}
    ax.set(xlabel="tokens (millions)", ylabel="loss (nats/token)",
           title=f"{s.get('preset')} on {s.get('world')} x {s.get('device')} ({data_kind} data)")
    ax.legend(); ax.grid(alpha=0.3); fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=120)
    print("wrote", out / "loss_curve.png")
PY
cp "$WORK"/*.log "$OUT/" 2>/dev/null
ls -la "$OUT"
