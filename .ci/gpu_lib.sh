# Sourced by the GPU session scripts (from session 21): set-up, helpers, and the runs every session
# repeats. After sourcing: stamp MSG, clean (filters progress bars), bench ARGS... (mhla-bench at
# batch 1 on the 2k prompt), and common_step NAME (profile, table, sweep, tune) which returns 1 for
# a name it does not know. Also: profN (the profile at batch N), b1 (mhla-bench batch 1 in two
# processes), tests (GPU tests of the step picks and the fused step; TESTK, TEST_S).
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
clean() { tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$"; }
ARGS="--model mhla-340m --random-weights --prompt-len 2048 --new-tokens 128 --decode-only --batch 1"
bench() { timeout 120 mhla-bench $ARGS "$@" 2>&1 | clean | grep "^mhla"; }

common_step() {
  case $1 in
    profile|prof[0-9]*) b=${1#prof}; [ "$1" = profile ] && b=1; stamp "## profile batch $b"; timeout 150 python3 \
        -m mhla_stream.cli.profile_model --decode-only --batch $b --steps 10 --json $OUT/profile_b$b.json \
        > $OUT/profile_b$b.txt 2>&1; grep -A14 "CUDA graph" $OUT/profile_b$b.txt | head -16 ;;
    b1) for i in 1 2; do stamp "## batch 1, process $i"; bench --json $OUT/b1_$i.json; done ;;
    tests) stamp "## tests"; timeout ${TEST_S:-240} python3 -m pytest -q -p no:logging \
        tests/test_step_picks.py tests/test_fused_decode.py -k "${TESTK:-step_picks or unfused_logits or token_form}" \
        > $OUT/tests.log 2>&1; tail -6 $OUT/tests.log ;;
    table) stamp "## table"; timeout ${GRID_S:-300} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 --new-tokens 128 --decode-only \
        --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan" ;;
    sweep) stamp "## GPU sweep: ${SWEEP_FILES}"; timeout ${SWEEP_S:-280} python3 -m pytest -q -p no:logging $SWEEP_FILES \
        > $OUT/sweep.log 2>&1; tail -8 $OUT/sweep.log ;;
    tune) stamp "## tune_decode --batch ${TB:-1}"; timeout ${TUNE_S:-300} python3 -m mhla_stream.cli.tune_decode \
        --batch ${TB:-1} --passes ${PASSES:-1} --out $OUT/step_picks.json --json $OUT/tune.json 2>&1 | grep -v Warn \
        | grep "pass\|start\|picked\|wrote\|error"
        stamp "## batch 1 with those picks"; MHLA_STREAM_STEP_PICKS=$OUT/step_picks.json bench ;;
    *) return 1 ;;
  esac
}
