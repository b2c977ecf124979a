"""The load line under the header, and the thread workers behind it: loading a model, fetching
the default model, the first scan for models at start-up.

`LoadBar` shows the stage of a load (from the backend's progress callback, which runs in the
worker) and posts the outcome up: `LoadBar.Loaded`, `LoadBar.Failed`, `LoadBar.Fetched`,
`LoadBar.Scanned`. It handles `Loaded` / `Failed` itself first (it hides); the app then decides
what they mean (title, notices, which backend answers). The backend switches to a new model
only when it is ready, so the previous one keeps answering meanwhile.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import cast

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Label, ProgressBar

from chatapp.backend import ChatBackend, ModelInfo
from chatapp.discovery import ModelEntry
from chatapp.model_headers import SCAN_SECONDS, describe_all
from chatapp.errors import log_exception

LOAD_STAGES = {"open": "Opening", "validate": "Validated", "compile": "Preparing kernels (compiled on the first run)",
               "ready": "Ready", "fetch": "Fetching the default model", "connect": "Connecting to",
               "warm": "Warming up (so the first reply is fast):"}
FETCH_COMMAND = "import sys; from chatapp.cli import main; sys.exit(main(['fetch']))"


class StageReached(Message):
    """A load's stage (from the worker); replaces its queued predecessor."""

    def __init__(self, stage: str, fraction: float | None):
        super().__init__()
        self.stage, self.fraction = stage, fraction

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StageReached)


class LoadBar(Horizontal):
    DEFAULT_CSS = """
    LoadBar { height: 1; padding: 0 1; background: $boost; display: none; }
    LoadBar Label { width: auto; margin-right: 2; }
    LoadBar ProgressBar { width: 30; }
    """

    class Loaded(Message):
        def __init__(self, info: ModelInfo):
            super().__init__()
            self.info = info

    class Failed(Message):
        def __init__(self, path: Path, error: BaseException):
            super().__init__()
            self.path, self.error = path, error

    class Fetched(Message):
        """The default model is on disk now: the app loads it."""

        def __init__(self, path: Path):
            super().__init__()
            self.path = path

    class Scanned(Message):
        """The start-up scan is over: whether any supported model was found."""

        def __init__(self, any_supported: bool):
            super().__init__()
            self.any_supported = any_supported

    def __init__(self, **kw):
        super().__init__(**kw)
        self.loading: Path | None = None   # the model being loaded (or fetched), until Loaded / Failed

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

    # -- loading ------------------------------------------------------------------------------
    def load(self, backend: ChatBackend, path: Path, bind: tuple[int, Path] | None):
        """Load `path` with `backend` in a worker; `bind` = the open chat and its saved state."""
        self.loading = Path(path)
        self.show(f"Loading {self.loading.name}…")
        self._load_worker(backend, self.loading, bind)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_worker(self, backend: ChatBackend, path: Path, bind: tuple[int, Path] | None):
        def progress(stage: str, fraction: float | None):
            self.post_message(StageReached(stage, fraction))

        try:
            # the open chat's saved state goes into the new session before it replaces the old one
            info = backend.load(path, progress, bind=bind)
        except BaseException as e:  # noqa: BLE001  (shown as a notification, never a traceback)
            self.post_message(self.Failed(path, e))
            return
        self.post_message(self.Loaded(info))

    def on_stage_reached(self, m: StageReached):
        name = self.loading.name if self.loading else ""
        label = LOAD_STAGES.get(m.stage, m.stage)
        self.show(f"{label} {name}…" if not m.stage.startswith("fetch") else label, m.fraction)

    def on_load_bar_loaded(self):
        self.loading = None
        self.hide()

    def on_load_bar_failed(self):
        self.loading = None
        self.hide()

    # -- the default model ------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def fetch_default(self):
        """`deltatalk fetch` in a child process, so pip's output never reaches the screen."""
        from chatapp.default_model import default_model_path

        self.post_message(StageReached("fetch", None))
        try:
            proc = subprocess.Popen([sys.executable, "-c", FETCH_COMMAND], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, errors="replace")
            tail: list[str] = []
            for line in proc.stderr or ():
                line = line.strip()
                if line:
                    tail = (tail + [line])[-20:]
                    self.post_message(StageReached("fetch: " + line[:80], None))
            if proc.wait() != 0:
                raise RuntimeError("fetching the default model failed: " + (tail[-1] if tail else "no output"))
        except Exception as e:  # noqa: BLE001
            self.post_message(self.Failed(default_model_path(), e))
            return
        self.post_message(self.Fetched(default_model_path()))

    # -- the first scan -----------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="discover", exit_on_error=False)
    def scan(self, find: Callable[[], list], quitting: threading.Event):
        """Whether any supported model is on this machine (no model was named or remembered)."""
        deadline = time.monotonic() + SCAN_SECONDS
        try:
            # a generator (typed as an Iterator): closed below, which ends the header reader process
            entries = cast("Generator[ModelEntry, None, None]",
                           describe_all(find(), deadline=deadline, cancel=quitting))
            try:
                ok = any(e.supported for e in entries)   # stops reading at the first supported file
            finally:
                entries.close()                          # ends the header reader process now
        except Exception as e:  # noqa: BLE001
            log_exception(e, "startup discovery")
            ok = False
        if not quitting.is_set():
            self.post_message(self.Scanned(ok))
