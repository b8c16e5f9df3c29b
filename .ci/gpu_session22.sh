#!/usr/bin/env bash
# Run on the GPU machine (session 22). STEPS (space list):
#   rows    .ci/rows_probe.py: whole-slice tensor-core shapes in the fused step (BATCHES, default 8,32)
#   dshape  .ci/decode_shape_probe.py: the decode kernel's BV and warps in the fused step (BATCHES)
#   tests   GPU tests of the step picks and the fused step against the unfused logits (TESTK)
#   b1      batch 1 in two processes (shipped picks)
#   prof8, prof32   the decode step's profile at batch 8 / 32
#   and gpu_lib.sh's: profile, table, sweep, tune
source "$(dirname "$0")/gpu_lib.sh"
for step in ${STEPS:-rows}; do
  case $step in
    rows) stamp "## rows probe, batches ${BATCHES:-8,32}"; timeout ${ROWS_S:-420} python3 .ci/rows_probe.py $OUT 2>&1 \
        | grep -v Warn | tee $OUT/rows_probe.log | grep -v "^  M" | tail -40 ;;
    dshape) stamp "## decode kernel shapes in the fused step"; timeout ${DSHAPE_S:-300} python3 .ci/decode_shape_probe.py \
        $OUT/decode_shape.json 2>&1 | grep -v Warn | tee $OUT/decode_shape.log | tail -40 ;;
    tests) stamp "## tests"; timeout ${TEST_S:-200} python3 -m pytest -q -p no:logging \
        tests/test_step_picks.py tests/test_fused_decode.py \
        -k "${TESTK:-step_picks or unfused_logits}" > $OUT/tests.log 2>&1; tail -6 $OUT/tests.log ;;
    prof8|prof32) b=${step#prof}; stamp "## profile batch $b"; timeout 150 python3 -m mhla_stream.cli.profile_model \
        --decode-only --batch $b --steps 10 --json $OUT/profile_b$b.json > $OUT/profile_b$b.txt 2>&1
        grep -A14 "CUDA graph" $OUT/profile_b$b.txt | head -16 ;;
    b1) for i in 1 2; do stamp "## batch 1, process $i"; bench --json $OUT/b1_$i.json; done ;;
    *) common_step $step || echo "unknown step $step" ;;
  esac
done
stamp done
