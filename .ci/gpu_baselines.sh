#!/usr/bin/env bash
# Run on the GPU machine: the paper's ordering at small scale. Same data, tokenizer, size and
# token budget (STEPS x 32 x 1024) for MHLA, plain linear attention and a softmax Transformer.
set -uo pipefail
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-1300}
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
for arch in mhla linear transformer; do
  python3 -m mhla_stream.cli.train --data runs/data --out /tmp/$arch --arch $arch --steps $STEPS --eval-every $((STEPS / 4)) \
    --batch 32 --hidden 384 --layers 8 --heads 4 --num-blocks 16 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -1
  cp /tmp/$arch/summary.json $OUT/summary_$arch.json; cp /tmp/$arch/log.jsonl $OUT/log_$arch.jsonl
done
