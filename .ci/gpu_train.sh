#!/usr/bin/env bash
# Run on the GPU machine: train the default model within a time budget, measure the policies on
# long held-out books, and send back the fp16 model (tar split in 15 MB parts) and the logs.
set -uo pipefail
export PYTHONUNBUFFERED=1
MIN=${MIN:-6.5}
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
python3 -m mhla_stream.cli.train --data runs/data --out /tmp/run --minutes "$MIN" --batch 32 --eval-every 250 \
  --hidden 384 --layers 8 --heads 4 --num-blocks 16 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -5
python3 - <<'PY'
import torch, shutil
from mhla_stream import MHLAForCausalLM
m = MHLAForCausalLM.from_pretrained("/tmp/run/best")
m.to(torch.float16).save_pretrained("/tmp/model")
shutil.copy("/tmp/run/best/tokenizer.model", "/tmp/model/tokenizer.model")
PY
python3 -m mhla_stream.cli.eval_long --model /tmp/model --tokens runs/data/heldout_books.bin --length 16384 \
  --sequences 8 --json /tmp/run/policies.json 2>&1 | tail -8
cp /tmp/run/log.jsonl /tmp/run/summary.json /tmp/run/policies.json /tmp/model/ 2>/dev/null
tar -C /tmp -cf /tmp/model.tar model && split -b 15m /tmp/model.tar $OUT/model.tar.part-
cp /tmp/run/summary.json /tmp/run/policies.json $OUT/ 2>/dev/null; ls -la $OUT
