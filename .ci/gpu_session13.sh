#!/usr/bin/env bash
# Run on the GPU machine (session 13): the chained decode step (kernels ordered by counters in
# global memory, MHLA_STREAM_CHAIN) against kernel boundaries, and the one-run decode table.
# STEPS picks the runs (names below); results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the fused step with the decode kernel's state reads after its wait, for an A/B in one call
LATE_STATE='
import mhla_stream.modeling as m, mhla_stream.kernels.triton_decode as td
early = td.decode_into
m.decode_into = lambda *a, state_early=False, **k: early(*a, **k)
from mhla_stream.cli.bench import main
main()'
clean() { tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$"; }
bench() {  # name, batches, env...
  local name=$1 batches=$2; shift 2
  echo "## $name ($*) batch $batches prompt ${PROMPT:-2048}"
  env "$@" timeout ${BENCH_S:-200} mhla-bench --model mhla-340m --random-weights --prompt-len ${PROMPT:-2048} \
    --new-tokens ${NEW:-64} --batch $batches --decode-only --json $OUT/bench_$name.json 2>&1 | clean \
    | grep -v "^model" | tail -${TAIL:-5}
}
[ -n "${TESTS:-}" ] && timeout ${TEST_S:-300} python3 -m pytest -q -x -p no:logging $TESTS 2>&1 | tail -6 | tee $OUT/tests.log
for step in ${STEPS:-}; do
  case $step in
    b1) bench b1 1 X=1 ;;
    b1_late_state) echo "## b1 with the decode kernel reading its state after gdc_wait (as before session 13)"
      timeout ${BENCH_S:-200} python3 -c "$LATE_STATE" --model mhla-340m --random-weights --prompt-len 2048 \
        --new-tokens ${NEW:-64} --batch 1 --decode-only --json $OUT/bench_b1_late_state.json 2>&1 | clean | tail -2 ;;
    # call1 (the chained step, MHLA_STREAM_CHAIN of chain_attempt.patch) ran b1_chain / b1_plain / bN_chain
    bN_batched) bench bN_batched ${BATCHES:-8,32} MHLA_STREAM_FUSED_BATCH=1 ;;
    table) echo "## table"; timeout ${GRID_S:-400} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 --new-tokens 128 --decode-only \
        --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan" ;;
    baseline) echo "## baseline"; timeout ${BASE_S:-150} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1 --new-tokens 128 --compare transformer \
        --json $OUT/baseline_b1.json 2>&1 | clean | tee $OUT/baseline_b1.log | grep -v "^# plan" ;;
  esac
done
for b in ${PROFILE_BATCH:-}; do
  env ${PROFILE_ENV:-X=1} timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only --batch $b --steps 10 \
    --json $OUT/profile_b$b.json > $OUT/profile_b$b.txt 2>&1; grep -A16 "CUDA graph" $OUT/profile_b$b.txt | head -18
done
exit 0
