#!/usr/bin/env bash
# Run on the GPU machine: batched decode. Tests of the one-token paths, the decode kernel's launch
# shapes (gpu_decode_probe.py), then mhla-bench at BATCHES under each of VARIANTS (environment
# settings) and the profile of a PROFILE_BATCH decode step. Results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_S:-200} python3 -m pytest -q -x tests/test_fused_decode.py tests/test_plan.py 2>&1 | tail -4 | tee $OUT/tests.log
[ -n "${SKIP_PROBE:-}" ] || timeout 150 python3 .ci/gpu_decode_probe.py 2>&1 | grep -v Warn | tee $OUT/decode_probe.log
for v in ${VARIANTS:-MHLA_STREAM_FUSED_DECODE=1 MHLA_STREAM_FUSED_DECODE=0}; do
  echo "## $v"; env $v timeout 200 mhla-bench --model mhla-340m --random-weights --prompt-len ${LENGTHS:-2048} \
    --new-tokens 64 --batch ${BATCHES:-8,32} --json $OUT/bench_${v//=/_}.json 2>&1 | tr '\r' '\n' \
    | grep -v "it/s\]$\|s/it\]$\|^ *$\|^model" | tail -6
done
[ -n "${PROFILE_BATCH:-}" ] && timeout 150 python3 -m mhla_stream.cli.profile_model --decode-only --batch $PROFILE_BATCH \
  --steps 10 --json $OUT/profile_b$PROFILE_BATCH.json > $OUT/profile_b$PROFILE_BATCH.txt 2>&1; \
  grep -A16 "CUDA graph" $OUT/profile_b${PROFILE_BATCH:-x}.txt 2>/dev/null | head -18
exit 0
