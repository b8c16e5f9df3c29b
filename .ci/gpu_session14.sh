#!/usr/bin/env bash
# Run on the GPU machine (session 14): the decode kernel that keeps the open block as its tokens
# (state.py, triton_decode.py) against session 13's (R read and written every token,
# .ci/ab/triton_decode_s13.py) in the same call, then the one-run decode table. call1/call2 ran a
# first token-form kernel (tensor-core sum of the buffers; open_tokens_attempt.patch in the results).
# STEPS picks the runs (names below); results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the bench with session 13's decode kernel swapped in (fused batch-1 step and batched step alike)
OLD_KERNEL='
import importlib.util, mhla_stream.modeling as m
spec = importlib.util.spec_from_file_location("s13", ".ci/ab/triton_decode_s13.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
m.decode_into = mod.decode_into
from mhla_stream.cli.bench import main
main()'
clean() { tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$"; }
ab() {  # name, batches: the new kernel then the old one, same prompt and settings
  local name=$1 batches=$2 args="--model mhla-340m --random-weights --prompt-len ${PROMPT:-2048} --new-tokens ${NEW:-128} --decode-only"
  echo "## $name: tokens kernel, batch $batches"
  timeout ${BENCH_S:-200} mhla-bench $args --batch $batches --json $OUT/bench_${name}_tokens.json 2>&1 | clean \
    | grep -v "^model\|^# plan" | tail -${TAIL:-6}
  echo "## $name: session 13 kernel (R every token), batch $batches"
  timeout ${BENCH_S:-200} python3 -c "$OLD_KERNEL" $args --batch $batches --json $OUT/bench_${name}_s13.json 2>&1 \
    | clean | grep -v "^model\|^# plan" | tail -${TAIL:-6}
}
[ -n "${TESTS:-}" ] && timeout ${TEST_S:-300} python3 -m pytest -q -x -p no:logging $TESTS 2>&1 | tail -25 | tee $OUT/tests.log
for step in ${STEPS:-}; do
  case $step in
    probe) echo "## decode kernel probe"; timeout ${PROBE_S:-150} python3 .ci/gpu_decode_probe.py 2>&1 | tee $OUT/probe.log | tail -60 ;;
    ab1) ab b1 1 ;;
    abN) ab bN ${BATCHES:-8,32,128} ;;
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
