#!/usr/bin/env bash
# One GPU call (carry .whl): the GPU test sweep's state and different-length cases (TEST_TUNE=0) beside
# the prefetch A/B (.ci/prefetch_ab.py; CUDA-graph decode is GPU-bound, the tests mostly compile on the CPU).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
L=${LIMIT:-420}
run() { name=$1; shift; timeout $L "$@" > $OUT/$name.log 2>&1; echo "$name rc=$?" >> $OUT/$name.log; }
T="env MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q --durations=5"
run t_state $T tests/test_kernels.py -k "with_state or different_lengths" &
run t_prefix $T tests/test_prefill_prefix_dtype.py tests/test_fused_decode.py &
run t_prefetch env MHLA_STREAM_PREFETCH=1 $T tests/test_prefetch.py tests/test_kernels.py -k "cuda_graph or fused" &
run prefetch_ab python3 .ci/prefetch_ab.py 2 1,32 &
wait
for f in $OUT/*.log; do echo "== $f"; grep -E "passed|failed|error|rc=|prefetch=" $f | tail -6; done
