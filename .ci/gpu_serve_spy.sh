#!/usr/bin/env bash
# Run on the GPU machine (carry .whl, which holds a py-spy wheel): where mhla-serve's host time goes at
# 32 streams. py-spy samples the server process twice: threads holding the GIL only, then all threads.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_SERVE_PROFILE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
SPY=/tmp/site/bin/py-spy
timeout 400 python3 -m mhla_stream.cli.serve_bench --random-weights --concurrency 32 --rounds ${ROUNDS:-80} \
  --long-prompts 0 ${BENCH_ARGS:-} --json $OUT/spy_bench.json > $OUT/spy_bench.log 2>&1 &
BENCH=$!
for i in $(seq 300); do  # until uvicorn says the server is up (after model load and graph capture)
  grep -q "mhla-serve http:" $OUT/spy_bench.log 2>/dev/null && break
  sleep 1
done
PID=$(pgrep -f "mhla_stream.cli.serve " | head -1)
echo "server pid $PID after $i s"
sleep ${SPY_DELAY:-12}  # the warm-up requests, then the 32-stream load
$SPY record -p $PID -d 8 -r 250 --gil --threads -f raw -o $OUT/spy_gil.txt 2>&1 | tail -2
$SPY record -p $PID -d 8 -r 250 --threads -f raw -o $OUT/spy_all.txt 2>&1 | tail -2
wait $BENCH
grep -E "^[0-9]|^conc|profile" $OUT/spy_bench.log | tail -12
for f in spy_gil spy_all; do python3 .ci/spy_summary.py $OUT/$f.txt | tee $OUT/$f.summary.txt | head -45; done
