#!/usr/bin/env bash
# Run on the GPU machine: batched decode of mhla-340m (random weights, bf16, 2k prompt) against
# its memory-traffic floor, once per RUNS entry "STATE_DTYPE:FUSED_DECODE" (default: the fp32
# and the bf16 ring, fused decode auto), then the 340M logit check of the bf16 ring and, with
# PROFILE_BATCH set, the profile of a decode step (results in $OUT).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv
for run in ${RUNS:-fp32:auto bf16:auto}; do
  sd=${run%%:*}; fd=${run##*:}
  timeout ${RUN_S:-240} python3 -m mhla_stream.cli.bench --model mhla-340m --random-weights --prompt-len ${LENGTHS:-2048} \
    --batch ${BATCHES:-1,8,32,64,128} --state-dtype $sd --fused-decode $fd --json $OUT/bench_decode_${sd}_$fd.json "$@" 2>&1 \
    | tr "\r" "\n" | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$" | tee $OUT/bench_decode_${sd}_$fd.log
done
[ "${STATE_CHECK:-1}" = 1 ] && timeout 180 python3 .ci/gpu_state_dtype.py 2>&1 | tee $OUT/state_dtype_check.log | tail -12
[ -n "${PROFILE_BATCH:-}" ] && python3 -m mhla_stream.cli.profile_model --decode-only --batch $PROFILE_BATCH \
  --steps 10 --json $OUT/profile_decode.json 2>&1 | grep -v Warning | tee $OUT/profile_decode.txt | tail -22
exit 0
