#!/usr/bin/env bash
# Run on the GPU machine (session 21): the batch-1 step's edges (the one-launch MLP of call1 is in
# one_launch_mlp_attempt.patch). STEPS (space list):
#   tests   GPU tests: RoPE from positions, the folded head, the fused step against the unfused logits, picks
#   edges   .ci/b1_edges_probe.py: A/B in the step of the folded head and the in-kernel RoPE, head shapes
#   b1      batch 1 in two processes (shipped picks)
#   sweep   the GPU-side test files $SWEEP_FILES (within $SWEEP_S)
#   tune    python -m mhla_stream.cli.tune_decode --batch $TB into $OUT/step_picks.json, then batch 1 with it
#   profile the batch-1 step's kernels;  table  the whole decode table (batch 1-128, 2k/32k/128k)
set -uo pipefail
export PYTHONUNBUFFERED=1 MHLA_STREAM_TUNE=0
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
clean() { tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$\|^ *$"; }
ARGS="--model mhla-340m --random-weights --prompt-len 2048 --new-tokens 128 --decode-only --batch 1"
bench() { timeout 120 mhla-bench $ARGS "$@" 2>&1 | clean | grep "^mhla"; }
for step in ${STEPS:-tests edges b1}; do
  case $step in
    sweep) stamp "## GPU sweep: ${SWEEP_FILES}"; timeout ${SWEEP_S:-280} python3 -m pytest -q -p no:logging $SWEEP_FILES \
        > $OUT/sweep.log 2>&1; tail -8 $OUT/sweep.log ;;
    tests) stamp "## tests"; timeout ${TEST_S:-200} python3 -m pytest -q -p no:logging \
        tests/test_step_picks.py tests/test_fused_decode.py tests/test_kernels.py \
        -k "${TESTK:-rope or head or step_picks or unfused_logits or feedback or cuda_graph}" > $OUT/tests.log 2>&1
        tail -6 $OUT/tests.log ;;
    edges) stamp "## edges probe"; timeout ${EDGES_S:-240} python3 .ci/b1_edges_probe.py $OUT/edges_probe.json 2>&1 \
        | grep -v Warn | tee $OUT/edges_probe.log | tail -60 ;;
    b1) for i in 1 2; do stamp "## batch 1, process $i"; bench --json $OUT/b1_$i.json; done ;;
    tune) stamp "## tune_decode --batch ${TB:-1}"; timeout ${TUNE_S:-300} python3 -m mhla_stream.cli.tune_decode \
        --batch ${TB:-1} --passes ${PASSES:-1} --out $OUT/step_picks.json --json $OUT/tune.json 2>&1 | grep -v Warn \
        | grep "pass\|start\|picked\|wrote\|error"
        stamp "## batch 1 with those picks"; MHLA_STREAM_STEP_PICKS=$OUT/step_picks.json bench ;;
    profile) stamp "## profile batch 1"; timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only --batch 1 \
        --steps 10 --json $OUT/profile_b1.json > $OUT/profile_b1.txt 2>&1; grep -A14 "CUDA graph" $OUT/profile_b1.txt | head -16 ;;
    table) stamp "## table"; timeout ${GRID_S:-300} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 --new-tokens 128 --decode-only \
        --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan" ;;
  esac
done
stamp done
