#!/usr/bin/env bash
# fla's GLA never finished its first training step inside one GPU command (180, 330 and 290 s: fla 0.5.2
# autotunes every kernel over a large grid, compiling each candidate). Triton keeps each finished tuning
# as a small `*.autotune.json` in its cache (fla asks for that: FLA_CACHE_RESULTS, on by default), keyed by
# triton version, GPU target, kernel source, environment and configs, so tunings carry between machines of
# one kind. This script (carry .fla, and .gla_tune once it exists) restores the tunings carried in .gla_tune,
# runs GLA's first steps at the benchmark's shape for up to GLA_S seconds, and returns every tuning made so
# far as $OUT/gla_tune.tar.gz; each call gets further. Locally: mkdir -p .gla_tune && tar xzf gla_tune.tar.gz -C .gla_tune.
# gpu_train_bench.sh restores .gla_tune the same way (GLA_TUNE_DIR), so its GLA run then compiles only
# the chosen configurations. If GLA's steps finish with time left in the call (CALL_S, 570), the script
# runs gpu_train_bench.sh at once on the warm cache (RUNS from BENCH_RUNS, default "gla mhla transformer").
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fla/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
mkdir -p "$TRITON_CACHE_DIR"
if [ -d .gla_tune ]; then cp -r .gla_tune/. "$TRITON_CACHE_DIR"/
else for t in .ci/gla_tune/*.tar.gz; do tar xzf "$t" -C "$TRITON_CACHE_DIR"; done; fi  # committed (session 9, H100)
echo "restored $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) tunings"
python3 .ci/synthetic_tokens.py /tmp/syn 32000 > /dev/null
timeout -k 5 ${GLA_S:-480} python3 -m mhla_stream.cli.train --data /tmp/syn --out /tmp/gla --arch gla --preset mhla-340m \
  --batch 8 --steps ${STEPS:-3} --log-every 1 --eval-every 1000000 --eval-windows 1 --no-resume --no-save \
  --no-compile > $OUT/gla_tune.log 2>&1 &
PID=$!
while kill -0 $PID 2>/dev/null; do
  sleep 30; echo "$(date +%T) tunings: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l), cache $(du -sm "$TRITON_CACHE_DIR" | cut -f1) MiB"
done
wait $PID; RC=$?; echo "gla rc $RC"; tail -3 $OUT/gla_tune.log
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf $OUT/gla_tune.tar.gz -T -)
echo "returned $(tar tzf $OUT/gla_tune.tar.gz | wc -l) tunings ($(du -k $OUT/gla_tune.tar.gz | cut -f1) KiB)"
# GLA's steps finished: the cache is warm here, so the three-model table can follow in this call
LEFT=$(( ${CALL_S:-570} - SECONDS ))
if [ "$RC" = 0 ] && [ "${THEN_BENCH:-1}" = 1 ] && [ $LEFT -gt 240 ]; then
  echo "== training table with the warm cache ($LEFT s left)"
  RUNS=${BENCH_RUNS:-gla mhla transformer} BENCH_STEPS=${BENCH_STEPS:-20} TOTAL_S=$((LEFT - 10)) GLA_LIMIT=${GLA_LIMIT:-150} \
    bash .ci/gpu_train_bench.sh
fi
