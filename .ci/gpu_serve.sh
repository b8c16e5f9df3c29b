#!/usr/bin/env bash
# Run on the GPU machine (carry .whl): mhla-serve's CUDA path against StreamingMHLA (greedy text of 13
# concurrent requests, fp32), then the load generator at 1/8/32/64 streams with the long-prompt phase,
# and a same-run row at 32 streams with $SECOND_ARGS (default --no-http-process: the HTTP side in the
# engine's process; SERVE_SECOND=false skips it). $SERVE_ARGS: mhla-serve options for the check and the main run (e.g. --admit-batch 8).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
${SERVE_CHECK:-true} && timeout 240 python3 .ci/gpu_serve_check.py ${SERVE_ARGS:-} 2>&1 | tee $OUT/serve_check.log | grep --line-buffered -v "^INFO" | tail -4
timeout 330 python3 -m mhla_stream.cli.serve_bench --random-weights --server-args="${SERVE_ARGS:-}" --json $OUT/serve_bench.json 2>&1 | tee $OUT/serve_bench.log \
  | grep --line-buffered -E "^[0-9]|^conc|^#|streams|state per|engine profile" | tail -12
${SERVE_SECOND:-true} && timeout 200 python3 -m mhla_stream.cli.serve_bench --random-weights --concurrency 32 --long-prompts 0 \
  --server-args="${SECOND_ARGS:---no-http-process}" --json $OUT/serve_bench_second.json 2>&1 | grep --line-buffered -E "^[0-9]|^conc" | tail -2
