#!/usr/bin/env bash
# Run on the GPU machine (no carry): batch-1 and batch-32 decode of mhla-340m (random weights, bf16) with the
# decode projections' L2 prefetch of the next projection's weights off and on
# (MHLA_STREAM_PREFETCH), interleaved ROUNDS times in separate processes, then the fused-decode
# tests with it on. Decides the switch's default (README: Speed).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for r in $(seq ${ROUNDS:-2}); do
  for pf in 0 1; do
    MHLA_STREAM_PREFETCH=$pf timeout ${RUN_S:-150} python3 -m mhla_stream.cli.bench --model mhla-340m --random-weights \
      --prompt-len ${LENGTHS:-2048} --batch ${BATCHES:-1,32} --new-tokens ${NEW:-256} --json $OUT/prefetch${pf}_round$r.json 2>&1 \
      | tr "\r" "\n" | grep --line-buffered -E "^[0-9]|decode|^prompt" | sed "s/^/prefetch=$pf round $r: /" | tail -3
  done
done
MHLA_STREAM_PREFETCH=1 MHLA_STREAM_TUNE=0 timeout ${TEST_S:-200} python3 -m pytest -q -x tests/test_fused_decode.py tests/test_prefetch.py 2>&1 | tail -3
