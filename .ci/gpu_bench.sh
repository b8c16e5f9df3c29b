#!/usr/bin/env bash
# Run on the GPU machine: kernel tests, the op benchmark and mhla-bench for the 340M architecture
# (random weights) against a same-size transformers Llama, all in one run; results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
[ -n "${SKIP_TESTS:-}" ] || MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q -x tests/test_kernels.py tests/test_fused_decode.py 2>&1 | tee $OUT/gpu_tests.log | tail -4
python3 -m mhla_stream.cli.bench_op --lengths ${OP_LENGTHS:-2048,8192,32768,65536,131072} --profile ${PROFILE_T:-0} --json $OUT/bench_op.json 2>&1 \
  | tee $OUT/bench_op.log | tail -30
mhla-bench --model mhla-340m --random-weights --prompt-len ${LENGTHS:-2048,32768,131072} --new-tokens 128 \
  --compare transformer --json $OUT/bench_340m.json 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$" | tail -8
python3 -m mhla_stream.cli.profile_model --json $OUT/profile_model.json > $OUT/profile_model.txt 2>&1
[ -n "${SKIP_BATCH:-}" ] || mhla-bench --model mhla-340m --random-weights --prompt-len 2048 --batch 1,8,32 --new-tokens 64 \
  --compare transformer --json $OUT/bench_340m_batch.json 2>&1 | tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$" | tail -8
if [ -n "${BASELINE:-}" ] && [ -d runs/data ]; then
  python3 -m mhla_stream.cli.train --data runs/data --out /tmp/$BASELINE --arch $BASELINE --steps 1300 --eval-every 325 \
    --batch 32 --hidden 384 --layers 8 --heads 4 --num-blocks 16 > $OUT/train_$BASELINE.log 2>&1
  tail -c 1500 $OUT/train_$BASELINE.log | tr '\r' '\n' | tail -4; cp /tmp/$BASELINE/log.jsonl $OUT/log_$BASELINE.jsonl 2>/dev/null
fi
