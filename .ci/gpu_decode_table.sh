#!/usr/bin/env bash
# Run on the GPU machine: the issue-15 decode table. One mhla-bench run of mhla-340m (random weights,
# bf16) at batches 1..128 and prompts 2k/32k/128k with the decode floor and % of floor per row; the
# same-size transformers Llama at batch 1 (longer prompts or batches do not fit its KV cache or
# the call's time); the profile of the final decode step at batch 1 and 32. Results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
clean() { tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$"; }
timeout ${GRID_S:-330} mhla-bench --model mhla-340m --random-weights --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 \
  --new-tokens 128 --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan"
timeout ${BASE_S:-120} mhla-bench --model mhla-340m --random-weights --prompt-len 2048,32768,131072 --batch 1 \
  --new-tokens 128 --compare transformer --json $OUT/baseline_b1.json 2>&1 | clean | tee $OUT/baseline_b1.log | grep "^transformer"
for b in 1 32; do
  timeout 90 python3 -m mhla_stream.cli.profile_model --decode-only --batch $b --steps 10 --json $OUT/profile_b$b.json \
    > $OUT/profile_b$b.txt 2>&1; grep -A6 "CUDA graph" $OUT/profile_b$b.txt | head -7
done
exit 0
