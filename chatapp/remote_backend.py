"""`ChatBackend` over an OpenAI-compatible endpoint (see chatapp.remote for the client).

Its figures are measured at the client: time to first token, decode speed over the streamed
chunks, and the usage the server reports (prompt, cached and completion tokens).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from chatapp.backend import BackendStats, BindTo, ChatKey, LoadProgress, ModelInfo, PrefillProgress
from chatapp.remote import (OpenAIEndpoint, RemoteChoice, RemoteError, ReplyFigures, api_key_from_env,
                            normalize_url, stream_reply)
from engine.generate import GenerationResponse
from engine.sampling import SamplingSettings

if TYPE_CHECKING:
    from engine.session import TurnStats


class RemoteBackend:
    """ChatBackend over an OpenAI-compatible endpoint."""

    def __init__(self, url: str, model: str | None = None, api_key_env: str | None = None):
        self.choice = RemoteChoice(normalize_url(url), model, api_key_env)
        self.endpoint: OpenAIEndpoint | None = None
        self.info: ModelInfo | None = None
        self._turn: TurnStats | None = None   # None until the first reply
        self._last = ReplyFigures()
        self._work = threading.Lock()
        self.on_notice: Callable[[str], None] | None = None   # set by the app (ChatBackend)

    @property
    def url(self) -> str:
        return self.choice.url

    def load(self, path: Path | None = None, progress: LoadProgress | None = None,
             bind: BindTo | None = None) -> ModelInfo:
        """Connect: list the server's models and pick ours (the first when none was named)."""
        say = progress or (lambda stage, frac: None)
        say("connect", None)
        t0 = time.perf_counter()
        endpoint = OpenAIEndpoint(self.url, api_key_from_env(self.choice.api_key_env))
        models = endpoint.models()
        if not models:
            raise RemoteError(f"{self.url} lists no models")
        ids = [m["id"] for m in models]
        model = self.choice.model or ids[0]
        if model not in ids:
            raise RemoteError(f"{self.url} has no model '{model}' (it has: {', '.join(ids[:8])})", "model", 404)
        ctx = next((m["context_length"] for m in models if m["id"] == model), None) or 0
        self.choice.model = model
        self.endpoint = endpoint
        host = urlsplit(self.url).netloc
        self.info = ModelInfo(path=Path(model), name=f"{model} @ {host}", arch="remote", n_ctx=ctx, file_size=0,
                              load_seconds=time.perf_counter() - t0, endpoint=self.url)
        say("ready", 1.0)
        return self.info

    def bind(self, key: ChatKey, state_path: Path | None) -> str:
        return "kept"   # the server keeps (or not) its own caches; nothing is saved here

    def reply(self, messages: list[dict], settings: SamplingSettings, *, max_tokens: int,
              enable_thinking: bool | None, cancel: threading.Event,
              prefill_progress: PrefillProgress | None = None,
              save_to: Path | None = None,
              handover: Callable[[], float] | None = None) -> Iterator[GenerationResponse]:
        if self.endpoint is None or self.info is None or self.choice.model is None:
            raise RuntimeError("no endpoint is connected")
        with self._work:
            body = self.endpoint.request_body(self.choice.model, messages, settings, max_tokens, enable_thinking)
            self._last = f = ReplyFigures()
            from engine.session import TurnStats

            self._turn = TurnStats(mode="remote")
            for r in stream_reply(self.endpoint, body, cancel, f):
                if r.finish_reason is not None:
                    p = f.prompt_tokens or 0
                    cached = f.cached_tokens or 0
                    self._turn = TurnStats(prompt_tokens=p, reused_tokens=cached, prefilled_tokens=p - cached,
                                           mode="remote")
                yield r

    def last_turn(self) -> TurnStats:
        if self._turn is None:
            from engine.session import TurnStats

            self._turn = TurnStats(mode="remote")
        return self._turn

    def session_stats(self) -> dict[str, int]:
        used = (self._last.prompt_tokens or 0) + self._last.completion_tokens
        return {"context_used": used, "n_ctx": self.info.n_ctx if self.info else 0}

    def measure_bandwidth(self) -> float | None:
        return None

    def stats(self) -> BackendStats:
        st = BackendStats(remote=self.url, threading_layer="remote", threads=0)
        ss = self.session_stats()
        st.context_used, st.n_ctx = ss["context_used"], ss["n_ctx"]
        return st
