"""What --max-prompt-tokens counts: the tokens one request feeds, with the BOS the engine adds to a text
prompt at position 0 only. So a text prompt of exactly the limit is refused at position 0 (with its BOS
it is one over) and accepted on a session already past position 0 (no BOS there); one more token is
refused there too. The HTTP side does not know a session's position, the engine does and checks
exactly. ``check_prompt_limit`` runs against the one-process server (test_serve.py) and the
``--http-process`` one (test_attack_http.py); here, the pre-check alone, on a stub engine."""
from __future__ import annotations

import httpx
import pytest


def _text_of(tokenizer, n: int) -> str:
    """A text prompt that tokenizes to exactly n tokens (BOS not counted)."""
    k = next(k for k in range(n + 1, 0, -1) if len(tokenizer.encode(" a" * k)) == n)
    return " a" * k


def check_prompt_limit(server, tokenizer, limit: int, headers=None):
    def post(prompt, **extra):
        return httpx.post(server.base + "/v1/completions", headers=headers, timeout=120,
                          json={"prompt": prompt, "max_tokens": 1, "temperature": 0, **extra})

    def refused(r):
        return r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"

    exact, over = _text_of(tokenizer, limit), _text_of(tokenizer, limit + 1)
    # position 0: its BOS counts
    assert refused(post(exact))
    assert post(_text_of(tokenizer, limit - 1)).json()["usage"]["prompt_tokens"] == limit
    assert refused(post(exact, session="limit-new"))  # a new session is at position 0 too (the engine says so)
    assert httpx.get(server.base + "/v1/sessions/limit-new", headers=headers).status_code == 404
    # a session past position 0: no BOS, so exactly the limit is fed; one more is refused, the session unchanged
    sid = "limit-on"
    start = post("Once upon a time", session=sid).json()["session"]["position"]
    r = post(exact, session=sid)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == limit and r.json()["session"]["position"] == start + 1 + limit
    assert refused(post(over, session=sid))
    assert httpx.get(server.base + f"/v1/sessions/{sid}", headers=headers).json()["position"] == start + 1 + limit
    assert post([7] * limit, session=sid).status_code == 200  # token ids never get a BOS


class _StubEngine:
    """Takes no job: a request that passes the HTTP pre-check is answered 429 (told apart from its 400)."""

    def __init__(self, vocab):
        import types
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=vocab))
        self.free = range(1)

    def start(self):
        pass

    def stop(self):
        pass

    def submit(self, job):
        from mhla_stream.serve.schemas import APIError
        raise APIError(429, "stub: past the pre-check")


class _StubStore:
    def flush(self):
        return 0


@pytest.mark.parametrize("bos_id", [1, None], ids=["bos", "no-bos"])
def test_the_http_precheck_counts_a_bos_only_where_the_engine_adds_one(bos_id):
    from fastapi.testclient import TestClient

    from mhla_stream.hub import DEFAULT_MODEL, resolve_model
    from mhla_stream.serve.app import ServerConfig, chat_text, create_app
    from mhla_stream.serve.metrics import Metrics
    from mhla_stream.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(resolve_model(DEFAULT_MODEL))
    tok = Tokenizer(tok._encode, tok._decode, tok.vocab_size, bos_id, tok.eos_id, tok.source, tok.chat)
    bos = int(bos_id is not None)
    messages = [{"role": "user", "content": "hi there"}]
    chat_tokens = len(tok.encode(chat_text(tok, messages, continuing=False)))

    def statuses(limit, *bodies):
        app = create_app(_StubEngine(tok.vocab_size), tok, _StubStore(), Metrics(),
                         ServerConfig("m", max_prompt_tokens=limit))
        with TestClient(app) as client:
            return [client.post("/v1/chat/completions" if "messages" in b else "/v1/completions",
                                json={"max_tokens": 1, **b}).status_code for b in bodies]
    limit = 50
    exact, over = _text_of(tok, limit), _text_of(tok, limit + 1)
    assert statuses(limit, {"prompt": exact}, {"prompt": _text_of(tok, limit - 1)}, {"prompt": [7] * limit},
                    {"prompt": exact, "session": "s"}, {"prompt": exact, "session": "t", "fork_from": "s"},
                    {"prompt": over, "session": "s"}) == [400 if bos else 429, 429, 429, 429, 429, 400]
    # chat without a session: its rendered tokens, plus a BOS where the tokenizer has one
    assert statuses(chat_tokens + bos, {"messages": messages}) == [429]
    assert statuses(chat_tokens + bos - 1, {"messages": messages}) == [400]
