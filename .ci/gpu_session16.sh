#!/usr/bin/env bash
# Run on the GPU machine (session 16): the fused five-launch step at batches 8-64 (norm statistics
# from the previous product; early or late PDL trigger) against the default batched step, the
# products probe, GPU tests, profiles. STEPS picks the runs
# (names below); results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PROLOGUE='
import mhla_stream.kernels.triton_skinny as s
s.LATE_NORM = False
from mhla_stream.cli.bench import main
main()'
CUBLAS='
import mhla_stream.modeling as m
m.BATCHED_SKINNY_ROWS = 0
from mhla_stream.cli.bench import main
main()'
clean() { tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$"; }
ARGS="--model mhla-340m --random-weights --prompt-len ${PROMPT:-2048} --new-tokens ${NEW:-128} --decode-only"
bench() {  # name, env, command...
  local name=$1 envs=$2; shift 2
  stamp "## $name ($envs), batch ${BATCHES:-8,32,64}"
  env $envs timeout ${BENCH_S:-200} "$@" $ARGS --batch ${BATCHES:-8,32,64} --json $OUT/bench_$name.json 2>&1 | clean \
    | grep -v "^model\|^# plan" | tail -${TAIL:-6}
}
for step in ${STEPS:-}; do
  case $step in
    sweep) stamp "## skinny launch-shape sweep"; timeout ${SWEEP_S:-300} python3 .ci/gpu_skinny_sweep.py 2>&1 | tee $OUT/sweep.log | tail -20 ;;
    products) stamp "## products probe"; timeout ${PROBE_S:-200} python3 .ci/gpu_products_probe.py 2>&1 | tee $OUT/products.log | tail -20 ;;
    batched) bench batched X=1 mhla-bench ;;
    three) bench fused MHLA_STREAM_FUSED_BATCH=128 mhla-bench; bench batched_skinny X=1 mhla-bench
        bench batched_cublas X=1 python3 -c "$CUBLAS" ;;
    cross) bench cross_batched X=1 mhla-bench; bench cross_fused MHLA_STREAM_FUSED_BATCH=128 mhla-bench ;;
    fused) bench fused MHLA_STREAM_FUSED_BATCH=128 mhla-bench ;;
    fused_no_pdl) bench fused_no_pdl "MHLA_STREAM_FUSED_BATCH=128 MHLA_STREAM_PDL=0" mhla-bench ;;
    batched_no_pdl) bench batched_no_pdl MHLA_STREAM_PDL=0 mhla-bench ;;
    fused_late_trigger) bench fused_late_trigger "MHLA_STREAM_FUSED_BATCH=128 MHLA_STREAM_PDL_EARLY=0" mhla-bench ;;
    late) bench fused_late MHLA_STREAM_FUSED_BATCH=128 mhla-bench ;;
    prologue) bench fused_prologue MHLA_STREAM_FUSED_BATCH=128 python3 -c "$PROLOGUE" ;;
    table) stamp "## table"; timeout ${GRID_S:-400} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 --new-tokens 128 --decode-only \
        --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan" ;;
    baseline) stamp "## baseline"; timeout ${BASE_S:-150} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1 --new-tokens 128 --compare transformer \
        --json $OUT/baseline_b1.json 2>&1 | clean | tee $OUT/baseline_b1.log | grep -v "^# plan" ;;
  esac
done
[ -n "${TESTS:-}" ] && stamp "## tests" && timeout ${TEST_S:-300} python3 -m pytest -q -x -p no:logging $TESTS 2>&1 | tail -25 | tee $OUT/tests.log
for spec in ${PROFILES:-}; do  # batch:on|off|auto
  b=${spec%%:*}; f=${spec##*:}; stamp "## profile batch $b fused=$f"
  timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only --batch $b --steps 10 --fused-decode $f \
    --json $OUT/profile_b${b}_$f.json > $OUT/profile_b${b}_$f.txt 2>&1; grep -A14 "CUDA graph" $OUT/profile_b${b}_$f.txt | head -16
done
stamp done
exit 0
