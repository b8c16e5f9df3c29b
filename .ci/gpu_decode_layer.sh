#!/usr/bin/env bash
# Run on the GPU machine: batch-1 decode variants. The tests (layer kernel and fused decode),
# mhla-bench at batch 1 under each of VARIANTS (environment settings),
# and the profile of the decode step; then BATCH_RUNS (fused decode forced on and auto) at
# batches 8..128. Results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_S:-240} python3 -m pytest -q -x tests/test_decode_layer.py tests/test_fused_decode.py 2>&1 | tail -6 | tee $OUT/tests.log
for v in ${VARIANTS:-MHLA_STREAM_PREFETCH=1 MHLA_STREAM_PREFETCH=0 MHLA_STREAM_LAYER_KERNEL=1}; do
  echo "## $v"; env $v timeout 150 mhla-bench --model mhla-340m --random-weights --prompt-len ${LENGTHS:-2048} \
    --new-tokens 256 --batch 1 --json $OUT/b1_${v//=/_}.json 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$\|^ *$\|^#\|^model" | tail -3
done
timeout 150 python3 -m mhla_stream.cli.profile_model --decode-only --batch 1 --steps 10 --json $OUT/profile_b1.json \
  > $OUT/profile_b1.txt 2>&1; grep -A12 "CUDA graph" $OUT/profile_b1.txt | head -14
for fd in ${BATCH_RUNS:-}; do
  timeout 200 mhla-bench --model mhla-340m --random-weights --prompt-len 2048 --new-tokens 64 --batch ${BATCHES:-8,32} \
    --fused-decode $fd --json $OUT/batch_$fd.json 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$\|^ *$" | tail -4
done
exit 0
