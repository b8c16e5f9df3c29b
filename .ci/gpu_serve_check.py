"""GPU check of mhla-serve's CUDA path (bucketed decode graphs, staged prefill graphs): greedy text
from 12 concurrent requests against the same prompts run alone through StreamingMHLA, on the
shipped model in fp32 (one prompt longer than a prefill piece, so it is fed in several pieces, some
while the other streams decode). Prints how many agree (fp32 rounding differs between batched and batch-1
kernels, so a late greedy flip is possible; the first tokens must agree)."""
import concurrent.futures as cf
import socket
import subprocess
import sys
import time

import httpx

from mhla_stream import StreamingMHLA

PROMPTS = [f"Once upon a time, {w} went to the" for w in
           ("a fox", "Tom", "a little bird", "the king", "Lily", "a dog", "the old man", "a girl", "Ben", "a cat",
            "the queen", "Sam")] + ["The old castle " * 90]  # ~270 tokens: more than one prefill piece (256 on CUDA)
SESSION_TURNS = [[f"The {w} sat by the river.", " Then it began to rain, and"] for w in ("fox", "old man", "girl", "cat")]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
START_TIMEOUT_S = 300  # start-up captures every decode bucket and prefill piece as a CUDA graph (~19)
srv = subprocess.Popen([sys.executable, "-m", "mhla_stream.cli.serve", "--port", str(port), "--device", "cuda",
                        "--dtype", "float32", "--max-batch", "16", "--log-level", "info"] + sys.argv[1:])
try:
    t0 = time.monotonic()
    while True:
        if srv.poll() is not None:
            sys.exit(f"mhla-serve exited with status {srv.returncode} during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                print(f"server up after {time.monotonic() - t0:.0f} s", flush=True)
                break
        except httpx.HTTPError:
            pass
        waited = time.monotonic() - t0
        if waited > START_TIMEOUT_S:
            sys.exit(f"mhla-serve did not answer /health within {START_TIMEOUT_S} s")
        if int(waited) % 15 == 0:
            print(f"waiting for the server to start ({waited:.0f} s; capturing CUDA graphs) ...", flush=True)
        time.sleep(1.0)

    def ask(p):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                       json={"prompt": p, "max_tokens": 24, "temperature": 0})
        return r.json()["choices"][0]["text"]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        served = list(ex.map(ask, PROMPTS))

    def ask_session(i):  # two requests on one session, beside the other sessions' requests
        texts = []
        for p in SESSION_TURNS[i]:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                           json={"prompt": p, "max_tokens": 16, "temperature": 0, "session": f"check-{i}"})
            texts.append(r.json()["choices"][0]["text"])
        return texts
    with cf.ThreadPoolExecutor(len(SESSION_TURNS)) as ex:
        served_sessions = list(ex.map(ask_session, range(len(SESSION_TURNS))))
finally:
    srv.terminate()
    srv.wait(timeout=60)
# one stream, reset between prompts: loading and capturing a fresh one per prompt outlasted the time limit
s = StreamingMHLA.from_pretrained(device="cuda", dtype="float32")
alone = []
for p in PROMPTS:
    s.reset()
    alone.append(s.generate(p, max_new_tokens=24, do_sample=False))
alone_sessions = []
for turns in SESSION_TURNS:  # one stream fed turn after turn, as the session's requests were
    s.reset()
    alone_sessions.append([s.generate(p, max_new_tokens=16, do_sample=False) for p in turns])
same_s = sum(a == b for a, b in zip(served_sessions, alone_sessions))
print(f"sessions on CUDA fp32 (2 requests each, concurrent): {same_s}/{len(SESSION_TURNS)} identical to one stream")
for a, b in zip(served_sessions, alone_sessions):
    if a != b:
        print("  served:", a, "\n  alone: ", b)
same = sum(a == b for a, b in zip(served, alone))
prefix = sum(a[:12] == b[:12] for a, b in zip(served, alone))
print(f"serve-vs-alone on CUDA fp32: {same}/{len(PROMPTS)} identical, {prefix}/{len(PROMPTS)} agree on the first 12 chars")
for a, b in zip(served, alone):
    if a != b:
        print("  served:", repr(a), "\n  alone: ", repr(b))
