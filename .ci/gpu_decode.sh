#!/usr/bin/env bash
# Run on the GPU machine: batched decode against its memory-traffic floor, with the batched
# products as cuBLAS + elementwise kernels (fused off) and as the five-launch Triton step (fused
# on), then the profile of a batch-32 step (results in $OUT). Extra arguments go to mhla-bench.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv
for fd in ${FUSED:-off on}; do
  python3 -m mhla_stream.cli.bench --model mhla-340m --random-weights --prompt-len ${LENGTHS:-2048} \
    --batch ${BATCHES:-1,8,32,64,128} --fused-decode $fd --json $OUT/bench_decode_fused_$fd.json "$@" 2>&1 \
    | tr "\r" "\n" | grep -v "it/s\]$\|s/it\]$\|^ *$" | tee $OUT/bench_decode_fused_$fd.log
done
python3 -m mhla_stream.cli.profile_model --decode-only --batch ${PROFILE_BATCH:-32} --fused-decode ${PROFILE_FUSED:-on} \
  --steps 10 --json $OUT/profile_decode.json 2>&1 | grep -v Warning | tee $OUT/profile_decode.txt | tail -22
