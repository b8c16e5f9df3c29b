#!/usr/bin/env bash
# Run on the GPU machine (session 18): variants of the batched decode step (.ci/ab/variants18.py,
# picked by X18) under mhla-bench, GPU tests, profiles, the decode table, mhla-serve throughput.
# VARIANTS = "name|X18|ENV=VAL,..." entries (AB=variants19: the batch-1 variants, X19); STEPS (table, b1picks, gluon, serve) picks the other runs; results in $OUT.
source "$(dirname "$0")/gpu_lib.sh"  # (set-up, stamp, clean; ARGS is set again below)
ARGS="--model mhla-340m --random-weights --prompt-len ${PROMPT:-2048} --new-tokens ${NEW:-128} --decode-only"
for spec in ${VARIANTS:-}; do  # name|x18list|ENV=VAL,ENV=VAL
  IFS='|' read -r name x18 extra <<< "$spec"
  envs="X18=$x18 X19=$x18 ${extra//,/ }"
  stamp "## $name ($envs), batch ${BATCHES:-8,32,64}"
  env $envs timeout ${BENCH_S:-150} python3 .ci/ab/${AB:-variants18}.py $ARGS --batch ${BATCHES:-8,32,64} \
    --json $OUT/bench_$name.json 2>&1 | clean | grep -v "^model\|^# plan" | tail -${TAIL:-6}
done
for step in ${STEPS:-}; do
  case $step in
    table) stamp "## table"; timeout ${GRID_S:-450} mhla-bench --model mhla-340m --random-weights \
        --prompt-len 2048,32768,131072 --batch 1,8,32,64,128 --new-tokens 128 --decode-only \
        --json $OUT/decode_table.json 2>&1 | clean | tee $OUT/decode_table.log | grep -v "^# plan" ;;
    b1picks) for i in 1 2 3; do stamp "## batch 1, process $i (tuned picks in the JSON)"  # the tuner's process-to-process spread
        timeout 120 mhla-bench $ARGS --batch 1 --json $OUT/b1_process$i.json 2>&1 | clean | grep "^mhla"; done ;;
    gluon) for d in 1024 2048; do stamp "## gluon stage probe, [$d, $d] stages"  # TMA-streamed chain against launches
        timeout ${GLUON_S:-150} python3 .ci/gluon_stage_probe.py --dim $d --json $OUT/gluon_probe_$d.json 2>&1 | grep -v Warn | tail -24; done ;;
    serve) stamp "## serve"; timeout ${SERVE_S:-200} bash .ci/gpu_serve.sh 2>&1 | tail -30 ;;
  esac
done
[ -n "${TESTS:-}" ] && stamp "## tests" && timeout ${TEST_S:-300} python3 -m pytest -q -p no:logging $TESTS \
  > $OUT/tests.log 2>&1; tail -25 $OUT/tests.log 2>/dev/null
for spec in ${PROFILES:-}; do  # batch:on|off|auto
  b=${spec%%:*}; f=${spec##*:}; stamp "## profile batch $b fused=$f"
  timeout 120 python3 -m mhla_stream.cli.profile_model --decode-only --batch $b --steps 10 --fused-decode $f \
    --json $OUT/profile_b${b}_$f.json > $OUT/profile_b${b}_$f.txt 2>&1; grep -A14 "CUDA graph" $OUT/profile_b${b}_$f.txt | head -16
done
stamp done
exit 0
