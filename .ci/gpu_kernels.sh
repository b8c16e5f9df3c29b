#!/usr/bin/env bash
# Run on the GPU machine: kernel test sweep at full shapes, then the op benchmark (results in $OUT).
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv
MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q tests/test_kernels.py tests/test_operator.py tests/test_backward.py 2>&1 | tee $OUT/gpu_tests.log | tail -15
python3 -m mhla_stream.cli.bench_op --json $OUT/bench_op.json "$@" 2>&1 | tee $OUT/bench_op.log
# forward + backward of the operator (training): Triton autograd vs torch chunk form vs fla
python3 -m mhla_stream.cli.bench_op --backward --batch 8 --lengths ${BWD_LENGTHS:-2048,8192} --json $OUT/bench_op_bwd.json 2>&1 \
  | tee $OUT/bench_op_bwd.log | tail -8
