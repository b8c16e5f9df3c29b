#!/usr/bin/env bash
# Run on the GPU machine (session 12): tests of the one-token paths, then mhla-bench A/B runs
# chosen by STEPS (each a name below). Results in $OUT. call1 also probed a standalone split-K
# product against cuBLAS (removed after it measured no faster: commit 62a984b).
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() {  # name, batches, env...
  local name=$1 batches=$2; shift 2
  echo "## $name ($*) batch $batches prompt ${PROMPT:-2048}"
  env "$@" timeout ${BENCH_S:-200} mhla-bench --model mhla-340m --random-weights --prompt-len ${PROMPT:-2048} \
    --new-tokens 64 --batch $batches --json $OUT/bench_$name.json 2>&1 | tr '\r' '\n' \
    | grep -v "it/s\]$\|s/it\]$\|^ *$\|^model" | tail -${TAIL:-5}
}
[ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_S:-240} python3 -m pytest -q -x tests/test_fused_decode.py tests/test_plan.py \
  2>&1 | tail -4 | tee $OUT/tests.log
for step in ${STEPS:-b1_early b1_late}; do
  case $step in
    b1_early) bench b1_early 1 MHLA_STREAM_PDL_EARLY=1 ;;
    b1_late) bench b1_late 1 MHLA_STREAM_PDL_EARLY=0 ;;
    b1_long) PROMPT=32768,131072 bench b1_long 1 X=1 ;;
    bN_fused) bench bN_fused ${BATCHES:-8,32} MHLA_STREAM_FUSED_BATCH=64 ;;
    bN_fused_late) bench bN_fused_late ${BATCHES:-8,32} MHLA_STREAM_FUSED_BATCH=64 MHLA_STREAM_PDL_EARLY=0 ;;
    bN_batched) bench bN_batched ${BATCHES:-8,32} MHLA_STREAM_FUSED_BATCH=1 ;;
  esac
done
[ -n "${PROFILE_BATCH:-}" ] && env ${PROFILE_ENV:-X=1} timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only \
  --batch $PROFILE_BATCH --steps 10 --json $OUT/profile_b$PROFILE_BATCH.json > $OUT/profile_b$PROFILE_BATCH.txt 2>&1; \
  grep -A16 "CUDA graph" $OUT/profile_b${PROFILE_BATCH:-x}.txt 2>/dev/null | head -18
exit 0
