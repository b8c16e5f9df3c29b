#!/usr/bin/env bash
# Runs a GPU command with the compile caches of an earlier call (carry .gpu_cache):
#     bash .ci/gpu_with_cache.sh bash .ci/gpu_serve.sh
# A bare GPU machine compiles every Triton kernel (each tuning candidate too) and every torch.compile'd
# piece on first use: a server start spent 80-130 s capturing its graphs, most of it compiling. Triton's
# cache and inductor's are keyed by source, versions and target, so what one call compiled is reused by
# the next on the same kind of machine. This restores .gpu_cache/gpu_cache.tgz.part* (if carried) into
# TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR, runs the command, then returns the caches as
# $OUT/gpu_cache.tgz.partNN (15 MiB parts; at most MAX_PARTS, 3 by default, else nothing is returned).
# Locally: rm -rf .gpu_cache && mkdir .gpu_cache && cp FILES_AT/gpu_cache.tgz.part* .gpu_cache/
set -uo pipefail
CACHE=${GPU_CACHE_DIR:-/tmp/gpu_cache}
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
if ls .gpu_cache/gpu_cache.tgz.part* > /dev/null 2>&1; then
  cat .gpu_cache/gpu_cache.tgz.part* | tar xzf - -C "$CACHE" && echo "gpu cache restored: $(du -sm "$CACHE" | cut -f1) MiB"
fi
START=$SECONDS
"$@"
RC=$?
echo "command rc $RC after $((SECONDS - START)) s"
if [ -n "${OUT:-}" ]; then
  tar czf /tmp/gpu_cache.tgz -C "$CACHE" triton inductor 2>/dev/null
  MB=$(( $(stat -c %s /tmp/gpu_cache.tgz) / 1048576 ))
  if [ $MB -lt $(( ${MAX_PARTS:-3} * 15 )) ]; then
    split -b 15M -d /tmp/gpu_cache.tgz "$OUT/gpu_cache.tgz.part" && echo "gpu cache returned: $MB MiB compressed"
  else
    echo "gpu cache not returned: $MB MiB compressed is over ${MAX_PARTS:-3} parts of 15 MiB"
  fi
fi
exit $RC
