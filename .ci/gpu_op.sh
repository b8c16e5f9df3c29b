#!/usr/bin/env bash
# Run on the GPU machine (about 5 minutes): the operator forward's layouts against fla, then the
# GPU correctness checks of the forward. Results under $OUT.
#
#   bash .ci/gpu_op.sh             (carry .fla: the fla + einops wheels, for fla's chunk_linear_attn)
#
# 1. bench_op at T = 32k, 64k, 128k: the Triton forward in the lean layout and the base
#    layout (before it; the default until this has run) in the same run, fla's chunk_linear_attn beside them; each layout's
#    predicted traffic (bench_op.forward_bytes) and the GB/s it implies; per-kernel times of both
#    layouts at PROFILE_T. Alone on the GPU: the tests start after it.
# 2. The full-shape kernel tests, three processes in parallel (each compiles its own kernels):
#    test_kernels' T = 5000 sweep, state and different-length cases; test_forward_variants (lean
#    against the oracle and base at the 340M layer shape, T up to 5000); the P-dtype tests.
# Knobs: OP_LENGTHS, VARIANTS (lean,base), PROFILE_T (32768; 0: none), BENCH_LIMIT / TEST_LIMIT (s),
# TEST_TUNE (0: the tests take one launch configuration per kernel, MHLA_STREAM_TUNE=0; 1: tuned).
set -uo pipefail
export PYTHONUNBUFFERED=1
START=$SECONDS
for d in .fla; do  # fla is not a dependency: installed beside the project
  if ls $d/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
done
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1

timeout ${BENCH_LIMIT:-210} python3 -m mhla_stream.cli.bench_op --lengths ${OP_LENGTHS:-32768,65536,131072} \
  --variants ${VARIANTS:-lean,base} --torch-max 0 --no-decode --profile ${PROFILE_T:-32768} --json $OUT/bench_op.json \
  > $OUT/bench_op.log 2>&1
echo "bench_op rc=$? after $((SECONDS - START)) s"
grep -A8 "^T | " $OUT/bench_op.log
grep -B1 -A12 "per-kernel" $OUT/bench_op.log | grep -v "^-*$" | cut -c1-150 | head -40

run() { name=$1; shift; timeout ${TEST_LIMIT:-130} "$@" > $OUT/$name.log 2>&1; echo "$name rc=$?" >> $OUT/$name.log; }
run t_kernels env MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q tests/test_kernels.py -k "5000 or with_state or different_lengths" &
run t_variants env MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q tests/test_forward_variants.py &
run t_prefix env MHLA_STREAM_TUNE=${TEST_TUNE:-0} python3 -m pytest -q tests/test_prefill_prefix_dtype.py &
wait
for f in $OUT/t_*.log; do echo "== $f"; tail -3 $f; done
echo "total $((SECONDS - START)) s"
