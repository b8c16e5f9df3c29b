#!/usr/bin/env bash
# Run on the GPU machine (session 23). STEPS (space list):
#   ab      .ci/step_probe.py over kernel builds: VARIANTS (new = the tree; s22 = session 22's
#           skinny and decode kernels, put in .ci/ab/s22 for the call with `git show b1675b7:kernels/...`;
#           skinny22 / decode22 = one of them), in order
#   rows    .ci/rows_probe.py (BATCHES): in-step shapes with this tree's kernels
#   and gpu_lib.sh's: tests (TESTK), b1, profN (profile at batch N), profile, table, sweep, tune
source "$(dirname "$0")/gpu_lib.sh"
cp kernels/triton_skinny.py /tmp/skinny_new.py; cp kernels/triton_decode.py /tmp/decode_new.py
build() {
  cp /tmp/skinny_new.py kernels/triton_skinny.py; cp /tmp/decode_new.py kernels/triton_decode.py
  case $1 in
    s22) cp .ci/ab/s22/triton_skinny.py .ci/ab/s22/triton_decode.py kernels/ ;;
    skinny22) cp .ci/ab/s22/triton_skinny.py kernels/ ;;
    decode22) cp .ci/ab/s22/triton_decode.py kernels/ ;;
  esac
}
for step in ${STEPS:-ab}; do
  case $step in
    ab) for v in ${VARIANTS:-new s22 skinny22 new}; do build $v; stamp "## step probe: $v"
          timeout ${AB_S:-150} python3 .ci/step_probe.py $OUT/step_probe.json $v 2>&1 | grep -v Warn | tail -14; done
        build new ;;
    rows) stamp "## rows probe, batches ${BATCHES:-32}"; BATCHES=${BATCHES:-32} timeout ${ROWS_S:-420} python3 \
        .ci/rows_probe.py $OUT 2>&1 | grep -v Warn | tee $OUT/rows_probe.log | grep -v "^  M" | tail -30 ;;
    *) common_step $step || echo "unknown step $step" ;;
  esac
done
stamp done
