"""Remote backends: any OpenAI-compatible server (deltatalk serve, vLLM, llama.cpp's server, Ollama).

`OpenAIEndpoint` speaks the two calls that matter (GET /models, POST /chat/completions,
streamed as server-sent events) over httpx and turns every failure into a `RemoteError`
with a one-line cause: unreachable, TLS, 401, unknown model, busy (429/503, with the
server's Retry-After), or a stream cut mid-reply (the partial text is kept on the error).

`stream_reply` yields `GenerationResponse`s like the local engine, with speeds measured at
the client: ttft = request sent -> first text; decode tok/s = tokens after the first / time
since it. Token counts come from the server's `usage` when it reports it (we ask for it
with stream_options.include_usage), else each text chunk counts as one token and the
figures are marked estimated.

`chatapp.remote_backend.RemoteBackend` is the TUI's ChatBackend for an endpoint: the server
holds the model and its caches, so binding a chat keeps nothing here, and memory/bandwidth
figures say "remote".
"""

from __future__ import annotations

import json
import os
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from engine.errors import DeltatalkError
from engine.generate import GenerationResponse
from engine.sampling import SamplingSettings

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0      # a long prompt on a slow server may prefill for minutes
POLL_S = 0.05               # how often a waiting reply looks at its cancel flag


class RemoteError(DeltatalkError):
    """A remote server's failure, said in one line. `partial`: text received before a cut."""

    def __init__(self, message: str, kind: str = "http", status: int | None = None,
                 retry_after: float | None = None, partial: str = ""):
        super().__init__(message)
        self.kind, self.status, self.retry_after, self.partial = kind, status, retry_after, partial


def normalize_url(url: str) -> str:
    """The API base: scheme://host[:port]/path without a trailing slash; /v1 when no path is given."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(f"{url}: not an http(s) URL")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or '/v1'}"


def api_key_from_env(var: str | None) -> str | None:
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise RemoteError(f"--api-key-env {var}: the variable is not set")
    return key


def _retry_after(resp: httpx.Response) -> float | None:
    v = resp.headers.get("retry-after")
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _server_message(resp: httpx.Response) -> str:
    try:
        body = json.loads(resp.read() or b"{}")
    except (ValueError, httpx.HTTPError):
        return resp.reason_phrase or ""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or "")
    if isinstance(err, str):
        return err
    return str(body.get("detail") or body.get("message") or "") if isinstance(body, dict) else ""


class OpenAIEndpoint:
    def __init__(self, url: str, api_key: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.url = normalize_url(url)
        self.api_key = api_key
        self.timeout = httpx.Timeout(READ_TIMEOUT_S, connect=connect_timeout)

    def _headers(self) -> dict:
        h = {"accept": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def _failure(self, e: Exception) -> RemoteError:
        """A transport error as a RemoteError (unreachable / TLS / timeout)."""
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, ssl.SSLError):
                return RemoteError(f"TLS error talking to {self.url}: {cause.reason or cause}", "tls")
            cause = cause.__cause__ or cause.__context__
        if isinstance(e, httpx.TimeoutException):
            return RemoteError(f"{self.url} did not answer in time ({type(e).__name__})", "unreachable")
        return RemoteError(f"cannot reach {self.url}: {e or type(e).__name__}", "unreachable")

    def _status_error(self, resp: httpx.Response, model: str | None = None) -> RemoteError:
        code, msg = resp.status_code, _server_message(resp)
        said = f": {msg}" if msg else ""
        if code in (401, 403):
            return RemoteError(f"{self.url} refused the request ({code}){said} — set the key with --api-key-env VAR",
                               "auth", code)
        if code == 404:
            if model and ("model" in msg.lower() or not msg):
                return RemoteError(f"{self.url} has no model '{model}' (404){said}", "model", code)
            return RemoteError(f"{self.url}: not found (404){said} — is it the API base (…/v1)?", "http", code)
        if code in (429, 503):
            ra = _retry_after(resp)
            when = f"; retry after {ra:g} s" if ra is not None else "; retry later"
            return RemoteError(f"{self.url} is busy ({code}){said}{when}", "busy", code, ra)
        return RemoteError(f"{self.url} answered {code}{said}", "http", code)

    def models(self) -> list[dict]:
        """The server's models (GET /models): [{"id": ..., "context_length": int | None}, ...]."""
        try:
            with httpx.Client(timeout=httpx.Timeout(CONNECT_TIMEOUT_S)) as c:
                resp = c.get(self.url + "/models", headers=self._headers())
        except httpx.HTTPError as e:
            raise self._failure(e) from None
        if resp.status_code != 200:
            raise self._status_error(resp)
        try:
            data = resp.json().get("data")
            out = []
            for m in data:
                ctx = m.get("context_length") or m.get("max_model_len") or (m.get("meta") or {}).get("n_ctx_train")
                out.append({"id": str(m["id"]), "context_length": int(ctx) if isinstance(ctx, (int, float)) else None})
            return out
        except (ValueError, TypeError, KeyError, AttributeError):
            raise RemoteError(f"{self.url}/models: not an OpenAI model list") from None

    def request_body(self, model: str, messages: list[dict], settings: SamplingSettings, max_tokens: int | None,
                     enable_thinking: bool | None = None) -> dict:
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "temperature": settings.temperature, "top_p": settings.top_p}
        # llama.cpp's (and deltatalk's, vLLM's) sampling extras; servers that do not know them ignore them
        body.update({"top_k": settings.top_k, "min_p": settings.min_p, "repeat_penalty": settings.repeat_penalty})
        if settings.seed is not None:
            body["seed"] = settings.seed
        if max_tokens:
            body["max_tokens"] = max_tokens
        if enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
        return body

    def stream_events(self, body: dict, cancel: threading.Event) -> Iterator[dict]:
        """The decoded SSE events of one streamed completion; returns when cancelled or done.

        The HTTP read runs in a thread so a cancel (Esc) ends the stream at once, even while
        the server is still prefilling and sends nothing; the connection is then closed,
        which makes a server like deltatalk's stop generating.
        """
        items: queue.SimpleQueue = queue.SimpleQueue()
        holder: dict = {}

        def read():
            try:
                with httpx.Client(timeout=self.timeout) as c, \
                        c.stream("POST", self.url + "/chat/completions", json=body, headers=self._headers()) as resp:
                        holder["resp"] = resp
                        if resp.status_code != 200:
                            resp.read()
                            items.put(self._status_error(resp, body.get("model")))
                            return
                        done = False
                        for line in resp.iter_lines():
                            if cancel.is_set():
                                return
                            if not line.startswith("data:"):
                                continue
                            data = line[5:].strip()
                            if data == "[DONE]":
                                done = True
                                break
                            try:
                                items.put(json.loads(data))
                            except ValueError:
                                items.put(RemoteError(f"{self.url}: a stream event is not JSON: {data[:80]}"))
                                return
                        items.put(None if done else RemoteError(f"{self.url} ended the stream before [DONE]", "cut"))
            except httpx.HTTPError as e:
                if not cancel.is_set():
                    items.put(self._failure(e) if "resp" not in holder else
                              RemoteError(f"the stream from {self.url} was cut: {e or type(e).__name__}", "cut"))
            except BaseException as e:  # noqa: BLE001  (handed to the reader)
                items.put(e)
            finally:
                items.put(None)

        reader = threading.Thread(target=read, daemon=True, name="deltatalk-remote")
        reader.start()
        while True:
            try:
                item = items.get(timeout=POLL_S)
            except queue.Empty:
                if cancel.is_set():
                    resp = holder.get("resp")
                    if resp is not None:
                        try:
                            resp.close()   # unblocks the reader and tells the server the client left
                        except Exception:  # noqa: BLE001
                            pass
                    return
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, dict) and "error" in item:
                err = item["error"]
                msg = err.get("message") if isinstance(err, dict) else str(err)
                raise RemoteError(f"{self.url}: {msg}", "http")
            yield item


@dataclass
class ReplyFigures:
    """What one remote reply measured, for --json and the TUI's turn info."""

    text: str = ""
    finish: str | None = None
    ttft_s: float = 0.0
    decode_tps: float = 0.0
    prompt_tps: float = 0.0
    prompt_tokens: int | None = None       # from usage (None: not reported)
    completion_tokens: int = 0
    completion_estimated: bool = True
    cached_tokens: int | None = None
    chunks: int = 0


def stream_reply(endpoint: OpenAIEndpoint, body: dict, cancel: threading.Event,
                 figures: ReplyFigures | None = None) -> Iterator[GenerationResponse]:
    """GenerationResponses for one streamed remote reply; `figures` is filled as it goes.

    Ends with a response whose finish_reason is set ("cancelled" after a cancel). A cut
    stream raises RemoteError(kind="cut") carrying the partial text.
    """
    f = figures if figures is not None else ReplyFigures()
    t0 = time.perf_counter()
    t_first = t_last = 0.0
    pieces: list[str] = []

    def response(text: str, finish: str | None) -> GenerationResponse:
        n = f.completion_tokens if not f.completion_estimated else f.chunks
        if n > 1 and t_last > t_first:
            f.decode_tps = (n - 1) / (t_last - t_first)
        return GenerationResponse(text=text, token=-1, prompt_tokens=f.prompt_tokens or 0, prompt_tps=f.prompt_tps,
                                  ttft_s=f.ttft_s, generation_tokens=n, decode_tps=f.decode_tps, finish_reason=finish)

    try:
        for ev in endpoint.stream_events(body, cancel):
            usage = ev.get("usage")
            if isinstance(usage, dict):
                if isinstance(usage.get("prompt_tokens"), int):
                    f.prompt_tokens = usage["prompt_tokens"]
                if isinstance(usage.get("completion_tokens"), int):
                    f.completion_tokens, f.completion_estimated = usage["completion_tokens"], False
                details = usage.get("prompt_tokens_details") or {}
                if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                    f.cached_tokens = details["cached_tokens"]
            for ch in ev.get("choices") or []:
                delta = ch.get("delta") or {}
                text = delta.get("content") or ""
                if ch.get("finish_reason"):
                    f.finish = ch["finish_reason"]
                if text:
                    now = time.perf_counter()
                    if not f.chunks:
                        t_first = now
                        f.ttft_s = now - t0
                    t_last = now
                    f.chunks += 1
                    if f.completion_estimated:
                        f.completion_tokens = f.chunks
                    pieces.append(text)
                    yield response(text, None)
    except RemoteError as e:
        f.text = "".join(pieces)
        e.partial = f.text
        if e.kind == "cut" and f.text:
            e.args = (f"{e} — the partial reply is kept",)
        raise
    f.text = "".join(pieces)
    if cancel.is_set():
        f.finish = "cancelled"
    if f.prompt_tokens and f.ttft_s > 0:
        new = f.prompt_tokens - (f.cached_tokens or 0)
        f.prompt_tps = new / f.ttft_s
    yield response("", f.finish or "stop")


# ---------------------------------------------------------------------------------------
@dataclass
class RemoteChoice:
    """An endpoint and model picked in the model picker (or given on the command line)."""

    url: str
    model: str | None = None
    api_key_env: str | None = None
