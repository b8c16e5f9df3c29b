#!/usr/bin/env bash
# Run on the GPU machine (carry .whl): serve_bench at $CONC streams (default 32; no long prompts) once per
# mhla-serve option set in $SETTINGS (sets separated by ';', e.g. "--admit-wait-ms 0;--admit-wait-ms 10"),
# each with the engine-turn profile (MHLA_SERVE_PROFILE=1: phase times and prompts per batched admission),
# and $BENCH_ARGS for serve_bench itself (default "--stagger-ms 300": clients spread over about one
# request's time, so arrivals are spread, not bursts; "" for the bursts of the standard run).
# One server start each (~80-130 s of graph capture), so about 3 settings fit in one 10-minute call.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
IFS=';' read -ra SETS <<< "${SETTINGS:---admit-wait-ms 0;--admit-wait-ms 10;--admit-wait-ms 25}"
i=0
for args in "${SETS[@]}"; do
  i=$((i + 1))
  echo "== setting $i: $args"
  MHLA_SERVE_PROFILE=1 timeout ${EACH_S:-185} python3 -m mhla_stream.cli.serve_bench --random-weights --concurrency ${CONC:-32} \
    --long-prompts 0 --rounds ${ROUNDS:-6} ${BENCH_ARGS---stagger-ms 300} --server-args="$args" --json $OUT/serve_ab_$i.json 2>&1 \
    | tee $OUT/serve_ab_$i.log | grep --line-buffered -E "^[0-9]|^conc|profile" | tail -6
done
