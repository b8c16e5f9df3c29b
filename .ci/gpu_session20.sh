#!/usr/bin/env bash
# Run on the GPU machine (session 20): the one-row picks chosen in the decode step. STEPS (space list):
#   tests   the GPU tests of the picks and the batch-1 fused step against the unfused logits
#   b1      batch 1 in three processes with the shipped picks, one with MHLA_STREAM_STEP_PICKS=0
#   tune    python -m mhla_stream.cli.tune_decode --batch $TB into $OUT/step_picks.json
#   ab      batches $AB_B with the picks of tune, and with none (MHLA_STREAM_STEP_PICKS=0)
#   dshape  the decode kernel's launch shape at batch 1, timed in the step (.ci/b1_decode_shape_probe.py)
#   profile the batch-1 step's kernels;  table  the whole decode table (batch 1-128, 2k/32k/128k)
source "$(dirname "$0")/gpu_lib.sh"  # (set-up, stamp, clean; ARGS is set again below)
ARGS="--model mhla-340m --random-weights --prompt-len 2048 --new-tokens 128 --decode-only --batch 1"
for step in ${STEPS:-tests b1}; do
  case $step in
    tests) stamp "## tests"; timeout ${TEST_S:-200} python3 -m pytest -q -p no:logging tests/test_step_picks.py \
        tests/test_fused_decode.py tests/test_kernels.py \
        -k "${TESTK:-step_picks or unfused_logits or feedback or cuda_graph}" > $OUT/tests.log 2>&1
        tail -6 $OUT/tests.log ;;
    b1) for i in 1 2 3; do stamp "## batch 1, shipped picks, process $i"
        timeout 120 mhla-bench $ARGS --json $OUT/b1_picks$i.json 2>&1 | clean | grep "^mhla"; done
        stamp "## batch 1, MHLA_STREAM_STEP_PICKS=0 (each product tuned alone)"
        MHLA_STREAM_STEP_PICKS=0 timeout 120 mhla-bench $ARGS --json $OUT/b1_alone.json 2>&1 | clean | grep "^mhla" ;;
    tune) stamp "## tune_decode --batch ${TB:-1,8}"; timeout ${TUNE_S:-300} python3 -m mhla_stream.cli.tune_decode \
        --batch ${TB:-1,8} --passes ${PASSES:-1} --out $OUT/step_picks.json --json $OUT/tune.json 2>&1 | grep -v Warn \
        | grep "pass\|start\|picked\|wrote\|error" ;;
    ab) for b in ${AB_B:-8}; do for p in $OUT/step_picks.json 0; do stamp "## batch $b, MHLA_STREAM_STEP_PICKS=$p"
        MHLA_STREAM_STEP_PICKS=$p timeout 120 mhla-bench ${ARGS% --batch 1} --batch $b 2>&1 | clean | grep "^mhla"; done; done ;;
    dshape) stamp "## decode kernel shapes in the step"; timeout 150 python3 .ci/b1_decode_shape_probe.py $OUT/decode_shapes.json \
        2>&1 | grep -v Warn | tail -30 ;;
    profile) stamp "## profile batch 1"; timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only --batch 1 \
        --steps 10 --json $OUT/profile_b1.json > $OUT/profile_b1.txt 2>&1; grep -A14 "CUDA graph" $OUT/profile_b1.txt | head -16 ;;
    table) stamp "## table"; timeout ${GRID_S:-300} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 --new-tokens 128 --decode-only \
        --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan" ;;
  esac
done
stamp done
