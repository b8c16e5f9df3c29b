"""mhla-serve through the official openai client and raw HTTP: API shape, exactness under batching,
sessions equal to one StreamingMHLA, hostile input, disconnects, faults and a bounded load test.
One server process serves the whole module (start-up is the expensive part)."""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest

from serve_util import Server

openai = pytest.importorskip("openai")

KEY = "test-key-123"
MODEL = "mhla-stories-17m"
PROMPTS = ["Once upon a time", "The little dog ran to the park and", "Tom had a red ball.", "She said hello",
           "One day, a cat", "The sun was hot", "Lily and Ben went", "There was a big tree"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server("--max-batch", 8, "--max-prompt-tokens", 200, "--api-key", KEY, env={"MHLA_SERVE_FAULT_INJECTION": "1"},
               log=log)
    yield s
    assert s.terminate() == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.base + path, content=raw, headers=headers, timeout=120)
    return httpx.post(server.base + path, json=body, headers=headers, timeout=120)


def complete(client, prompt, n=8, **extra):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, extra_body=extra or None)
    return r.choices[0].text


def test_completions_plain_and_streamed(client, ref):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode("Once upon a time", add_bos=True))
    ref.reset()
    assert r.choices[0].text == ref.generate("Once upon a time", max_new_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_string_and_finish_reason(client, ref):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stop=["."])
    ref.reset()
    assert r.choices[0].text == ref.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=["."])
    assert r.choices[0].finish_reason == "stop" and "." not in r.choices[0].text


def test_chat_plain_and_streamed(client):
    msgs = [{"role": "user", "content": "Tell me a story about a fox."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert client.models.list().data[0].id == MODEL


def test_sampling_with_seed_repeats(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.9, seed=7,
              extra_body={"top_k": 20, "repetition_penalty": 1.2})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_16_concurrent_equal_sequential(client):
    prompts = (PROMPTS * 2)[:16]
    alone = [complete(client, p) for p in prompts]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: complete(client, p), prompts))
    assert together == alone


def test_session_equals_one_stream(client, ref):
    settings = dict(temperature=0, repetition_penalty=1.3, stop=["!"])
    ref.reset()
    want = [ref.generate("Once upon a time", max_new_tokens=16, **settings),
            ref.generate(" Then the dog", max_new_tokens=16, **settings)]
    got = []
    for prompt in ("Once upon a time", " Then the dog"):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=["!"],
                                      extra_body={"session": "story-1", "repetition_penalty": 1.3})
        got.append(r.choices[0].text)
    assert got == want
    assert r.model_extra["session"]["position"] == ref.position


def test_fork_gives_independent_continuations(server, client, ref):
    complete(client, "Once upon a time", session="base")
    ref.reset()
    ref.generate("Once upon a time", max_new_tokens=8, temperature=0)
    snap = ref.snapshot()
    a = complete(client, " The cat", session="fork-a", fork_from="base")
    b = complete(client, " A big bird", session="fork-b", fork_from="base")
    assert a == ref.generate(" The cat", max_new_tokens=8, temperature=0)
    ref.restore(snap)
    assert b == ref.generate(" A big bird", max_new_tokens=8, temperature=0)
    ref.restore(snap)
    assert complete(client, " The cat", session="base") == a  # the source was not touched by its forks
    r = post(server, "/v1/completions", {"prompt": "x", "session": "fork-a", "fork_from": "base"})
    assert r.status_code == 409  # forking into an existing id


def test_chat_session_feeds_only_new_messages(client, ref):
    from mhla_stream.serve.schemas import PLAIN_CHAT_STOP, render_plain_chat
    msgs = [{"role": "user", "content": "Hi, who are you?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                        extra_body={"session": "chat-1"}).choices[0].message.content
    msgs += [{"role": "assistant", "content": r1}, {"role": "user", "content": "Tell me more."}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                        extra_body={"session": "chat-1"}).choices[0].message.content
    ref.reset()
    kw = dict(max_new_tokens=12, temperature=0, stop=[PLAIN_CHAT_STOP])
    assert r1 == ref.generate(render_plain_chat(msgs[:1], False), **kw)
    assert r2 == ref.generate(render_plain_chat(msgs[2:], True), **kw)


def test_sessions_list_get_delete(server, client):
    complete(client, "Hello", session="to-delete")
    ids = [s["id"] for s in client.get("/sessions", cast_to=object)["data"]]
    assert "to-delete" in ids
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.base + "/v1/sessions/to-delete", headers=h).json()["position"] > 0
    assert httpx.delete(server.base + "/v1/sessions/to-delete", headers=h).status_code == 200
    assert httpx.delete(server.base + "/v1/sessions/to-delete", headers=h).status_code == 404


BAD_BODIES = [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -3]}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": "x", "session": "a\x00b"}, "session"),
    ({"prompt": "x", "session": "s" * 300}, "session"),
    ({"prompt": "x", "session": ""}, "session"),
    ({"prompt": "word " * 400}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_input_is_400_with_openai_body(server, body, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_malformed_and_odd_requests(server):
    for raw in (b"{bad json", b"", b"[1, 2]", b"\xff\xfe"):
        r = post(server, "/v1/completions", None, raw=raw)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(server, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = post(server, "/v1/completions", {"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logit_bias": {}, "user": "u", "foo": 1})
    assert r.status_code == 200  # unknown OpenAI fields are ignored


def test_prompt_limit_counts_a_bos_only_at_position_0(server, ref):
    from test_serve_prompt_limit import check_prompt_limit
    check_prompt_limit(server, ref.tokenizer, 200, {"Authorization": f"Bearer {KEY}"})


def test_api_key(server):
    for key in (None, "wrong", KEY + "x", ""):
        r = post(server, "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base + "/v1/models").status_code == 401
    assert httpx.get(server.base + "/health").status_code == 200


def test_session_ids_never_become_paths(server, client, tmp_path):
    for sid in ("../x", "/etc/passwd", "..\\..\\boot.ini", "a/../../b", "~root"):
        complete(client, "Hi", n=1, session=sid)
    ids = {s["id"] for s in client.get("/sessions", cast_to=object)["data"]}
    assert {"../x", "/etc/passwd", "a/../../b"} <= ids
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.delete(server.base + "/v1/sessions/" + "%2Fetc%2Fpasswd", headers=h).status_code == 200
    assert httpx.get(server.base + "/v1/sessions/a%00b", headers=h).status_code == 400


def test_one_request_per_session_at_a_time(server, client):
    body = {"prompt": "Once upon a time", "max_tokens": 100000, "stream": True, "session": "busy",
            "ignore_eos": True}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as r:
        lines = r.iter_lines()
        first = next(lines)  # the first event: the request holds the session now
        assert r.status_code == 200 and first.startswith("data: {\"id\""), first
        second = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "session": "busy"})
        assert second.status_code == 409 and second.json()["error"]["code"] == "session_busy"\
            , (second.text, server.health(), list(lines)[-4:])
    server.wait_until(lambda h: h["running"] == 0)
    # the cancelled request left the session as it was (fresh); the next one is served normally
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "session": "busy"}).status_code == 200


def test_disconnect_mid_stream_frees_the_slot(server, client):
    streams = [client.completions.create(model=MODEL, prompt=p, max_tokens=5000, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
               for p in PROMPTS]  # as many as there are slots
    for s in streams:
        next(iter(s))
        s.close()
    server.wait_until(lambda h: h["running"] == 0 and h["free_slots"] == 8)
    assert complete(client, "Once upon a time", n=2)


def test_fault_in_one_request_fails_only_it(server, client):
    from mhla_stream.serve.engine import FAULT_MARK

    def good():
        return complete(client, "The sun was hot", n=12)
    want = good()
    with cf.ThreadPoolExecutor(3) as pool:
        bad = pool.submit(post, server, "/v1/completions", {"prompt": FAULT_MARK, "max_tokens": 12})
        goods = [pool.submit(good), pool.submit(good)]
        assert bad.result().status_code == 500 and bad.result().json()["error"]["type"] == "server_error"
        assert [g.result() for g in goods] == [want, want]


def test_metrics(server, client):
    complete(client, "Hi", n=2)
    text = httpx.get(server.base + "/metrics").text
    for name in ("mhla_requests_total", "mhla_prompt_tokens_total", "mhla_generated_tokens_total",
                 "mhla_running_sequences", "mhla_queued_requests", "mhla_time_to_first_token_seconds_bucket",
                 "mhla_inter_token_latency_seconds_bucket", 'mhla_sessions{tier="host"}', "mhla_session_bytes"):
        assert name in text


def test_bounded_load(server, client):
    """200 requests, 32 at a time (20 of them two turns on a session of their own): no failure, no lost session."""
    def one(i):
        if i % 10 == 0:
            for turn in range(2):
                usage = client.completions.create(model=MODEL, prompt=f" step {turn}.", max_tokens=2, temperature=0,
                                                  extra_body={"session": f"load-{i}"}).usage
            return usage
        return client.completions.create(model=MODEL, prompt=PROMPTS[i % 8], max_tokens=2, temperature=0).usage
    with cf.ThreadPoolExecutor(32) as pool:
        usages = list(pool.map(one, range(200)))
    assert len(usages) == 200 and all(u.completion_tokens >= 0 for u in usages)
    sessions = {s["id"]: s for s in client.get("/sessions", cast_to=object)["data"]}
    assert all(f"load-{i}" in sessions and sessions[f"load-{i}"]["position"] > 0 for i in range(0, 200, 10))
    assert server.health()["running"] == 0
    assert json.loads(httpx.get(server.base + "/health").text)["status"] == "ok"
