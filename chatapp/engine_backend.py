"""`ChatBackend` over the local engine: one loaded model and one `ChatSession` at a time.

It wraps `engine.loader.load_model`, `engine.session.ChatSession` and `engine.warmup.warm_up`;
its figures come from `ChatSession.stats()` / `last_turn`. It runs every kernel (warm-up,
replies, the bandwidth probe) on the process's one kernel thread (`engine.kernel_thread`):
the app's workers come from a thread pool that keeps its threads alive, and a second live
thread that has run parallel kernels halves decode speed. All session work (bind, reply,
save) is serialized by one lock. See `chatapp.backend` for the protocol.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from chatapp.backend import (BackendStats, BindTo, ChatKey, LoadProgress, ModelInfo, PrefillProgress,
                             model_figures)
from engine.errors import DeltatalkError
from engine.generate import GenerationResponse
from engine.kernel_thread import kernel_thread
from engine.sampling import SamplingSettings

if TYPE_CHECKING:   # imported when a model is loaded: the app starts without the engine's model code
    from engine.loader import LoadedModel
    from engine.session import ChatSession, TurnStats

# Reply tokens cross from the kernel thread to the app in batches at most this far apart (or
# as far as the caller's `handover` says): a wake-up of the receiving thread per token steals
# a core from the compute threads (2 cores), and even one every 20 ms cost decode 3-4%
# (default model, 512 tokens, 2-vCPU Xeon: 123 vs 131 tok/s at 200 ms).
REPLY_HANDOVER_SECONDS = 0.02

log = logging.getLogger("deltatalk")


class EngineBackend:
    """The real engine. One loaded model + one ChatSession at a time."""

    def __init__(self, threads: int | None = None, n_ctx: int | None = None,
                 bandwidth_bytes_s: float | None = None, speculate: str = "off", draft_model: str | None = None):
        self.threads = threads
        self.speculate = speculate       # engine.speculative mode for replies (config "speculate")
        self.draft_model = draft_model   # the small model for speculate "draft" (config "draft_model")
        self.n_ctx = n_ctx
        self.info: ModelInfo | None = None
        self._loaded: LoadedModel | None = None
        self._session: ChatSession | None = None
        self._lock = threading.Lock()   # guards the swap of (loaded, session)
        self._work = threading.RLock()  # one session operation at a time (reply, bind, save)
        self._owner: ChatKey = None     # the chat key whose conversation the session holds
        self._threading_layer = "?"
        self._threads_in_use = 0
        self._bandwidth = bandwidth_bytes_s
        self._bandwidth_measured: float | None = None
        self._bandwidth_huge = False   # the page size _bandwidth_measured was read with
        self.state_events: list[tuple[ChatKey, str]] = []   # (key, outcome) of every bind, for the log and tests
        self.on_notice: Callable[[str], None] | None = None

    def _notice(self, text: str) -> None:
        log.warning("%s", text)
        if self.on_notice is not None:
            self.on_notice(text)

    def load(self, path: Path, progress: LoadProgress | None = None,
             bind: BindTo | None = None) -> ModelInfo:
        """Load and warm up a model; `bind=(key, state_path)` restores that chat into the new session."""
        from engine.loader import load_model
        from engine.session import ChatSession
        from engine.speculative import make_speculator

        say = progress or (lambda stage, frac: None)
        path = Path(path)
        t0 = time.perf_counter()
        say("open", None)
        loaded = load_model(path, n_ctx=self.n_ctx, within_training_context=True)   # opens + validates; raises ModelFileError
        loaded.template.on_fallback = self._notice    # a template over its limits -> built-in format
        say("validate", 1.0)
        t1 = time.perf_counter()
        say("compile", None)
        # on the kernel thread: a reply on the previous model finishes first, then this runs
        compile_s, layer = kernel_thread().call(self._warm_up, loaded.model)
        session = ChatSession(loaded)
        try:
            draft = None
            if self.speculate == "draft":
                if not self.draft_model:
                    raise DeltatalkError('"speculate": "draft" needs "draft_model" in the config '
                                         "(a small .gguf with the same vocabulary)")
                draft = load_model(Path(self.draft_model).expanduser(), n_ctx=session.n_ctx)
            session.speculator = make_speculator(self.speculate, loaded, draft)
        except (DeltatalkError, ValueError) as e:   # e.g. "mtp" and a file without the MTP block, a
            # draft model with another vocabulary or a bad file, an unknown mode in the config
            self._notice(f"speculative decoding is off for {path.name}: {e}")
            session.speculator = None
        say("warm", None)
        warm_s = kernel_thread().call(self._first_reply_warm_up, session)
        owner = None
        if bind is not None:
            owner = bind[0]
            self._restore(session, bind[0], bind[1])
        info = ModelInfo(path=path, name=path.name, arch=loaded.arch, n_ctx=session.n_ctx,
                         file_size=loaded.file_size, supports_thinking=loaded.template.supports_thinking,
                         load_seconds=t1 - t0, compile_seconds=compile_s, warm_up_seconds=warm_s,
                         base_model=loaded.template.is_fallback)
        with self._lock:   # the previous model served replies until this point
            old = self._loaded
            self._loaded, self._session, self.info = loaded, session, info
            self._owner = owner
            self._threading_layer = layer
        say("ready", 1.0)
        if old is not None and old is not loaded:
            try:
                old.gguf.close()
            except Exception:  # noqa: BLE001
                pass
        return info

    def _warm_up(self, model: object) -> tuple[float, str]:
        """(On the kernel thread.) Set the thread count, compile/run every kernel once."""
        from engine import runtime
        from engine.warmup import warm_up

        self._threads_in_use = runtime.set_threads(self.threads)   # per thread in numba: set it here
        compile_s = warm_up(model)
        try:
            layer = runtime.threading_layer()
        except Exception:  # noqa: BLE001  (a figure for the overlay, never fatal)
            layer = "?"
        return compile_s, layer

    @staticmethod
    def _first_reply_warm_up(session: ChatSession) -> float:
        """(On the kernel thread.) A real 2-token reply, then a reset: the first question of a session
        no longer pays for the kernels and paths that only a whole reply loads (tokenizer, template,
        chunked prefill, sampler); measured: a first TTFT 5-10x the next ones without this."""
        t0 = time.perf_counter()
        try:
            for _ in session.reply([{"role": "user", "content": "Hello, who are you?"}], SamplingSettings(),
                                   max_tokens=2, cancel=threading.Event()):
                pass
        except Exception as e:  # noqa: BLE001  (a template that fails shows on the first real reply)
            log.info("first-reply warm-up skipped: %r", e)
        session.reset()
        return time.perf_counter() - t0

    def _restore(self, session: ChatSession, key: ChatKey, state_path: Path | None) -> str:
        """Load a chat's saved state into `session`, or reset it. Never raises for a bad state."""
        from engine.errors import StateMismatchError

        outcome = "reset"
        if state_path is not None and Path(state_path).is_file():
            try:
                session.load_state(state_path)
                outcome = "loaded"
            except StateMismatchError as e:
                log.info("chat %s: saved state not used (%s); the next reply prefills", key, e)
                session.reset()
                outcome = "mismatch"
            except Exception as e:  # noqa: BLE001  (a state file must never break a chat)
                log.warning("chat %s: could not read the saved state %s: %r", key, state_path, e)
                session.reset()
                outcome = "mismatch"
        else:
            session.reset()
        self.state_events.append((key, outcome))
        return outcome

    def bind(self, key: ChatKey, state_path: Path | None) -> str:
        with self._work:
            session = self._session
            if session is None:
                return "reset"
            if self._owner == key and key is not None:
                return "kept"
            outcome = self._restore(session, key, state_path)
            self._owner = key
            return outcome

    def reply(self, messages: list[dict], settings: SamplingSettings, *, max_tokens: int,
              enable_thinking: bool | None, cancel: threading.Event,
              prefill_progress: PrefillProgress | None = None,
              save_to: Path | None = None,
              handover: Callable[[], float] | None = None) -> Iterator[GenerationResponse]:
        with self._work:
            with self._lock:
                session = self._session
            if session is None:
                raise RuntimeError("no model is loaded")
            # the session works out what is new (append / regenerate / edit) and feeds only that;
            # the state is saved on the kernel thread too, before the last item is handed over
            yield from kernel_thread().iterate(self._reply_and_save, session, messages, settings,
                                               max_tokens, enable_thinking, cancel, prefill_progress, save_to,
                                               pace=handover or REPLY_HANDOVER_SECONDS,
                                               wake_on=lambda r: r.finish_reason is not None)

    def _reply_and_save(self, session: ChatSession, messages: list[dict], settings: SamplingSettings,
                        max_tokens: int, enable_thinking: bool | None, cancel: threading.Event,
                        prefill_progress: PrefillProgress | None,
                        save_to: Path | None) -> Iterator[GenerationResponse]:
        yield from session.reply(messages, settings, max_tokens=max_tokens, cancel=cancel,
                                 prefill_progress=prefill_progress, enable_thinking=enable_thinking)
        if save_to is not None:
            self._save(session, Path(save_to))

    @staticmethod
    def _save(session: ChatSession, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            n = session.save_state(path)
            log.info("saved chat state %s (%d bytes, %.0f ms)", path.name, n, (time.perf_counter() - t0) * 1000)
        except Exception as e:  # noqa: BLE001  (the chat text is in SQLite; the state is only a cache)
            log.warning("could not save the chat state %s: %r", path, e)

    def last_turn(self) -> TurnStats:
        s = self._session
        if s is None:
            from engine.session import TurnStats

            return TurnStats()
        return replace(s.last_turn)   # a copy: the next reply changes it

    def session_stats(self) -> dict[str, int]:
        """ChatSession.stats(): context used / size, cache bytes (cheap; called per text batch)."""
        s = self._session
        return {} if s is None else s.stats()

    def measure_bandwidth(self) -> float | None:
        """The machine's read bandwidth (measured once per process; slow the first time: a worker only)."""
        if self._bandwidth:
            return self._bandwidth
        loaded = self._loaded
        huge = loaded is not None and loaded.gguf.pages is not None and loaded.gguf.pages.on_huge_pages   # read the weights' page size
        if self._bandwidth_measured is None or self._bandwidth_huge != huge:
            from engine import runtime

            try:
                self._bandwidth_measured = float(kernel_thread().call(runtime.memory_bandwidth_bytes_s, huge))
                self._bandwidth_huge = huge
            except Exception as e:  # noqa: BLE001  (a figure for the overlay, never fatal)
                log.warning("bandwidth measurement failed: %r", e)
        return self._bandwidth_measured

    def stats(self) -> BackendStats:
        from engine import runtime

        st = BackendStats(threading_layer=self._threading_layer)
        st.threads = self._threads_in_use   # numba's count is per thread: the kernel thread's
        policy = runtime.threads_in_use()   # the count the kernel thread's last step used
        if self._threads_in_use:
            st.threads, st.threads_max, st.threads_policy = policy["threads"], policy["max_threads"], policy["policy"]
            st.cpus = policy["cpus"]
        st.rss_bytes = runtime.current_rss_bytes()
        st.peak_rss_bytes = runtime.peak_rss_bytes()
        st.cpu_features = runtime.cpu_features()
        st.kernel_family = runtime.kernel_family()
        if self._bandwidth:
            st.bandwidth_bytes_s = self._bandwidth
        elif self._bandwidth_measured:   # measure_bandwidth() ran in a worker
            st.bandwidth_bytes_s = self._bandwidth_measured
            st.bandwidth_measured = True
        loaded, session = self._loaded, self._session
        if loaded is not None:
            st.model_bytes = model_figures(loaded).weight_bytes
            pages = loaded.gguf.pages
            st.weight_pages = pages.describe() if pages is not None else ""
        if session is not None:
            ss = session.stats()
            st.context_used, st.n_ctx = ss["context_used"], ss["n_ctx"]
            st.kv_bytes, st.state_bytes = ss["kv_bytes"], ss["state_bytes"]
            st.checkpoint_bytes, st.checkpoints = ss["checkpoint_bytes"], ss["checkpoints"]
        return st
