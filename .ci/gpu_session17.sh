#!/usr/bin/env bash
# Run on the GPU machine (session 17): the decode kernel's block close spread over close programs
# (kernels/triton_decode.py) against session 16's kernel (.ci/ab/triton_decode_s16.py): the
# per-layer probe (.ci/gpu_close_probe.py), mhla-bench with each kernel, GPU tests, profiles.
# STEPS picks the runs (names below); results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
OLD='
import importlib.util, sys
spec = importlib.util.spec_from_file_location("s16", ".ci/ab/triton_decode_s16.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
import mhla_stream.modeling as m
m.decode_into = old.decode_into
from mhla_stream.cli.bench import main
main()'
clean() { tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$"; }
ARGS="--model mhla-340m --random-weights --prompt-len ${PROMPT:-2048} --new-tokens ${NEW:-128} --decode-only"
bench() {  # name, env, command...
  local name=$1 envs=$2; shift 2
  stamp "## $name ($envs), batch ${BATCHES:-1,8,32,128}"
  env $envs timeout ${BENCH_S:-200} "$@" $ARGS --batch ${BATCHES:-1,8,32,128} --json $OUT/bench_$name.json 2>&1 | clean \
    | grep -v "^model\|^# plan" | tail -${TAIL:-8}
}
for step in ${STEPS:-}; do
  case $step in
    probe) stamp "## close probe"; timeout ${PROBE_S:-300} python3 .ci/gpu_close_probe.py 2>&1 | grep -v Warn \
        | tee $OUT/close_probe.log ;;
    new) bench new X=1 mhla-bench ;;
    old) bench old X=1 python3 -c "$OLD" ;;
    table) stamp "## table"; timeout ${GRID_S:-400} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 --new-tokens 128 --decode-only \
        --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan" ;;
  esac
done
[ -n "${TESTS:-}" ] && stamp "## tests" && timeout ${TEST_S:-300} python3 -m pytest -q -x -p no:logging $TESTS \
  > $OUT/tests.log 2>&1; tail -25 $OUT/tests.log 2>/dev/null
for spec in ${PROFILES:-}; do  # batch:on|off|auto
  b=${spec%%:*}; f=${spec##*:}; stamp "## profile batch $b fused=$f"
  timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only --batch $b --steps 10 --fused-decode $f \
    --json $OUT/profile_b${b}_$f.json > $OUT/profile_b${b}_$f.txt 2>&1; grep -A14 "CUDA graph" $OUT/profile_b${b}_$f.txt | head -16
done
stamp done
exit 0
