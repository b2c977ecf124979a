"""One request's generation, run on the kernel thread.

`ServeEngine.generate(request, cancel)` is a generator of events: `Started` (the prompt
is planned: its size and the part taken from a live cache), `Piece`s of reply text, and
`Finished` (finish reason, usage, timings). The HTTP layer runs it through
`kernel_thread().iterate`, so every kernel runs on the one kernel thread and requests
run one at a time in arrival order. A request cancelled while still queued returns at
once without touching the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from engine.errors import ContextOverflowError
from engine.loader import LoadedModel
from engine.speculative import Speculator

from chatapp.backend import model_figures
from chatapp.server.pool import SessionPool
from chatapp.server.protocol import ChatRequest


@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    finish: str               # "stop" | "length" | "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    timings: dict


class CancelFlag(threading.Event):
    """A request's cancel flag that remembers when it was first set (for /health's figures)."""

    set_at: float | None = None

    def set(self):
        if self.set_at is None:
            self.set_at = time.monotonic()
        super().set()


class StopMatcher:
    """Cuts the reply at the first stop string; holds back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buf = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Text that is safe to send now; sets `matched` when a stop string appeared."""
        if not self.stops:
            return text
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.matched = self.buf[:cut], "", True
            return out
        hold = 0
        for s in self.stops:   # the longest tail of buf that begins some stop string
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class ServeEngine:
    """The loaded model, its kept sessions, and whether a generation is running."""

    def __init__(self, loaded: LoadedModel, model_id: str, budget_bytes: int,
                 make_speculator: Callable[[], Speculator | None] | None = None):
        self.loaded = loaded
        self.model_id = model_id
        self.pool = SessionPool(loaded, budget_bytes, make_speculator=make_speculator)
        self.busy = False          # a generation holds the kernel thread (read by /health)
        self.served = 0
        self.last: dict = {}       # the last generation: finish, tokens, seconds from cancel to free

    @property
    def n_ctx(self) -> int:
        return model_figures(self.loaded).n_ctx

    def generate(self, req: ChatRequest, cancel: CancelFlag) -> Iterator[Started | Piece | Finished]:
        if cancel.is_set():
            return   # the client left while the request was queued
        self.busy = True
        fin = None
        try:
            for ev in self._generate(req, cancel):
                if isinstance(ev, Finished):
                    fin = ev
                yield ev
        finally:
            self.busy = False
            self.served += 1
            freed = time.monotonic()
            self.last = {"finish": fin.finish if fin else "error", "completion_tokens": fin.completion_tokens if fin else 0,
                         "cancel_to_free_s": freed - cancel.set_at if cancel.set_at is not None else None}

    def _generate(self, req: ChatRequest, cancel: threading.Event):
        m = self.pool.match(req.messages, req.enable_thinking)
        kept = m.kept or self.pool.new_session()
        session = kept.session
        prompt = m.prompt if m.prompt is not None else session.render(req.messages, req.enable_thinking)
        if len(prompt) >= self.n_ctx:
            if m.kept is None:
                self.pool.discard(kept)   # the fresh session holds nothing
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx} "
                                       "(serve --ctx raises it up to the model's)")
        room = self.n_ctx - len(prompt)
        max_tokens = min(req.max_tokens or room, room)   # reply() then never drops turns to make room
        stops = StopMatcher(req.stop)
        started = False
        last = None
        for r in session.reply(req.messages, req.settings, max_tokens=max_tokens, cancel=cancel,
                               enable_thinking=req.enable_thinking):
            if not started:
                t = session.last_turn
                yield Started(t.prompt_tokens, t.reused_tokens)
                started = True
            last = r
            if stops.matched:
                continue   # the cancel is on its way; the text after a stop string is not sent
            text = stops.feed(r.text)
            if stops.matched:
                cancel.set()
            if r.finish_reason is not None and not stops.matched:
                text += stops.flush()
            if text:
                yield Piece(text)
        self.pool.touch(kept)
        self.pool.evict(keep=kept)
        t = session.last_turn
        if last is None:   # cancelled during the prefill
            yield Finished("cancelled", t.prompt_tokens, t.reused_tokens, 0, {})
            return
        finish = "stop" if stops.matched else (last.finish_reason or "stop")
        timings = {"prompt_n": t.prefilled_tokens, "prompt_per_second": last.prompt_tps,
                   "ttft_ms": last.ttft_s * 1000, "predicted_n": last.generation_tokens,
                   "predicted_per_second": last.decode_tps}
        yield Finished(finish, t.prompt_tokens, t.reused_tokens, last.generation_tokens, timings)
