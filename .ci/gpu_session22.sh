#!/usr/bin/env bash
# Run on the GPU machine (session 22). STEPS (space list):
#   rows    .ci/rows_probe.py: whole-slice tensor-core shapes in the fused step (BATCHES, default 8,32)
#   dshape  .ci/decode_shape_probe.py: the decode kernel's BV and warps in the fused step (BATCHES)
#   and gpu_lib.sh's: tests (GPU tests of the step picks and the fused step; TESTK), b1 (two
#   processes), profN (the decode step's profile at batch N), profile, table, sweep, tune
source "$(dirname "$0")/gpu_lib.sh"
TESTK=${TESTK:-step_picks or unfused_logits}  # this session's test selection
for step in ${STEPS:-rows}; do
  case $step in
    rows) stamp "## rows probe, batches ${BATCHES:-8,32}"; timeout ${ROWS_S:-420} python3 .ci/rows_probe.py $OUT 2>&1 \
        | grep -v Warn | tee $OUT/rows_probe.log | grep -v "^  M" | tail -40 ;;
    dshape) stamp "## decode kernel shapes in the fused step"; timeout ${DSHAPE_S:-300} python3 .ci/decode_shape_probe.py \
        $OUT/decode_shape.json 2>&1 | grep -v Warn | tee $OUT/decode_shape.log | tail -40 ;;
    *) common_step $step || echo "unknown step $step" ;;
  esac
done
stamp done
