"""The model picker: GGUF files found on this machine and the models of saved remote endpoints."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Label

from chatapp.discovery import Candidate, ModelEntry, human_bytes
from chatapp.model_headers import SCAN_SECONDS, describe_all
from chatapp.screens.modal import Modal, shorten


class ModelPicker(Modal):
    """Lists GGUF files found on this machine and the models of saved remote endpoints.

    Returns the chosen path, a `chatapp.remote.RemoteChoice`, or None. Endpoints are asked
    for their models (GET /models) in a worker; one that does not answer is listed with why.
    """

    DEFAULT_CSS = """
    ModelPicker DataTable { height: auto; max-height: 40vh; }
    ModelPicker #picker-remote { max-height: 10; }
    ModelPicker #picker-path { margin-top: 1; }
    """

    def __init__(self, find: Callable[[], list[Candidate]], current: Path | None = None,
                 endpoints: list[dict] | None = None, current_endpoint: tuple[str, str] | None = None):
        super().__init__()
        self.find = find
        self.current = current
        self.entries: dict[str, ModelEntry] = {}
        self.done_scanning = False
        self._stop_scan = threading.Event()   # set when the picker closes: the header reader stops
        self.endpoints = endpoints or []        # [{"url", "api_key_env", "model"}] from the config
        self.current_endpoint = current_endpoint  # (url, model) in use, if remote
        self.remote_rows: dict[str, object] = {}  # row key -> RemoteChoice, or the reason it is unreachable

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Choose a model", classes="title")
            table: DataTable = DataTable(cursor_type="row", zebra_stripes=True, id="picker-table")
            # Status right after the name: at 80 columns the right-hand columns scroll out of view
            for label in ("Model", "Status", "Size", "Quant", "Context", "Arch", "From"):
                table.add_column(label, key=label.lower())
            yield table
            yield Label("", id="picker-detail", classes="hint")
            yield Label("Looking for GGUF files…", id="picker-status", classes="hint")
            if self.endpoints:
                yield Label("Remote endpoints (OpenAI-compatible)", classes="title")
                remote: DataTable = DataTable(cursor_type="row", zebra_stripes=True, id="picker-remote")
                remote.add_columns("Model", "Endpoint", "Context", "Status")
                yield remote
            # (the keys are in the placeholder: at 80x24 a separate hint line would be cut off)
            yield Input(placeholder="Enter loads the highlighted model · Esc closes · or type a .gguf path here",
                        id="picker-path")

    def on_mount(self):
        self.query_one("#picker-table", DataTable).focus()
        self.scan()
        if self.endpoints:
            self.probe_endpoints()

    @work(thread=True, exclusive=True, group="endpoints", exit_on_error=False)
    def probe_endpoints(self):
        from chatapp.remote import OpenAIEndpoint, RemoteChoice, RemoteError, api_key_from_env

        for i, ep in enumerate(self.endpoints):
            try:
                endpoint = OpenAIEndpoint(ep["url"], api_key_from_env(ep.get("api_key_env")), connect_timeout=3.0)
                models = endpoint.models()
                rows = [(RemoteChoice(endpoint.url, m["id"], ep.get("api_key_env")), m["context_length"])
                        for m in models] or [("lists no models", None)]
            except RemoteError as e:
                rows = [(str(e), None)]
            except Exception as e:  # noqa: BLE001  (a bad entry never breaks the picker)
                rows = [(f"{type(e).__name__}: {e}", None)]
            self.app.call_from_thread(self._add_remote, i, ep["url"], rows)

    def _add_remote(self, i: int, url: str, rows: list):
        from chatapp.remote import RemoteChoice

        table = self.query_one("#picker-remote", DataTable)
        for j, (what, ctx) in enumerate(rows):
            key = f"remote:{i}:{j}"
            self.remote_rows[key] = what
            if isinstance(what, RemoteChoice):
                name = (what.model or "") + ("  (in use)" if self.current_endpoint == (what.url, what.model) else "")
                table.add_row(name, what.url, f"{ctx:,}" if ctx else "?", "✓ reachable", key=key)
            else:
                table.add_row("—", url, "", f"✗ {what}", key=key)

    @on(DataTable.RowSelected, "#picker-remote")
    def _chosen_remote(self, event: DataTable.RowSelected):
        from chatapp.remote import RemoteChoice

        what = self.remote_rows.get(str(event.row_key.value))
        if isinstance(what, RemoteChoice):
            self.dismiss(what)
        elif what is not None:
            self.notify(str(what), severity="warning", title="Endpoint not reachable")

    def on_unmount(self):
        self._stop_scan.set()

    @work(thread=True, exclusive=True, group="discover", exit_on_error=False)
    def scan(self):
        """Off the UI thread; headers are read in discovery's worker process, the whole scan time-boxed."""
        deadline = time.monotonic() + SCAN_SECONDS
        try:
            found = self.find()
        except Exception as e:  # noqa: BLE001
            self.app.call_from_thread(self._scan_failed, e)
            return
        for entry in describe_all(found, deadline=deadline, cancel=self._stop_scan):
            if self._stop_scan.is_set():
                return
            self.app.call_from_thread(self._add, entry)
        if not self._stop_scan.is_set():
            self.app.call_from_thread(self._scan_done, len(found))

    def _scan_failed(self, e: Exception):
        from chatapp.errors import describe_error, log_exception

        log_exception(e, "model discovery")
        self.query_one("#picker-status", Label).update(describe_error(e, "discovery failed"))

    def _add(self, e: ModelEntry):
        key = str(e.path)
        self.entries[key] = e
        table = self.query_one("#picker-table", DataTable)
        loaded = "  (loaded)" if self.current and Path(self.current) == e.path else ""
        name = shorten(e.name, max(16, self.app.size.width // 3) - len(loaded)) + loaded
        table.add_row(name, entry_status(e), human_bytes(e.size), e.quant,
                      f"{e.context:,}" if e.context else "?", e.arch, e.source, key=key)

    def _scan_done(self, n: int):
        self.done_scanning = True
        self.query_one("#picker-status", Label).update(scan_summary(list(self.entries.values())))
        if not self.entries:
            self.query_one("#picker-path", Input).focus()

    @on(DataTable.RowHighlighted, "#picker-table")
    def _highlighted(self, event: DataTable.RowHighlighted):
        """The whole reason for an unsupported row (the Status column holds a short form)."""
        e = self.entries.get(str(event.row_key.value))
        detail = self.query_one("#picker-detail", Label)
        text = entry_detail(e) if e is not None else ""
        detail.update(text)
        detail.display = bool(text)

    @on(DataTable.RowSelected, "#picker-table")
    def _chosen(self, event: DataTable.RowSelected):
        e = self.entries.get(str(event.row_key.value))
        if e is None:
            return
        if not e.supported:
            self.notify(f"{e.name}: {readable_reason(e.reason)}", severity="warning", title="Not supported")
            return
        self.dismiss(e.path)

    @on(Input.Submitted, "#picker-path")
    def _typed(self, event: Input.Submitted):
        p = Path(event.value.strip()).expanduser()
        if not event.value.strip():
            return
        if event.value.strip().startswith(("http://", "https://")):   # an endpoint URL
            from chatapp.remote import RemoteChoice

            self.dismiss(RemoteChoice(event.value.strip()))
            return
        if not p.is_file():
            self.notify(f"no such file: {p}", severity="warning")
            return
        self.dismiss(p)


BASE_MODEL = "base model: completion only"
_BYTES_REPR = re.compile(r"""\(?magic b(['"])(?:\\.|(?!\1).)*\1\)?|b(['"])(?:\\.|(?!\2).)*\2""")


def readable_reason(reason: str) -> str:
    """A discovery reason without raw Python values (a file's first bytes are not for people)."""
    return " ".join(_BYTES_REPR.sub("", reason).split()).replace("( ", "(").replace(" )", ")") or reason


def entry_status(e: ModelEntry) -> str:
    """The Status column: short; the whole reason is in the line under the table."""
    if e.supported:
        return f"✓ {BASE_MODEL}" if not e.has_chat_template else "✓ supported"
    short = re.split(r"\s*[(:]", readable_reason(e.reason), maxsplit=1)[0]
    return "✗ " + shorten(short, 30)


def entry_detail(e: ModelEntry) -> str:
    if not e.supported:
        return f"{e.name}: {readable_reason(e.reason)}"
    if not e.has_chat_template:
        return (f"{e.name}: no chat template in the file, so it is a base model: it continues text "
                "instead of answering, and may ramble or repeat itself.")
    return ""


def scan_summary(entries: list[ModelEntry]) -> str:
    """Files that are not readable GGUF models are counted apart from the models."""
    if not entries:
        return ("No GGUF files found. Put models in the models folder, add folders in the config, "
                "or type a path below.")
    models = [e for e in entries if e.arch != "?"]   # a header with an architecture; broken files are counted apart
    ok = sum(1 for e in models if e.supported)
    msg = f"{len(models)} model{'s' if len(models) != 1 else ''} found, {ok} supported."
    broken = len(entries) - len(models)
    if broken:
        msg += f" {broken} file{'s' if broken != 1 else ''} could not be read as GGUF (highlight for why)."
    return msg
