#!/usr/bin/env bash
# Run on the GPU machine (session 21): the batch-1 step's edges (the one-launch MLP of call1 is in
# one_launch_mlp_attempt.patch). STEPS (space list):
#   tests   GPU tests: RoPE from positions, the folded head, the fused step against the unfused logits, picks
#   edges   .ci/b1_edges_probe.py: A/B in the step of the folded head and the in-kernel RoPE, head shapes
#   b1      batch 1 in two processes (shipped picks)
#   and gpu_lib.sh's: profile, table, sweep, tune
source "$(dirname "$0")/gpu_lib.sh"
for step in ${STEPS:-tests edges b1}; do
  case $step in
    tests) stamp "## tests"; timeout ${TEST_S:-200} python3 -m pytest -q -p no:logging \
        tests/test_step_picks.py tests/test_fused_decode.py tests/test_kernels.py \
        -k "${TESTK:-rope or head or step_picks or unfused_logits or feedback or cuda_graph}" > $OUT/tests.log 2>&1
        tail -6 $OUT/tests.log ;;
    edges) stamp "## edges probe"; timeout ${EDGES_S:-240} python3 .ci/b1_edges_probe.py $OUT/edges_probe.json 2>&1 \
        | grep -v Warn | tee $OUT/edges_probe.log | tail -60 ;;
    b1) for i in 1 2; do stamp "## batch 1, process $i"; bench --json $OUT/b1_$i.json; done ;;
    *) common_step $step || echo "unknown step $step" ;;
  esac
done
stamp done
