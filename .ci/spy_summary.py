"""Summarise a py-spy raw (collapsed-stack) file: samples per thread, then the top frames by self
and by inclusive samples, for mhla-serve's host-time analysis (.ci/gpu_serve_spy.sh)."""
import collections
import sys

incl, self_, threads = collections.Counter(), collections.Counter(), collections.Counter()
total = 0
for line in open(sys.argv[1]):
    stack, count = line.rstrip("\n").rsplit(" ", 1)
    count = int(count)
    total += count
    frames = stack.split(";")
    threads[frames[0]] += count
    self_[frames[-1]] += count
    for f in set(frames[1:]):
        incl[(frames[0][:30], f)] += count
print(f"samples {total}")
for k, v in threads.most_common(6):
    print(f"THREAD {v:6d} {100 * v / total:5.1f}%  {k}")
print("-- self")
for k, v in self_.most_common(30):
    print(f"{v:6d} {100 * v / total:5.1f}%  {k[:140]}")
print("-- inclusive (mhla_stream frames)")
for (t, f), v in incl.most_common(400):
    if "mhla_stream" in f or "uvicorn" in f or "starlette" in f:
        print(f"{v:6d} {100 * v / total:5.1f}%  {t} {f[:120]}")
