"""OpenAI's chat-completions wire format: request validation and response bodies.

Only the fields that apply to a local engine are read (messages, temperature, top_p,
max_tokens / max_completion_tokens, stop, seed, stream, stream_options.include_usage)
plus the sampling extras llama.cpp's server accepts (top_k, min_p, repeat_penalty,
repeat_last_n) and `chat_template_kwargs.enable_thinking` (as vLLM and llama.cpp take it).
Other fields are ignored, as OpenAI-compatible servers do; a known field of the wrong
type or range is a 400 naming it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace

from engine.sampling import SamplingSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4   # OpenAI's limit


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    settings: SamplingSettings
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    enable_thinking: bool | None = None


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if not lo <= v <= hi:
        raise RequestError(400, f"'{name}' must be between {lo} and {hi}", name)
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):   # content parts: only text applies to a text model
        out = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            out.append(part["text"])
        return "".join(out)
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat_request(body, defaults: SamplingSettings) -> ChatRequest:
    """Check a decoded JSON body; raise RequestError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required (a string; GET /v1/models lists it)", "model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        messages.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    if messages[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must not be the assistant's (nothing to answer)", "messages")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, "only n = 1 is supported", "n")
    s = replace(defaults)   # a copy: the server's defaults stay as they are
    for name, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False), ("top_k", 0, 1 << 20, True),
                                  ("min_p", 0, 1, False), ("repeat_penalty", 0, 10, False),
                                  ("repeat_last_n", 0, 1 << 20, True), ("seed", -(1 << 63), (1 << 64) - 1, True)):
        v = _number(body, name, lo, hi, integer)
        if v is not None:
            setattr(s, "temperature" if name == "temperature" else name, v)
    if s.top_p == 0:
        s.top_p = 1e-9   # OpenAI allows 0: only the most likely token
    if s.seed is not None:
        s.seed = s.seed % (1 << 64)
    try:
        s.validate()
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 31, True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 31, True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(400, f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    include_usage = bool(opts.get("include_usage", False))
    kwargs = body.get("chat_template_kwargs") or {}
    thinking = kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None
    if thinking is not None and not isinstance(thinking, bool):
        raise RequestError(400, "'chat_template_kwargs.enable_thinking' must be true or false", "chat_template_kwargs")
    return ChatRequest(model, messages, s, max_tokens, stop, stream, include_usage, thinking)


# -- response bodies -------------------------------------------------------------------
def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(cid: str, model: str, created: int, text: str, finish: str, usage: dict,
                    timings: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion", "created": created, "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": None, "finish_reason": finish}],
           "usage": usage}
    if timings:
        out["timings"] = timings
    return out


def chunk_body(cid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk_body(cid: str, model: str, created: int, usage: dict, timings: dict | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [], "usage": usage}
    if timings:
        out["timings"] = timings
    return out


def models_body(model_id: str, n_ctx: int, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "deltatalk", "context_length": n_ctx}]}
