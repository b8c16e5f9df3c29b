source .ci/gpu_lib.sh
cp kernels/triton_skinny.py /tmp/new.py
stamp "## new"; CASES="1:1" ROUNDS=3 timeout 60 python3 .ci/step_probe.py $OUT/b1_ab.json new 2>&1 | grep -v Warn | tail -3
cp .ci/ab/skinny_f199458.py kernels/triton_skinny.py
stamp "## old"; CASES="1:1" ROUNDS=3 timeout 60 python3 .ci/step_probe.py $OUT/b1_ab.json f199458 2>&1 | grep -v Warn | tail -3
cp /tmp/new.py kernels/triton_skinny.py
stamp "## bench"; bench --json $OUT/b1.json
stamp "## tests"; timeout 110 python3 -m pytest -q -p no:logging tests/test_fused_decode.py tests/test_step_picks.py -k "fused-1 or folds_the_final or each_shipped_shape" > $OUT/tests.log 2>&1; tail -3 $OUT/tests.log
stamp done
