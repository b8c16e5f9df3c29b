#!/usr/bin/env bash
# Run on the GPU machine (session 24). STEPS (space list):
#   caps    .ci/caps_probe.py (BATCHES, CAPS, DCAPS): register caps on the shipped picks and the decode kernel
#   streams .ci/streams_probe.py: a step as 2 or 4 chains of rows on concurrent streams
#   warps   the decode kernel at 4 and 2 warps in the fused step (WB: batches)
#   ab      .ci/step_probe.py over kernel builds in .ci/ab/VARIANT/ (VARIANTS; "new" = the tree)
#   and gpu_lib.sh's: tests (TESTK), b1, profN (profile at batch N), profile, table, sweep, tune
source "$(dirname "$0")/gpu_lib.sh"
mkdir -p /tmp/tree && cp kernels/*.py /tmp/tree/
for step in ${STEPS:-caps}; do
  case $step in
    caps) stamp "## caps probe, batches ${BATCHES:-32,8,1}"; timeout ${CAPS_S:-480} python3 .ci/caps_probe.py $OUT 2>&1 \
        | grep -v Warn | tee $OUT/caps_probe.log | grep "^\[\|decode\|failed" | tail -40 ;;
    streams) stamp "## streams probe"; timeout ${STREAMS_S:-200} python3 .ci/streams_probe.py $OUT/streams.json 2>&1 \
        | grep -v Warn | tee $OUT/streams.log | tail -14 ;;
    warps) stamp "## decode kernel warps, batches ${WB:-16,24,32}"; BATCHES=${WB:-16,24,32} SHAPES="None:4 None:2 None:4 None:2" \
        timeout ${WARPS_S:-150} python3 .ci/decode_shape_probe.py $OUT/warps.json 2>&1 | grep -v Warn | tail -14 ;;
    ab) for v in ${VARIANTS:-new}; do cp /tmp/tree/*.py kernels/; [ "$v" = new ] || cp .ci/ab/$v/*.py kernels/
          stamp "## step probe: $v"; timeout ${AB_S:-150} python3 .ci/step_probe.py $OUT/step_probe.json $v 2>&1 \
          | grep -v Warn | tail -14; done; cp /tmp/tree/*.py kernels/ ;;
    *) common_step $step || echo "unknown step $step" ;;
  esac
done
stamp done
