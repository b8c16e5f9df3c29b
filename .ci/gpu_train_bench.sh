#!/usr/bin/env bash
# Training throughput of the 340M shape on one GPU with the baselines in the SAME run (issue 16):
# mhla (default flags: compiled on CUDA), mhla --no-compile, mhla --activation-checkpointing, fla's GLA,
# transformers' Llama compiled and not;
# all at batch 8 x 2,048, the preset's shape, vocabulary 32,000, synthetic tokens, no checkpoints.
# Then one profile of an MHLA training step (profile_train; compiled, as the timed step is). One GPU command, < 9 minutes:
#     bash .ci/gpu_train_bench.sh            (carry .fla for GLA: fla + einops wheels)
#     bash .ci/gpu_train_bench.sh --smoke    (CPU check of the plumbing: tiny preset, 2 steps)
# Writes $OUT/train_bench.json (every run's summary.json, or why it has none), $OUT/train_profile.txt
# and $OUT/train_profile.json, and each run's log. Each run is under `timeout` (a crash or a hang
# loses that run only) and the whole script keeps to $TOTAL_S seconds.
# Knobs: GLA_TUNE_DIR (fla tunings from .ci/gpu_gla_tune.sh, default .gla_tune), GLA_LIMIT (seconds for the gla run: fla autotunes many kernels on its first step), BENCH_STEPS (30), RUNS (names in the order to run: mhla mhla_eager transformer transformer_eager
# mhla_act_ckpt profile gla by default; gla last: fla's first step autotunes for minutes), EXTRA_ARGS
# (added to every mhla-train run), TOTAL_S (510: later runs get what is left), GLA_ENV (environment for
# the gla run only, e.g. "TORCHDYNAMO_DISABLE=1": fla 0.5.2 wraps its activations in @torch.compile, whose
# first compile on the GPU machine's slow host is a suspect for the first step that never finished).
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
OUT=${OUT:-/tmp/gpu_train_bench}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/train_bench.XXXX)
PY=${PYTHON:-python3}
START=$SECONDS
SMOKE=0; [ "${1:-}" = "--smoke" ] && SMOKE=1
if [ $SMOKE = 1 ]; then
  PRESET=mhla-tiny; BATCH=4; VOCAB=256; BENCH_STEPS=${BENCH_STEPS:-2}; LOG_EVERY=1; DEV="--device cpu"
  RUNS=${RUNS:-mhla transformer profile}; LIMIT=120; TOTAL_S=${TOTAL_S:-300}
  PROFILE_ARGS="--preset mhla-tiny --vocab $VOCAB --batch 2 --warmup 1 --steps 1 --top 10 --device cpu"
else
  for d in .fla; do  # fla is not a dependency: installed beside the project, like gpu_serve.sh's wheels
    if ls $d/*.whl > /dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
  done
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1 || cat "$WORK/install.log"
  # fla's autotuning results made by earlier calls (.ci/gpu_gla_tune.sh): its GLA then compiles only the chosen configs
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
  mkdir -p "$TRITON_CACHE_DIR"
  # (the committed ones: .ci/gla_tune/, H100 + triton 3.6 + fla 0.5.2, when none are carried; a
  # tuning keyed to another GPU or version is simply not found, and fla tunes afresh)
  if [ -d "${GLA_TUNE_DIR:-.gla_tune}" ]; then cp -r "${GLA_TUNE_DIR:-.gla_tune}"/. "$TRITON_CACHE_DIR"/
  else for t in .ci/gla_tune/*.tar.gz; do tar xzf "$t" -C "$TRITON_CACHE_DIR"; done; fi
  echo "restored $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotuning results"
  PRESET=mhla-340m; BATCH=8; VOCAB=32000; BENCH_STEPS=${BENCH_STEPS:-30}; LOG_EVERY=5; DEV=""
  RUNS=${RUNS:-mhla mhla_eager transformer transformer_eager mhla_act_ckpt profile gla}; LIMIT=180; TOTAL_S=${TOTAL_S:-510}
  PROFILE_ARGS="--preset mhla-340m --vocab $VOCAB --batch $BATCH"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
echo "runs: $RUNS; $BENCH_STEPS steps each; extra args: ${EXTRA_ARGS:-none}"

SYN="$WORK/synthetic"
$PY .ci/synthetic_tokens.py "$SYN" "$VOCAB"

left() {  # seconds for the next command: its own limit, or what is left of TOTAL_S (less a margin for the table)
  local rest=$((TOTAL_S - (SECONDS - START) - 15))
  [ "$rest" -lt "$1" ] && echo $((rest > 1 ? rest : 1)) || echo "$1"
}

# shellcheck disable=SC2086  # EXTRA_ARGS and DEV are word lists on purpose
bench() {  # bench NAME ARCH [flags...]
  local name=$1 arch=$2; shift 2
  local limit; limit=$(left "${LIMIT_OF:-$LIMIT}")
  echo "== $name: --arch $arch $* (limit ${limit} s)"
  timeout -k 10 "$limit" env ${RUN_ENV:-} $PY -m mhla_stream.cli.train --data "$SYN" --out "$WORK/$name" --arch "$arch" --preset $PRESET \
    --batch $BATCH --steps "$BENCH_STEPS" --log-every $LOG_EVERY --eval-every 1000000 --eval-windows 1 --no-resume \
    --no-save $DEV "$@" ${EXTRA_ARGS:-} > "$WORK/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then tail -1 "$WORK/$name.log"; else
    echo "$name failed (rc $rc$([ $rc = 124 ] && echo ': timed out'))"; tail -5 "$WORK/$name.log"
    echo "rc $rc" > "$WORK/$name.failed"
  fi
}

profile() {  # one MHLA training step under torch.profiler: $OUT/train_profile.txt and .json
  local limit; limit=$(left 150)
  echo "== profile of one MHLA training step (limit ${limit} s)"
  # shellcheck disable=SC2086
  timeout -k 10 "$limit" $PY -m mhla_stream.cli.profile_train $PROFILE_ARGS --json "$OUT/train_profile.json" \
    > "$OUT/train_profile.txt" 2>&1 || echo "profile failed (rc $?)"
  grep -v "^USDT\|Warning\|warn(" "$OUT/train_profile.txt" | head -14
}

for run in $RUNS; do
  case $run in
    mhla) LIMIT_OF=$((LIMIT + 60)) bench mhla mhla ;;  # the default: compiled on CUDA
    mhla_eager) bench mhla_eager mhla --no-compile ;;
    mhla_act_ckpt) LIMIT_OF=$((LIMIT + 60)) bench mhla_act_ckpt mhla --activation-checkpointing ;;
    transformer) LIMIT_OF=$((LIMIT + 60)) bench transformer transformer ;;
    transformer_eager) bench transformer_eager transformer --no-compile ;;
    gla)
      if why=$($PY -c "from fla.models import GLAForCausalLM" 2>&1); then RUN_ENV=${GLA_ENV:-} LIMIT_OF=${GLA_LIMIT:-$LIMIT} bench gla gla --no-compile
      else
        why=$(echo "$why" | grep -E "Error|error" | tail -1 | cut -c1-120)
        echo "== gla skipped: fla does not import (${why:-not installed}; carry .fla with its wheels)"
        echo "skipped: fla does not import: ${why:-not installed}" > "$WORK/gla.failed"
      fi ;;
    profile) profile ;;
    *) echo "unknown run name $run (known: mhla mhla_eager mhla_act_ckpt gla transformer transformer_eager profile)" ;;
  esac
done

$PY - "$WORK" "$OUT" "$RUNS" "$BENCH_STEPS" <<'PY'
import json, pathlib, sys, time
work, out, names, steps = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3].split(), int(sys.argv[4])
FLAGS = {"mhla": "(compiled)", "mhla_eager": "--no-compile", "mhla_act_ckpt": "--activation-checkpointing",
         "transformer": "(compiled)", "transformer_eager": "--no-compile", "gla": "--no-compile"}
runs = {}
for name in [n for n in names if n != "profile"]:
    summary, failed = work / name / "summary.json", work / f"{name}.failed"
    if summary.exists():
        runs[name] = json.loads(summary.read_text())
        log = work / name / "log.jsonl"  # every logged interval, to see warm-up and spread
        if log.exists():
            runs[name]["intervals_tok_s"] = [json.loads(line).get("tokens_per_s") for line in log.read_text().splitlines()
                                             if line.strip()]
    elif failed.exists():
        runs[name] = {"error": failed.read_text().strip()}
gla = (runs.get("gla") or {}).get("tokens_per_s")
print(f"\n{'run':15s} {'arch':12s} {'flags':28s} {'tokens/s':>10s} {'peak GiB':>9s} {'x gla':>6s}")
for name, s in runs.items():
    if "error" in s:
        print(f"{name:15s} {'':12s} {'':28s} {s['error']}")
        continue
    rate, peak = s.get("tokens_per_s"), s.get("peak_mem_gib")
    ratio = f"{rate / gla:.2f}" if rate and gla else "-"
    print(f"{name:15s} {s['arch']:12s} {FLAGS.get(name, ''):28s} {rate or 0:10,.0f} {peak if peak is not None else '-':>9} "
          f"{ratio:>6s}")
device = next((s.get("device") for s in runs.values() if s.get("device")), None)
report = {"date": time.strftime("%Y-%m-%d"), "device": device, "steps": steps, "runs": runs,
          "ratio_to_gla": {n: round(s["tokens_per_s"] / gla, 3) for n, s in runs.items()
                           if gla and s.get("tokens_per_s")}}
(out / "train_bench.json").write_text(json.dumps(report, indent=1))
print("wrote", out / "train_bench.json")
PY
cp "$WORK"/*.log "$OUT/" 2>/dev/null
echo "total $((SECONDS - START)) s"
