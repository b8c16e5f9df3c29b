#!/usr/bin/env bash
# Run on the GPU machine (session 12): tests of the split-K products and the one-token paths,
# the product probe (cuBLAS against split-K per batch), then mhla-bench A/B runs:
# batch 1 with the early PDL trigger on/off, batches 8-64 with split-K on/off. Results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() {  # name, batches, env...
  local name=$1 batches=$2; shift 2
  echo "## $name ($*) batch $batches"
  env "$@" timeout ${BENCH_S:-150} mhla-bench --model mhla-340m --random-weights --prompt-len 2048 \
    --new-tokens 64 --batch $batches --json $OUT/bench_$name.json 2>&1 | tr '\r' '\n' \
    | grep -v "it/s\]$\|s/it\]$\|^ *$\|^model" | tail -${TAIL:-5}
}
[ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_S:-150} python3 -m pytest -q -x tests/test_splitk.py \
  tests/test_fused_decode.py 2>&1 | tail -4 | tee $OUT/tests.log
[ -n "${SKIP_PROBE:-}" ] || timeout 150 python3 .ci/gpu_splitk_probe.py 2>&1 | grep -v Warn | tee $OUT/splitk_probe.log
for step in ${STEPS:-b1_early b1_late bN_splitk bN_cublas}; do
  case $step in
    b1_early) bench b1_early 1 MHLA_STREAM_PDL_EARLY=1 ;;
    b1_late) bench b1_late 1 MHLA_STREAM_PDL_EARLY=0 ;;
    bN_splitk) bench bN_splitk ${BATCHES:-8,32,64} MHLA_STREAM_SPLITK=1 ;;
    bN_cublas) bench bN_cublas ${BATCHES:-8,32,64} MHLA_STREAM_SPLITK=0 ;;
  esac
done
[ -n "${PROFILE_BATCH:-}" ] && timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only --batch $PROFILE_BATCH \
  --steps 10 --json $OUT/profile_b$PROFILE_BATCH.json > $OUT/profile_b$PROFILE_BATCH.txt 2>&1; \
  grep -A16 "CUDA graph" $OUT/profile_b${PROFILE_BATCH:-x}.txt 2>/dev/null | head -18
exit 0
