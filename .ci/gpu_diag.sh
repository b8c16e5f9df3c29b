#!/usr/bin/env bash
# Diagnostics on the GPU machine (carry .whl and .fla): StepRunner host/device costs per call, the
# server's engine-turn profile at 32 streams (MHLA_SERVE_PROFILE=1), and where fla's GLA training
# spends its first step (py-spy dump after GLA_DUMP_S seconds).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .fla/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
SPY=/tmp/site/bin/py-spy
timeout 200 python3 .ci/gpu_host_costs.py 2>&1 | grep -v "^INFO" | tail -4
if ${SERVE:-true}; then
  MHLA_SERVE_PROFILE=1 timeout 200 python3 -m mhla_stream.cli.serve_bench --random-weights --concurrency 32 --long-prompts 0 \
    --rounds ${ROUNDS:-4} ${BENCH_ARGS:-} --json $OUT/serve32.json 2>&1 | grep --line-buffered -E "^[0-9]|^conc|profile" | tail -8
fi
if ${GLA:-true}; then
  python3 .ci/synthetic_tokens.py /tmp/syn 32000 > /dev/null
  timeout -k 5 ${GLA_LIMIT:-135} python3 -m mhla_stream.cli.train --data /tmp/syn --out /tmp/gla --arch gla --preset mhla-340m \
    --batch 8 --steps 3 --log-every 1 --eval-every 1000000 --eval-windows 1 --no-resume --no-save > $OUT/gla.log 2>&1 &
  GLA_PID=$!
fi
if ${GLA:-true}; then
  for t in 1 2 3; do
    sleep ${GLA_DUMP_S:-40}; PID=$(pgrep -f "^python3 -m mhla_stream.cli.train.*arch gla" | head -1); [ -n "$PID" ] || break
    echo "== gla py-spy dump $t (pid $PID)"; $SPY dump --subprocesses --pid $PID 2>&1 | head -60
  done
  wait $GLA_PID; echo "gla rc $?"; tail -5 $OUT/gla.log
fi
