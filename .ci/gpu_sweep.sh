#!/usr/bin/env bash
# Run on the GPU machine: the full-shape GPU test sweep as parallel processes (each file or group
# compiles its own kernels; one process took 334 s alone), the serve CUDA check, then bench_op with fla.
# Carry .whl (server deps) and .fla (fla + einops) when available.
set -uo pipefail
export PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-480}
for d in .whl .fla; do
  if ls $d/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl
  fi
done
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
run() { name=$1; shift; timeout $LIMIT "$@" > $OUT/$name.log 2>&1; echo "$name rc=$?" >> $OUT/$name.log; }
run t_prefill env MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q --durations=5 tests/test_kernels.py -k "prefill_stateless" &
run t_state env MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q --durations=5 tests/test_kernels.py tests/test_prefill_prefix_dtype.py -k "with_state or different_lengths or prefix" &
run t_rest env MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q --durations=10 tests/test_kernels.py tests/test_operator.py tests/test_backward.py -k "not prefill_stateless and not with_state and not different_lengths" &
${SERVE_CHECK:-false} && run serve_check python3 .ci/gpu_serve_check.py &
wait
for f in $OUT/*.log; do echo "== $f"; tail -3 $f; done
python3 -m mhla_stream.cli.bench_op --json $OUT/bench_op.json 2>&1 | tee $OUT/bench_op.log | tail -6
python3 -m mhla_stream.cli.bench_op --backward --batch 8 --lengths 2048,8192 --json $OUT/bench_op_bwd.json 2>&1 \
  | tee $OUT/bench_op_bwd.log | tail -4
