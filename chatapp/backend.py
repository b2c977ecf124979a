"""The TUI's view of an inference engine: a small protocol and two implementations.

`ChatBackend` is everything the app needs: load a model (with progress), stream a
reply to a list of messages, and report figures for the gauge and the speed overlay.

- `EngineBackend` wraps `engine.loader.load_model`, `engine.session.ChatSession` and
  `engine.warmup.warm_up`; its figures come from `ChatSession.stats()` / `last_turn`.
- `chatapp.remote.RemoteBackend` talks to an OpenAI-compatible server (deltatalk serve,
  vLLM, llama.cpp's server, Ollama); its figures are measured at the client.
- `FakeBackend` is scripted and deterministic with frozen timings; the TUI tests use
  it, so they never load a real model or compile numba.

Everything here is called from the app's thread workers, never from the UI thread,
except `info` / `last_turn()` which are cheap reads. `EngineBackend` runs every kernel
(warm-up, replies, the bandwidth probe) on the process's one kernel thread
(`engine.kernel_thread`): the app's workers come from a thread pool that keeps its threads
alive, and a second live thread that has run parallel kernels halves decode speed.

Chat states: the session belongs to one chat at a time. `bind(key, state_path)` makes it
that chat's: kept if it already is, else restored from the chat's saved state (no
prefill needed), else reset. `reply(..., save_to=path)` writes the session's state there
once the reply has finished (still in the worker thread, before the generator ends).
All session work (bind, reply, save) is serialized by one lock.

Notices: `on_notice` (set by the app) receives one-line messages the user must see that are
not errors, from whatever thread found them: today, that the model's chat template went over
a render limit and the built-in format of its architecture is used instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from engine.generate import GenerationResponse
from engine.kernel_thread import kernel_thread
from engine.sampling import SamplingSettings

# progress(stage, fraction): stage is a short label ("open", "validate", "compile", ...);
# fraction in [0, 1], or None when the stage has no measurable progress.
LoadProgress = Callable[[str, "float | None"], None]
PrefillProgress = Callable[[int, int], None]

DEFAULT_BANDWIDTH_BYTES_S = 15e9   # used until the engine measures the machine's bandwidth
# Reply tokens cross from the kernel thread to the app in batches at most this far apart: a
# wake-up of the receiving thread per token steals a core from the compute threads (2 cores).
REPLY_HANDOVER_SECONDS = 0.02

log = logging.getLogger("deltatalk")


@dataclass
class ModelInfo:
    """What the app shows about the loaded model."""

    path: Path
    name: str
    arch: str
    n_ctx: int
    file_size: int
    supports_thinking: bool = False
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    endpoint: str = ""            # the API base URL of a remote model (chatapp.remote), else ""
    warm_up_seconds: float = 0.0  # the first-reply warm-up (a short real reply, then a reset)
    base_model: bool = False      # no chat template in the file: a completion model, not a chat model


@dataclass
class TurnInfo:
    """The prompt side of the last reply (cache reuse)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    dropped_messages: int = 0     # oldest messages left out because the context was full
    mode: str = ""                # append | regenerate | edit | full
    restored_from: int | None = None


@dataclass
class BackendStats:
    """Figures for the speed overlay. Bytes are 0 when the engine does not have the thing."""

    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    model_bytes: int = 0
    kv_bytes: int = 0
    state_bytes: int = 0          # recurrent (DeltaNet) state
    checkpoint_bytes: int = 0
    threads: int = 1
    threads_max: int = 1
    threads_policy: str = ""          # "adaptive" (fewer threads while the CPU is busy) or "fixed"
    threading_layer: str = "?"
    bandwidth_bytes_s: float = DEFAULT_BANDWIDTH_BYTES_S
    bandwidth_measured: bool = False
    context_used: int = 0
    n_ctx: int = 0
    checkpoints: int = 0
    cpu_features: list[str] = field(default_factory=list)
    kernel_family: str = ""
    remote: str = ""              # the endpoint URL when the model runs elsewhere (no local memory figures)


class ChatBackend(Protocol):
    info: ModelInfo | None
    on_notice: Callable[[str], None] | None   # set by the app; called from worker threads

    def load(self, path: Path, progress: LoadProgress | None = None) -> ModelInfo:
        """Open, validate and warm up a model; switch to it only when it is ready."""

    def reply(self, messages: list[dict], settings: SamplingSettings, *, max_tokens: int,
              enable_thinking: bool | None, cancel: threading.Event,
              prefill_progress: PrefillProgress | None = None,
              save_to: Path | None = None) -> Iterator[GenerationResponse]:
        """Stream one assistant reply to `messages`; then save the session state to `save_to`."""

    def bind(self, key, state_path: Path | None) -> str:
        """Give the session to chat `key`: "kept" | "loaded" | "reset" | "mismatch"."""

    def last_turn(self) -> TurnInfo: ...

    def stats(self) -> BackendStats: ...


# ---------------------------------------------------------------------------------------
class EngineBackend:
    """The real engine. One loaded model + one ChatSession at a time."""

    def __init__(self, threads: int | None = None, n_ctx: int | None = None,
                 bandwidth_bytes_s: float | None = None, speculate: str = "off"):
        self.threads = threads
        self.speculate = speculate   # engine.speculative mode for replies (the app offers off / lookup)
        self.n_ctx = n_ctx
        self.info: ModelInfo | None = None
        self._loaded = None
        self._session = None
        self._lock = threading.Lock()   # guards the swap of (loaded, session)
        self._work = threading.RLock()  # one session operation at a time (reply, bind, save)
        self._owner = None              # the chat key whose conversation the session holds
        self._threading_layer = "?"
        self._threads_in_use = 0
        self._bandwidth = bandwidth_bytes_s
        self._bandwidth_measured: float | None = None
        self.state_events: list[tuple] = []   # (key, outcome) of every bind, for the log and tests
        self.on_notice: Callable[[str], None] | None = None

    def _notice(self, text: str):
        log.warning("%s", text)
        if self.on_notice is not None:
            self.on_notice(text)

    def load(self, path: Path, progress: LoadProgress | None = None,
             bind: tuple | None = None) -> ModelInfo:
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
        session.speculator = make_speculator(self.speculate, loaded)
        say("warm", None)
        warm_s = kernel_thread().call(self._first_reply_warm_up, session)
        owner = None
        if bind is not None:
            owner = bind[0]
            self._restore(session, bind[0], bind[1])
        supports = bool(getattr(getattr(loaded, "template", None), "supports_thinking", False))
        info = ModelInfo(path=path, name=path.name, arch=loaded.arch, n_ctx=session.n_ctx,
                         file_size=loaded.file_size, supports_thinking=supports,
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

    def _warm_up(self, model) -> tuple[float, str]:
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
    def _first_reply_warm_up(session) -> float:
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

    def _restore(self, session, key, state_path: Path | None) -> str:
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

    def bind(self, key, state_path: Path | None) -> str:
        with self._work:
            session = self._session
            if session is None:
                return "reset"
            if self._owner == key and key is not None:
                return "kept"
            outcome = self._restore(session, key, state_path)
            self._owner = key
            return outcome

    def reply(self, messages, settings, *, max_tokens, enable_thinking, cancel, prefill_progress=None,
              save_to: Path | None = None):
        with self._work:
            with self._lock:
                session = self._session
            if session is None:
                raise RuntimeError("no model is loaded")
            # the session works out what is new (append / regenerate / edit) and feeds only that;
            # the state is saved on the kernel thread too, before the last item is handed over
            yield from kernel_thread().iterate(self._reply_and_save, session, messages, settings,
                                               max_tokens, enable_thinking, cancel, prefill_progress, save_to,
                                               pace=REPLY_HANDOVER_SECONDS)

    def _reply_and_save(self, session, messages, settings, max_tokens, enable_thinking, cancel,
                        prefill_progress, save_to):
        yield from session.reply(messages, settings, max_tokens=max_tokens, cancel=cancel,
                                 prefill_progress=prefill_progress, enable_thinking=enable_thinking)
        if save_to is not None:
            self._save(session, Path(save_to))

    @staticmethod
    def _save(session, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            n = session.save_state(path)
            log.info("saved chat state %s (%d bytes, %.0f ms)", path.name, n, (time.perf_counter() - t0) * 1000)
        except Exception as e:  # noqa: BLE001  (the chat text is in SQLite; the state is only a cache)
            log.warning("could not save the chat state %s: %r", path, e)

    def last_turn(self) -> TurnInfo:
        s = self._session
        if s is None:
            return TurnInfo()
        t = s.last_turn
        return TurnInfo(t.prompt_tokens, t.reused_tokens, t.prefilled_tokens,
                        int(getattr(t, "dropped_messages", 0) or 0), str(getattr(t, "mode", "") or ""),
                        getattr(t, "restored_from", None))

    def session_stats(self) -> dict:
        """ChatSession.stats(): context used / size, cache bytes (cheap; called per text batch)."""
        s = self._session
        if s is None:
            return {}
        if callable(getattr(s, "stats", None)):
            return s.stats()
        return {"context_used": len(s.tokens), "n_ctx": s.n_ctx}

    def measure_bandwidth(self) -> float | None:
        """The machine's read bandwidth (measured once per process; slow the first time: a worker only)."""
        if self._bandwidth:
            return self._bandwidth
        if self._bandwidth_measured is None:
            from engine import runtime

            measured = getattr(runtime, "memory_bandwidth_bytes_s", None)
            if callable(measured):
                try:
                    self._bandwidth_measured = float(kernel_thread().call(measured))
                except Exception as e:  # noqa: BLE001
                    log.warning("bandwidth measurement failed: %r", e)
        return self._bandwidth_measured

    def stats(self) -> BackendStats:
        from engine import runtime

        st = BackendStats(threading_layer=self._threading_layer)
        st.threads = self._threads_in_use   # numba's count is per thread: the kernel thread's
        policy = runtime.threads_in_use()   # the count the kernel thread's last step used
        if self._threads_in_use:
            st.threads, st.threads_max, st.threads_policy = policy["threads"], policy["max_threads"], policy["policy"]
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
            st.model_bytes = int(getattr(loaded.model, "weight_bytes", 0) or loaded.file_size)
        if session is not None:
            if callable(getattr(session, "stats", None)):
                ss = session.stats()
                st.context_used = int(ss.get("context_used", 0))
                st.n_ctx = int(ss.get("n_ctx", 0))
                st.kv_bytes = int(ss.get("kv_bytes", 0))
                st.state_bytes = int(ss.get("state_bytes", 0))
                st.checkpoint_bytes = int(ss.get("checkpoint_bytes", 0))
                st.checkpoints = int(ss.get("checkpoints", 0))
            else:   # an engine without ChatSession.stats()
                st.context_used = len(session.tokens)
                for c in session.cache:
                    if getattr(c, "kind", "kv") == "kv":
                        st.kv_bytes += int(getattr(c, "nbytes", 0))
                    else:
                        st.state_bytes += int(getattr(c, "nbytes", 0))
                st.checkpoint_bytes = int(getattr(session, "checkpoint_bytes", 0) or 0)
        return st


# ---------------------------------------------------------------------------------------
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
        self._turn = TurnInfo()
        self._n = 0
        self._stats = stats
        self.started = threading.Event()     # set when a reply starts streaming
        # hold_after=N: each reply pauses after N tokens until `resume` is set (or it is cancelled);
        # `held` is set while it waits. Makes stop/scroll tests independent of machine speed.
        self.hold_after = hold_after
        self.held = threading.Event()
        self.resume = threading.Event()
        self._owner = None
        self._work = threading.RLock()
        self.binds: list[tuple] = []         # (key, outcome) of every bind
        self.saves: list[tuple] = []         # (path, saved on the UI thread?) of every save

    def load(self, path, progress=None, bind=None):
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
        if key is not None and getattr(self, "_owner", None) == key:
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
        """Drop the oldest turns (never a leading system prompt or the last message) until it fits."""
        reserve = max(1, min(max_tokens, self.n_ctx // 4))
        if len(self._prompt_tokens(messages)) + reserve <= self.n_ctx:
            return messages, 0
        head = [m for m in messages[:1] if m.get("role") == "system"]
        body = messages[len(head):]
        for drop in range(1, len(body)):
            rest = body[drop:]
            if rest[0].get("role") == "user" and len(self._prompt_tokens(head + rest)) + reserve <= self.n_ctx:
                return head + rest, drop
        from engine.errors import ContextOverflowError

        raise ContextOverflowError("the last message does not fit the context")

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
              save_to=None):
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
        self._turn = TurnInfo(len(prompt), reuse, suffix, dropped, "full" if dropped else "append")
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

    def last_turn(self) -> TurnInfo:
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
