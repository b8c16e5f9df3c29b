#!/usr/bin/env bash
# GPU diagnostics for the prefill failures (see gpu_diag_prefill.py): every tuning configuration of
# each prefill kernel forced in turn, on the long stateless case and a stateful window+far case.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
for kc in 0:0 0:1 0:2 0:3 0:4 0:5 1:1 1:2 1:3 1:4 1:5 2:1 2:2 2:3 2:4 2:5; do
  echo "5000 window fp32 force=$kc"; echo "5000 window bf16 force=$kc"; echo "1000 window+far bf16 state force=$kc"
done | xargs -P ${PAR:-12} -L 1 sh -c 'timeout 200 python3 .ci/gpu_diag_prefill.py "$@" 2>&1 | grep -E "^T=|Error" | tail -1 | cut -c1-150' sh
