"""A reply's way from the engine to the screen: the worker loop, its messages and the pacing.

`stream_reply` runs in a thread worker of the chat view. It binds the session to the chat,
iterates `ChatBackend.reply()` and posts what it got with `post_message` (thread-safe): it
never waits for the UI. Text goes up in batches (`ReplyChunk`, never replaced, so no text is
lost), prefill progress as a message that replaces its queued predecessor, then `ReplyDone`
or `ReplyFailed`. Every message carries the reply's `gen_id`; the view drops the ones of a
reply it no longer shows.

How far apart the batches are is `BatchPacer.seconds`: the worker reads it, the UI thread sets
it (see UI_SHARE_TARGET below; `ui_shares_cores` says whether it must widen).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual.message import Message

from chatapp.backend import BackendStats, ChatBackend
from chatapp.errors import log_exception
from chatapp.store import state_path
from engine.generate import GenerationResponse
from engine.sampling import SamplingSettings

BATCH_SECONDS = 0.04          # text goes up to the UI at most this often
# The UI thread renders on a core. Where the compute threads take every core (2 threads on
# 2 cores), each millisecond of rendering is a millisecond the whole thread team waits: a
# batch of text costs the UI ~15-25 ms there (Textual lays out and repaints the screen two
# or three times per batch), 8-10% of decode speed at 40 ms batches. Then the UI measures
# its own share of the time and the batches are spaced so that share is about UI_SHARE_TARGET
# (at most MAX_BATCH_SECONDS apart): about one update a second on a 2-core machine (a batch
# of a long reply costs 20-45 ms: at 3% a 512-token reply decoded at 0.92-0.95 of `run`). With
# a core to spare for the UI, batches stay BATCH_SECONDS apart.
UI_SHARE_TARGET = 0.02
MAX_BATCH_SECONDS = 1.0
# Sharing cores, a reply's batches start this far apart and narrow as the UI proves cheap: its
# first batches cost the most (the reply's widgets change, the gauge turns to the sparkline),
# and a short reply would otherwise spend its few batches learning.
SHARED_START_SECONDS = MAX_BATCH_SECONDS


class PrefillProgress(Message):
    def __init__(self, gen_id: int, done: int, total: int, tps: float):
        super().__init__()
        self.gen_id, self.done, self.total, self.tps = gen_id, done, total, tps

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, PrefillProgress) and message.gen_id == self.gen_id


class ReplyChunk(Message):
    """A batch of reply text plus the newest figures for the gauge (never replaced: text must not be lost)."""

    def __init__(self, gen_id: int, text: str, figures: dict):
        super().__init__()
        self.gen_id, self.text, self.figures = gen_id, text, figures


class ReplyDone(Message):
    def __init__(self, gen_id: int, finish: str | None):
        super().__init__()
        self.gen_id, self.finish = gen_id, finish


class ReplyFailed(Message):
    def __init__(self, gen_id: int, error: BaseException):
        super().__init__()
        self.gen_id, self.error = gen_id, error


@dataclass
class ReplyRequest:
    """Everything one reply needs, fixed when it starts (the worker reads nothing else of the UI)."""

    gen_id: int
    chat_id: int
    messages: list[dict]
    settings: SamplingSettings
    max_tokens: int
    thinking: bool | None
    cancel: threading.Event


class BatchPacer:
    """The interval between text batches: BATCH_SECONDS, or, where the UI shares the cores with the
    compute threads, widened until the UI thread's share of the time is about UI_SHARE_TARGET."""

    def __init__(self, wall_clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.thread_time):
        self.seconds = BATCH_SECONDS   # read by the reply worker, set on the UI thread
        self.shares_cores = False
        self._wall_clock, self._cpu_clock = wall_clock, cpu_clock
        self._clock: tuple[float, float] | None = None

    def restart(self, shares_cores: bool):
        """A reply starts (sharing cores: at SHARED_START_SECONDS)."""
        self.shares_cores = shares_cores
        self.seconds = SHARED_START_SECONDS if shares_cores else BATCH_SECONDS
        self._clock = None

    def ui_tick(self):
        """On the UI thread, per batch: its CPU share since the last batch sets the next interval."""
        wall, cpu = self._wall_clock(), self._cpu_clock()
        if self._clock is not None and self.shares_cores:
            dw, dc = wall - self._clock[0], cpu - self._clock[1]
            if dw > 0.005:
                # the share falls as 1/interval: the interval that gives the target share
                want = self.seconds * (dc / dw) / UI_SHARE_TARGET
                want = min(max(want, BATCH_SECONDS), MAX_BATCH_SECONDS)
                # wider at once (the cost is paid now), narrower by halves (in log) as one cheap
                # batch may be chance
                self.seconds = want if want > self.seconds else (self.seconds * want) ** 0.5
        self._clock = (wall, cpu)


def ui_shares_cores(stats: BackendStats) -> bool:
    """The engine's compute threads may take every CPU this process has: the UI has none of its own."""
    return bool(stats.cpus) and stats.threads_max >= stats.cpus


def bind_session(backend: ChatBackend, chat_id: int | None) -> str | None:
    """Give the backend's session to chat `chat_id` (None: a new chat): its saved state, or a reset.

    The one way the session changes hands (chat switch and every reply); None if it failed:
    never fatal, the next reply prefills."""
    try:
        return backend.bind(chat_id, state_of(chat_id))
    except Exception as e:  # noqa: BLE001
        log_exception(e, f"restoring the state of chat {chat_id}")
        return None


def state_of(chat_id: int | None) -> Path | None:
    """Where a chat's engine state is saved (None for a chat not stored yet)."""
    return state_path(chat_id) if chat_id is not None else None


def stream_reply(backend: ChatBackend, req: ReplyRequest, post: Callable[[Message], object],
                 pacer: BatchPacer) -> None:
    """(In a thread worker.) The engine loop: the session first becomes this chat's (kept, restored
    or reset); the reply streams up in batches; then the backend saves the state, still here."""
    bind_session(backend, req.chat_id)
    t0 = time.perf_counter()

    def prefill_progress(done: int, total: int):
        dt = time.perf_counter() - t0
        post(PrefillProgress(req.gen_id, done, total, done / dt if dt > 0 else 0.0))

    buf: list[str] = []
    posted_at = -1e18   # made_at of the last batch's end: the first token goes up at once (TTFT is visible)
    last: GenerationResponse | None = None

    def handover() -> float:
        """How long the backend may let tokens gather before it hands them over (asked when this
        thread has taken all it was given): until the next batch is due, then 0 (the next token
        ends that batch). This thread wakes about twice a batch, not per token: on 2 cores
        each wake-up takes a core from the engine."""
        return max(0.0, posted_at + pacer.seconds - time.monotonic())

    try:
        for r in backend.reply(req.messages, req.settings, max_tokens=req.max_tokens, enable_thinking=req.thinking,
                               cancel=req.cancel, prefill_progress=prefill_progress,
                               save_to=state_of(req.chat_id), handover=handover):
            last = r
            if r.text:
                buf.append(r.text)
            # by when the token was made: a batch handed over late still ends where it was due
            if r.finish_reason is not None or r.made_at - posted_at >= pacer.seconds:
                post(ReplyChunk(req.gen_id, "".join(buf), figures(backend, r)))
                buf = []
                posted_at = r.made_at
        if buf:
            post(ReplyChunk(req.gen_id, "".join(buf), figures(backend, last)))
        finish = last.finish_reason if last is not None else None
        post(ReplyDone(req.gen_id, finish or ("cancelled" if req.cancel.is_set() else "stop")))
    except BaseException as e:  # noqa: BLE001  (shown as a notification, never a traceback)
        if buf:
            post(ReplyChunk(req.gen_id, "".join(buf), figures(backend, last)))
        post(ReplyFailed(req.gen_id, e))


def figures(backend: ChatBackend, r: GenerationResponse | None) -> dict:
    """The gauge's figures (keyword arguments of `Gauge.on_tokens`) after response `r`."""
    turn = backend.last_turn()
    ss = backend.session_stats()
    if r is None:
        return {"prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
                "prefilled_tokens": turn.prefilled_tokens, "decode_tps": 0.0, "ttft_s": 0.0,
                "prompt_tps": 0.0, "generated": 0, "context_used": ss.get("context_used", turn.prompt_tokens),
                "dropped_messages": turn.dropped_messages}
    return {"prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
            "prefilled_tokens": turn.prefilled_tokens, "decode_tps": r.decode_tps, "ttft_s": r.ttft_s,
            "prompt_tps": r.prompt_tps, "generated": r.generation_tokens,
            "context_used": ss.get("context_used", turn.prompt_tokens + r.generation_tokens),
            "dropped_messages": turn.dropped_messages, "speculation": r.speculation}
