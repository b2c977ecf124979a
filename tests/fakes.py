"""Test doubles shared by the test suites.

`FakeBackend` is a scripted `chatapp.backend.ChatBackend`: deterministic text, frozen timings,
no model and no numba. The TUI tests drive the app with it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from chatapp.backend import BackendStats, BindTo, ChatKey, LoadProgress, ModelInfo
from engine.generate import GenerationResponse
from engine.session import TurnStats, fit_messages, reply_reserve

log = logging.getLogger("deltatalk")


def _pieces(text: str) -> list[str]:
    """The fake tokenizer: each word with its leading space is one token."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class FakeBackend:
    """A scripted backend for tests and demos: deterministic text, frozen timings.

    `replies`: strings returned in turn (the last one repeats), or a function of the
    messages. Each whitespace-separated word (with its leading space) is one "token".
    `token_delay`: seconds slept per token (0 for instant), so tests can stop mid-reply.
    `fail_on_reply` / `fail_on_load`: an exception to raise (engine error tests).
    `template`: a chat template source; each reply then renders the conversation with the real
    `engine.chat_template.ChatTemplate` (limits, fallback and its notice included) first.
    Like the real session it drops the oldest turns when the prompt plus a reply reserve
    does not fit `n_ctx` (reported as `last_turn().dropped_messages`), and it saves and
    restores its "cache" (the fed pieces) as JSON files with the model's name as fingerprint.
    """

    PROMPT_TPS = 1234.5
    DECODE_TPS = 42.0
    TTFT_S = 0.125

    def __init__(self, replies: list[str] | Callable[[list[dict]], str] | None = None, *,
                 n_ctx: int = 4096, token_delay: float = 0.0, supports_thinking: bool = False,
                 fail_on_reply: BaseException | None = None, fail_on_load: BaseException | None = None,
                 load_delay: float = 0.0, stats: BackendStats | None = None, hold_after: int | None = None,
                 template: str | None = None, base_model: bool = False):
        self.template_source = template
        self.template = None
        self.rendered: list[str] = []        # prompts rendered by `template`
        self.on_notice: Callable[[str], None] | None = None
        self.replies = replies if replies is not None else ["Hello! How can I help you today?"]
        self.n_ctx = n_ctx
        self.token_delay = token_delay
        self.supports_thinking = supports_thinking
        self.base_model = base_model
        self.fail_on_reply = fail_on_reply
        self.fail_on_load = fail_on_load
        self.load_delay = load_delay
        self.info: ModelInfo | None = None
        self.calls: list[dict] = []          # what reply() was asked, for assertions
        self.loads: list[Path] = []
        self.tokens: list[str] = []          # the "cache": prompt pieces fed so far
        self._turn = TurnStats()
        self._n = 0
        self._stats = stats
        self.started = threading.Event()     # set when a reply starts streaming
        # hold_after=N: each reply pauses after N tokens until `resume` is set (or it is cancelled);
        # `held` is set while it waits. Makes stop/scroll tests independent of machine speed.
        self.hold_after = hold_after
        self.held = threading.Event()
        self.resume = threading.Event()
        self._owner: ChatKey = None
        self._work = threading.RLock()
        self.binds: list[tuple] = []         # (key, outcome) of every bind
        self.saves: list[tuple] = []         # (path, saved on the UI thread?) of every save

    def load(self, path: Path, progress: LoadProgress | None = None, bind: BindTo | None = None) -> ModelInfo:
        say = progress or (lambda stage, frac: None)
        say("open", None)
        if self.load_delay:
            time.sleep(self.load_delay)
        if self.fail_on_load is not None:
            raise self.fail_on_load
        say("validate", 1.0)
        say("compile", None)
        say("ready", 1.0)
        path = Path(path)
        self.loads.append(path)
        self.info = ModelInfo(path=path, name=path.name, arch="llama", n_ctx=self.n_ctx,
                              file_size=path.stat().st_size if path.exists() else 1_000_000,
                              supports_thinking=self.supports_thinking, base_model=self.base_model)
        self.tokens = []
        self._owner = None
        if self.template_source is not None:
            from engine.chat_template import ChatTemplate

            self.template = ChatTemplate(self.template_source)
            self.template.on_fallback = self._notice
        if bind is not None:
            self.bind(*bind)
        return self.info

    def _notice(self, text: str):
        if self.on_notice is not None:
            self.on_notice(text)

    # chat states ---------------------------------------------------------------------
    def bind(self, key, state_path):
        with self._work:
            return self._bind(key, state_path)

    def _bind(self, key, state_path):
        if self.info is None:
            return "reset"
        if key is not None and self._owner == key:
            outcome = "kept"
        else:
            outcome = "reset"
            self.tokens = []
            if state_path is not None and Path(state_path).is_file():
                try:
                    data = json.loads(Path(state_path).read_text())
                    if data.get("model") != self.info.name:
                        raise ValueError("saved with another model")
                    self.tokens = list(data["tokens"])
                    outcome = "loaded"
                except (OSError, ValueError, KeyError) as e:
                    log.info("chat %s: saved state not used (%s)", key, e)
                    outcome = "mismatch"
            self._owner = key
        self.binds.append((key, outcome))
        return outcome

    def _save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": self.info.name, "tokens": self.tokens}))
        self.saves.append((path, threading.current_thread() is threading.main_thread()))

    def _fit(self, messages, max_tokens):
        """The session's own context-fitting policy (engine.session.fit_messages), over fake tokens."""
        reserve = reply_reserve(max_tokens, self.n_ctx)
        if len(self._prompt_tokens(messages)) + reserve <= self.n_ctx:
            return messages, 0
        return fit_messages(messages, lambda ms: len(self._prompt_tokens(ms)), self.n_ctx, reserve)

    def _prompt_tokens(self, messages) -> list[str]:
        out = []
        for m in messages:
            out.append(f"<{m['role']}>")
            out.extend(_pieces(m["content"]))
        out.append("<assistant>")
        return out

    def _script(self, messages) -> str:
        if callable(self.replies):
            return self.replies(messages)
        text = self.replies[min(self._n, len(self.replies) - 1)]
        self._n += 1
        return text

    def reply(self, messages, settings, *, max_tokens, enable_thinking, cancel, prefill_progress=None,
              save_to=None, handover=None):
        with self._work:
            yield from self._reply(messages, settings, max_tokens=max_tokens, enable_thinking=enable_thinking,
                                   cancel=cancel, prefill_progress=prefill_progress)
            if save_to is not None:
                self._save(save_to)

    def _reply(self, messages, settings, *, max_tokens, enable_thinking, cancel, prefill_progress=None):
        if self.info is None:
            raise RuntimeError("no model is loaded")
        self.calls.append({"messages": [dict(m) for m in messages], "settings": settings,
                           "max_tokens": max_tokens, "enable_thinking": enable_thinking})
        if self.fail_on_reply is not None:
            raise self.fail_on_reply
        if self.template is not None:
            self.rendered.append(self.template.render(messages))
        messages, dropped = self._fit(messages, max_tokens)
        prompt = self._prompt_tokens(messages)
        reuse = 0
        while reuse < min(len(prompt), len(self.tokens)) and prompt[reuse] == self.tokens[reuse]:
            reuse += 1
        reuse = min(reuse, len(prompt) - 1)
        suffix = len(prompt) - reuse
        self._turn = TurnStats(prompt_tokens=len(prompt), reused_tokens=reuse, prefilled_tokens=suffix,
                               dropped_messages=dropped, mode="full" if dropped else "append")
        if prefill_progress:
            prefill_progress(suffix // 2, suffix)
            prefill_progress(suffix, suffix)
        self.tokens = prompt[:]
        text = self._script(messages)
        pieces = _pieces(text)
        self.started.set()
        n = 0
        for i, piece in enumerate(pieces):
            if self.token_delay:
                time.sleep(self.token_delay)
            if self.hold_after is not None and n == self.hold_after:
                self.held.set()
                while not self.resume.wait(0.01) and not cancel.is_set():
                    pass
                self.held.clear()
                self.resume.clear()
            n += 1  # noqa: SIM113 (counts only the pieces that were sent)
            finish = None
            if i == len(pieces) - 1:
                finish = "stop"
            elif n >= max_tokens:
                finish = "length"
            elif cancel.is_set():
                finish = "cancelled"
            self.tokens.append(piece)
            yield GenerationResponse(text=piece, token=i, prompt_tokens=suffix, prompt_tps=self.PROMPT_TPS,
                                     ttft_s=self.TTFT_S, generation_tokens=n,
                                     decode_tps=self.DECODE_TPS if n > 1 else 0.0, finish_reason=finish)
            if finish:
                return

    def last_turn(self) -> TurnStats:
        return self._turn

    def stats(self) -> BackendStats:
        if self._stats is not None:
            return self._stats
        return BackendStats(rss_bytes=300_000_000, peak_rss_bytes=320_000_000, model_bytes=100_000_000,
                            kv_bytes=len(self.tokens) * 1024, state_bytes=0, checkpoint_bytes=0,
                            threads=2, threading_layer="workqueue", bandwidth_bytes_s=10e9,
                            kernel_family="avx2", context_used=len(self.tokens), n_ctx=self.n_ctx)

    def measure_bandwidth(self):
        return None

    def session_stats(self) -> dict:
        return {"context_used": len(self.tokens), "n_ctx": self.n_ctx}
