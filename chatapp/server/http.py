"""The HTTP side of `deltatalk serve`: Starlette routes on uvicorn.

Why Starlette + uvicorn: both are small, pure-Python (uvicorn without extras needs only
h11 and click), widely used and actively kept; Starlette gives routing and request
parsing, and a response is any ASGI callable, so server-sent events and disconnect
handling are a few lines of our own instead of another dependency.

Requests: at most one generation runs (on the kernel thread); up to `max_queue` more wait
in arrival order; beyond that the answer is 503 with Retry-After. Each admitted request
gets a thread that relays its events from the kernel thread to the event loop. A task
watches the connection from the moment the body is read: when the client goes away its
generation's cancel flag is set, which the engine checks between tokens and between
prefill chunks, so the kernel thread is free again within one token (or one chunk).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatapp.generation_defaults import GENERATION_DEFAULTS
from engine.errors import ContextOverflowError, DeltatalkError
from engine.kernel_thread import kernel_thread
from engine.sampling import SamplingSettings

from chatapp.server.protocol import (RequestError, chunk_body, completion_body, error_body, models_body, new_id,
                                     parse_chat_request, usage_body, usage_chunk_body)
from chatapp.server.worker import CancelFlag, Finished, Piece, ServeEngine, Started

MAX_BODY_BYTES = 8 << 20
HANDOVER_SECONDS = 0.02    # the relay thread wakes once per batch of tokens (see EngineBackend)
_END = object()


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Gate:
    """Admission: one running + up to max_queue waiting; the rest are told to come back."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.admitted = 0
        self.mean_s = 2.0      # a running mean of request durations, for Retry-After

    def enter(self):
        if self.admitted >= 1 + self.max_queue:
            wait = max(1, round(self.mean_s * self.admitted))
            raise RequestError(503, f"the server is busy ({self.admitted} requests running or queued); retry after "
                                    f"{wait} s", kind="server_error", code="server_busy",
                               headers={"Retry-After": str(wait)})
        self.admitted += 1

    def leave(self, seconds: float):
        self.admitted -= 1
        self.mean_s = 0.8 * self.mean_s + 0.2 * seconds


class Job:
    """One admitted request: its events relayed from the kernel thread to an asyncio queue."""

    def __init__(self, engine: ServeEngine, gate: Gate, req, loop: asyncio.AbstractEventLoop):
        self.cancel = CancelFlag()
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._gate = gate
        self._t0 = time.perf_counter()
        threading.Thread(target=self._relay, args=(engine, req), daemon=True, name="deltatalk-relay").start()

    def _put(self, item):
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:   # the event loop is gone (shutting down)
            self.cancel.set()

    def _relay(self, engine, req):
        try:
            for ev in kernel_thread().iterate(engine.generate, req, self.cancel, pace=HANDOVER_SECONDS):
                self._put(ev)
            self._put(_END)
        except BaseException as e:  # noqa: BLE001  (handed to the request's task)
            self._put(e)
        finally:
            dt = time.perf_counter() - self._t0
            try:
                self._loop.call_soon_threadsafe(self._gate.leave, dt)
            except RuntimeError:
                pass

    async def next(self):
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item


async def _watch_disconnect(request: Request, cancel: threading.Event):
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            cancel.set()
            return


def _engine_error(e: BaseException) -> RequestError:
    if isinstance(e, ContextOverflowError):
        return RequestError(400, str(e), "messages", "context_length_exceeded")
    if isinstance(e, DeltatalkError):
        return RequestError(400, str(e))
    return RequestError(500, f"generation failed: {e!r}", kind="server_error")


class EventStream:
    """A server-sent-events response fed by a Job; ends at once when the client leaves."""

    def __init__(self, job: Job, watcher: asyncio.Task, render):
        self.job, self.watcher, self.render = job, watcher, render

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        try:
            async for event in self.render():
                if self.job.cancel.is_set() and self.watcher.done():
                    break   # the client is gone: nothing more to send
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.job.cancel.set()   # a no-op after a normal end; stops the engine otherwise
            self.watcher.cancel()


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def make_app(engine: ServeEngine, *, api_key: str | None = None, max_queue: int = 8,
             defaults: SamplingSettings | None = None) -> Starlette:
    gate = Gate(max_queue)
    defaults = defaults or GENERATION_DEFAULTS.sampling_settings()
    names = {engine.model_id, engine.loaded.path.name, str(engine.loaded.path)}
    created = int(engine.loaded.path.stat().st_mtime)

    def check_key(request: Request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), api_key.encode())):
            raise RequestError(401, "a valid API key is required (Authorization: Bearer KEY)",
                               kind="invalid_request_error", code="invalid_api_key")

    async def read_json(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB",
                                   code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}") from None

    async def models(request: Request):
        try:
            check_key(request)
        except RequestError as e:
            return _error(e)
        return JSONResponse(models_body(engine.model_id, engine.n_ctx, created))

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": engine.model_id, "busy": engine.busy,
                             "requests": gate.admitted, "served": engine.served, "last": engine.last,
                             **engine.pool.stats()})

    async def chat_completions(request: Request):
        try:
            check_key(request)
            req = parse_chat_request(await read_json(request), defaults)
            if req.model not in names:
                raise RequestError(404, f"the model '{req.model}' does not exist; this server has "
                                        f"'{engine.model_id}'", "model", "model_not_found")
            gate.enter()
        except RequestError as e:
            return _error(e)
        job = Job(engine, gate, req, asyncio.get_running_loop())
        watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
        cid, created_at = new_id(), int(time.time())
        try:
            first = await job.next()    # queued, then planned: errors still get their status code
        except BaseException as e:
            job.cancel.set()
            watcher.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            return _error(_engine_error(e))
        if first is _END:   # cancelled while queued
            watcher.cancel()
            return JSONResponse(error_body("the client went away", "server_error"), status_code=499)
        if req.stream:
            return EventStream(job, watcher, lambda: _stream(job, first, cid, created_at, req))
        try:
            text, fin = [], None
            while True:
                ev = await job.next()
                if ev is _END:
                    break
                if isinstance(ev, Piece):
                    text.append(ev.text)
                elif isinstance(ev, Finished):
                    fin = ev
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        except BaseException as e:  # noqa: BLE001
            return _error(_engine_error(e))
        finally:
            watcher.cancel()
        if fin is None or fin.finish == "cancelled":
            return JSONResponse(error_body("the generation was cancelled", "server_error"), status_code=499)
        return JSONResponse(completion_body(cid, engine.model_id, created_at, "".join(text), fin.finish,
                                            usage_body(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens),
                                            fin.timings))

    async def _stream(job: Job, first: Started, cid: str, created_at: int, req):
        model = engine.model_id
        yield _sse(chunk_body(cid, model, created_at, {"role": "assistant", "content": ""}))
        try:
            while True:
                ev = await job.next()
                if ev is _END:
                    break
                if isinstance(ev, Piece):
                    yield _sse(chunk_body(cid, model, created_at, {"content": ev.text}))
                elif isinstance(ev, Finished) and ev.finish != "cancelled":
                    yield _sse(chunk_body(cid, model, created_at, {}, ev.finish))
                    if req.include_usage:
                        yield _sse(usage_chunk_body(cid, model, created_at,
                                                    usage_body(ev.prompt_tokens, ev.completion_tokens,
                                                               ev.cached_tokens), ev.timings))
        except Exception as e:  # noqa: BLE001  (headers are sent: the error goes in the stream)
            yield _sse(_engine_error(e).body())
        yield b"data: [DONE]\n\n"

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        # registered for HTTPException only; Starlette's handler type takes any Exception
        detail, status = (exc.detail, exc.status_code) if isinstance(exc, HTTPException) else (str(exc), 500)
        kind = "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {detail}", kind), status_code=status)

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})
