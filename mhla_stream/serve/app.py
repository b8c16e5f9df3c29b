"""FastAPI routes: OpenAI-compatible completions and chat (plain and server-sent events), models,
sessions, health and metrics; API-key check; every error as an OpenAI error body."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from .jobs import Job  # not .engine: the HTTP process (--http-process) needs no runner
from .schemas import PLAIN_CHAT_STOP, APIError, ChatRequest, CompletionRequest, check_session_id, error_body, \
    render_plain_chat
from .sessions import SessionBusy, SessionMissing

DISCONNECT_POLL_S = 0.5
log = logging.getLogger("mhla_stream.serve")


class ServerConfig:
    def __init__(self, model_name: str, api_key: str | None = None, max_prompt_tokens: int = 65536,
                 default_max_tokens: int = 16, default_chat_max_tokens: int = 256):
        self.model_name, self.api_key, self.max_prompt_tokens = model_name, api_key, max_prompt_tokens
        self.default_max_tokens, self.default_chat_max_tokens = default_max_tokens, default_chat_max_tokens


class AuthAndCount:
    """Pure ASGI middleware (a BaseHTTPMiddleware would get in the way of streaming and disconnects):
    the API key on /v1 (constant-time comparison), and requests counted by endpoint and status."""

    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = "/v1/sessions/*" if path.startswith("/v1/sessions/") else path
        if self.api_key is not None and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key.encode()):
                self.metrics.requests.labels(endpoint, "401").inc()
                body = error_body("missing or wrong API key (send 'Authorization: Bearer <key>')",
                                  "authentication_error", code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(loc)
    return (f"{where}: {err.get('msg')}" if where else str(err.get("msg"))), (loc[0] if loc else None)


def create_app(engine, tokenizer, store, metrics, config: ServerConfig, on_shutdown=None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)
        await run_in_threadpool(store.flush)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="mhla-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # -- errors --------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        log.error("internal error", exc_info=exc)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    app.add_middleware(AuthAndCount, api_key=config.api_key, metrics=metrics)

    # -- helpers -------------------------------------------------------------------------------------
    def sampling(req) -> SamplingParams:
        return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              repetition_penalty=req.repetition_penalty, seed=req.seed, stop=list(req.stop or []),
                              do_sample=req.temperature > 0, max_new_tokens=0,
                              stop_at_eos=not req.ignore_eos)

    def check_model(req):
        if req.model not in (None, "", config.model_name):
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    async def next_events(box: "Mailbox", request, job) -> list:
        """Every event waiting for this request (at least one); polls for a gone client meanwhile."""
        while True:
            events = await box.wait(DISCONNECT_POLL_S)
            if events:
                return events
            if await request.is_disconnected():
                job.cancelled.set()
                raise asyncio.CancelledError

    async def run_job(job: Job, request: Request, stream: bool, chunk_of, final_of, usage_chunk: bool):
        loop = asyncio.get_running_loop()
        box = Mailbox(loop)
        job.emit = lambda kind, payload: loop.call_soon_threadsafe(box.put_nowait, (kind, payload))
        job.sink = (loop, box)
        engine.submit(job)
        try:
            events = await next_events(box, request, job)
        except BaseException:
            job.cancelled.set()
            raise
        (kind, payload), backlog = events[0], events[1:]  # the first event is "start" or "error"
        if kind == "error":
            raise payload
        metrics.tokens_in.inc(payload["prompt_tokens"])
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": config.model_name}
        if not stream:
            pieces = []
            try:
                batch = backlog
                while True:
                    for kind, payload in batch:
                        if kind == "text":
                            pieces.append(payload)
                        elif kind == "error":
                            raise payload
                        else:
                            return {**head, **final_of("".join(pieces), payload), "usage": _usage(payload)}
                    batch = await next_events(box, request, job)
            except BaseException:
                job.cancelled.set()
                raise

        # a text chunk is this template with only the text filled in: one escape of the text, not a
        # dict built and serialised per chunk (the bytes are the same as json.dumps of the whole chunk)
        before, after = _template_of({**head, **chunk_of(_TEXT_MARK, None)})
        text_prefix, text_suffix = "data: " + before, after + "\n\n"

        async def events():
            try:
                first = chunk_of(None, None)
                if first is not None:
                    yield _sse({**head, **first})
                batch = backlog
                while True:
                    # every event already queued, text pieces joined into one chunk: when the loop falls
                    # behind the engine it sends fewer, larger chunks instead of a growing backlog
                    if not batch:
                        batch = await next_events(box, request, job)
                    text = "".join([p for k, p in batch if k == "text"])
                    if text:
                        yield text_prefix + json.dumps(text, ensure_ascii=False) + text_suffix
                    kind, payload = next(((k, p) for k, p in batch if k != "text"), ("text", None))
                    batch = []
                    if kind == "text":
                        continue
                    if kind == "error":
                        yield _sse(payload.body())
                        break
                    else:
                        yield _sse({**head, **chunk_of("", payload["finish_reason"])})
                        if usage_chunk:
                            yield _sse({**head, **chunk_of(None, None, empty=True), "usage": _usage(payload)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a client gone mid-stream: the engine frees the slot at its next turn

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- OpenAI endpoints ----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        params = sampling(req)
        params.max_new_tokens = req.new_tokens(config.default_max_tokens)
        if isinstance(req.prompt, str):
            ids, add_bos = await run_in_threadpool(tokenizer.encode, req.prompt), True
        else:
            ids, add_bos = list(req.prompt), False
            vocab = min(tokenizer.vocab_size, engine.model.config.vocab_size)
            if ids and max(ids) >= vocab:
                raise APIError(400, f"prompt: token ids must be < {vocab}", param="prompt")
        # the limit counts the tokens this request feeds, with the BOS the engine adds at position 0 only
        # (README). Without a session that is now; a session's position is known to the engine alone,
        # which checks exactly (engine ``_start``): this early check leaves it the BOS it may not add
        bos = add_bos and req.session is None and tokenizer.bos_id is not None
        _check_length(len(ids) + bos, config.max_prompt_tokens)
        job = Job(params, None, ids=ids, add_bos=add_bos, session=req.session, fork_from=req.fork_from,
                  max_prompt_tokens=config.max_prompt_tokens)

        def chunk_of(text, finish, empty=False):
            if text is None and finish is None and not empty:
                return None
            choices = [] if empty else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
            return {"object": "text_completion", "choices": choices}

        def final_of(text, done):
            return {"object": "text_completion", **_session_field(req, done),
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}]}

        return await run_job(job, request, req.stream, chunk_of, final_of, req.include_usage())

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req)
        params = sampling(req)
        params.max_new_tokens = req.new_tokens(config.default_chat_max_tokens)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        if tokenizer.chat is None:
            params.stop = params.stop + [PLAIN_CHAT_STOP]

        render = ChatRender(messages, tokenizer.chat is not None, tokenizer)
        if req.session is None:  # no session: the prompt's length is known now
            text, _ = render([])
            bos = tokenizer.bos_id is not None  # added by the engine at position 0, as for a text prompt
            _check_length(len(await run_in_threadpool(tokenizer.encode, text)) + bos, config.max_prompt_tokens)
        job = Job(params, None, render=render, session=req.session, fork_from=req.fork_from,
                  max_prompt_tokens=config.max_prompt_tokens)

        def chunk_of(text, finish, empty=False):
            if empty:
                return {"object": "chat.completion.chunk", "choices": []}
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final_of(text, done):
            return {"object": "chat.completion", **_session_field(req, done),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                 "finish_reason": done["finish_reason"]}]}

        return await run_job(job, request, req.stream, chunk_of, final_of, req.include_usage())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "mhla-stream"}]}

    # -- sessions ------------------------------------------------------------------------------------
    @app.get("/v1/sessions")
    async def list_sessions():
        return {"object": "list", "data": await run_in_threadpool(store.describe)}

    @app.get("/v1/sessions/{session_id:path}")
    async def get_session(session_id: str):
        found = await run_in_threadpool(store.describe, _path_session_id(session_id))
        if not found:
            raise APIError(404, f"no session {session_id!r}", param="session", code="session_not_found")
        return found[0]

    @app.delete("/v1/sessions/{session_id:path}")
    async def delete_session(session_id: str):
        sid = _path_session_id(session_id)
        try:
            await run_in_threadpool(store.delete, sid)
        except SessionMissing as e:
            raise APIError(404, e.args[0], param="session", code="session_not_found") from None
        except SessionBusy as e:
            raise APIError(409, str(e), param="session", code="session_busy") from None
        return {"id": sid, "object": "session", "deleted": True}

    # -- operations ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        running, queued = await run_in_threadpool(engine.counts)  # an RPC with --http-process
        return {"status": "ok", "model": config.model_name, "running": running, "queued": queued,
                "free_slots": len(engine.free)}

    @app.get("/metrics")
    async def prometheus():
        return Response(await run_in_threadpool(metrics.render, engine, store), media_type="text/plain; version=0.0.4")

    return app


class ChatRender:
    """A chat request's prompt, rendered by the engine at admission against the session's stored
    messages: only the messages after those already in the session are fed (all of them without one).
    Picklable (it crosses to the engine process with --http-process): the messages and whether the
    tokenizer has a chat template travel; the tokenizer is the engine's own, set on arrival."""

    def __init__(self, messages: list[dict], has_template: bool, tokenizer=None):
        self.messages, self.has_template, self.tokenizer = messages, has_template, tokenizer

    def __getstate__(self):
        return {"messages": self.messages, "has_template": self.has_template}

    def __setstate__(self, state):
        self.messages, self.has_template, self.tokenizer = state["messages"], state["has_template"], None

    def __call__(self, stored: list[dict]):
        messages = self.messages
        new = messages[len(stored):] if messages[:len(stored)] == stored else messages
        return chat_text(self.tokenizer, new, continuing=bool(stored), template=self.has_template), stored + new


def chat_text(tokenizer, messages: list[dict], continuing: bool, template: bool | None = None) -> str:
    """The tokenizer's chat template for user turns when it has one; else the plain template (schemas)."""
    if not (tokenizer.chat is not None if template is None else template):
        return render_plain_chat(messages, continuing)
    return "".join(tokenizer.chat(m["content"]) if m["role"] == "user" else m["content"] + "\n" for m in messages)


def _check_length(n: int, limit: int) -> None:
    if n > limit:
        raise APIError(400, f"the prompt has {n} tokens, over this server's limit of {limit} (--max-prompt-tokens)",
                       param="prompt", code="prompt_too_long")


def _path_session_id(session_id: str) -> str:
    try:
        return check_session_id(session_id, "session")
    except ValueError as e:
        raise APIError(400, str(e), param="session") from None


def _session_field(req, done) -> dict:
    return {"session": {"id": req.session, "position": done["position"]}} if req.session else {}


def _usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


_TEXT_MARK = "\x00text\x00"


def _template_of(chunk: dict) -> tuple[str, str]:
    """The serialised chunk split around the JSON string of ``_TEXT_MARK`` (which appears once)."""
    before, after = json.dumps(chunk, ensure_ascii=False).split(json.dumps(_TEXT_MARK, ensure_ascii=False))
    return before, after


class Mailbox:
    """The events of one request, filled on its event loop (by ``call_soon_threadsafe`` from the engine
    thread) and emptied all at once by the request's coroutine. Cheaper than an ``asyncio.Queue``
    awaited through ``wait_for`` (a task and a timer per event)."""

    def __init__(self, loop):
        self.loop, self.items, self.waiter = loop, [], None

    def put_nowait(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float) -> list:
        """Every item so far, waiting up to ``timeout`` seconds for the first ([] if none came)."""
        if not self.items:
            self.waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _wake, self.waiter)
            try:
                await self.waiter
            finally:
                timer.cancel()
                self.waiter = None
        items, self.items = self.items, []
        return items


def _wake(waiter) -> None:
    if not waiter.done():
        waiter.set_result(None)
