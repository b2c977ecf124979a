"""Modal screens: model picker, chat list, text prompts, chat settings, confirmations, help."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.message import Message
from textual.widgets import (Button, Checkbox, DataTable, Input, Label, Markdown, OptionList, Static,
                             TextArea)
from textual.widgets.option_list import Option

from chatapp.discovery import Candidate, ModelEntry, human_bytes
from chatapp.model_headers import SCAN_SECONDS, describe_all
from chatapp.prompt_input import EnterSubmitsTextArea
from chatapp.transcript import model_label


class _Modal(ModalScreen):
    DEFAULT_CSS = """
    _Modal { align: center middle; }
    _Modal > Vertical {
        width: 90%; max-width: 130; height: auto; max-height: 90%;
        padding: 1 2; background: $surface; border: thick $accent;
    }
    _Modal .title { text-style: bold; margin-bottom: 1; }
    _Modal .hint { color: $text-muted; margin-top: 1; width: 100%; }
    _Modal .buttons { height: auto; margin-top: 1; align-horizontal: right; }
    _Modal .buttons Button { margin-left: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Close")]

    def action_cancel(self):
        self.dismiss(None)


# -- model picker ---------------------------------------------------------------------------
class ModelPicker(_Modal):
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
            table = DataTable(cursor_type="row", zebra_stripes=True, id="picker-table")
            # Status right after the name: at 80 columns the right-hand columns scroll out of view
            for label in ("Model", "Status", "Size", "Quant", "Context", "Arch", "From"):
                table.add_column(label, key=label.lower())
            yield table
            yield Label("", id="picker-detail", classes="hint")
            yield Label("Looking for GGUF files…", id="picker-status", classes="hint")
            if self.endpoints:
                yield Label("Remote endpoints (OpenAI-compatible)", classes="title")
                remote = DataTable(cursor_type="row", zebra_stripes=True, id="picker-remote")
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
                name = what.model + ("  (in use)" if self.current_endpoint == (what.url, what.model) else "")
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


def shorten(text: str, width: int) -> str:
    """Cut at a word (or name) boundary before `width` columns, with an ellipsis."""
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    for sep in (" ", "-", "_", "."):
        i = cut.rfind(sep)
        if i >= width // 2:
            cut = cut[:i]
            break
    return cut.rstrip(" -_.") + "…"


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


def chat_date(ts: float, now: float | None = None) -> str:
    """Today: the time; this year: day and month; else the full date."""
    t, today = time.localtime(ts), time.localtime(now if now is not None else time.time())
    if t[:3] == today[:3]:
        return time.strftime("today %H:%M", t)
    if t.tm_year == today.tm_year:
        return f"{t.tm_mday} {time.strftime('%b', t)}"
    return f"{t.tm_mday} {time.strftime('%b %Y', t)}"


# -- chat list ----------------------------------------------------------------------------
class ChatList(_Modal):
    """Returns ("open", id) | ("new", None) | None; rename and delete happen in place.

    Each chat shows its date, model and size; / searches titles, models and message text."""

    BINDINGS = [
        Binding("escape", "cancel", "Close"),
        Binding("n", "new", "New chat"),
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete"),
        Binding("slash", "search", "Search"),
    ]
    DEFAULT_CSS = """
    ChatList #chat-options { height: auto; max-height: 60vh; }
    ChatList #chat-search { margin-bottom: 1; }
    """

    def __init__(self, store, current_id: int | None = None):
        super().__init__()
        self.store = store
        self.current_id = current_id

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Chats", classes="title")
            yield Input(placeholder="/ search titles, models and messages", id="chat-search", compact=True)
            yield OptionList(id="chat-options")
            yield Label("Enter opens · / search · n new · r rename · d delete · Esc closes", classes="hint")

    def on_mount(self):
        self.reload()
        self.query_one(OptionList).focus()

    def action_search(self):
        self.query_one("#chat-search", Input).focus()

    @on(Input.Changed, "#chat-search")
    def _search(self):
        self.reload()

    @on(Input.Submitted, "#chat-search")
    def _search_submitted(self):
        cid = self._selected_id()
        if cid is not None:
            self.dismiss(("open", cid))

    def on_key(self, event):
        # Down from the search box goes to the list
        if event.key == "down" and isinstance(self.focused, Input):
            event.stop()
            self.query_one(OptionList).focus()

    def reload(self, highlight: int | None = None):
        ol = self.query_one(OptionList)
        ol.clear_options()
        query = self.query_one("#chat-search", Input).value
        chats = self.store.search_chats(query)
        width = max(20, self.app.size.width - 20)
        for c in chats:
            mark = "● " if c.id == self.current_id else "  "
            n = f"{c.n_messages} message{'s' if c.n_messages != 1 else ''}"
            about = " · ".join(x for x in (chat_date(c.updated), model_label(c.model or ""), n) if x)
            text = Text(mark + shorten(c.title, width))
            text.append("\n    " + about, style="dim")
            ol.add_option(Option(text, id=str(c.id)))
        if not chats and query.strip():
            ol.add_option(Option(Text(f"  no chat contains “{query.strip()}”", style="dim"), disabled=True))
        if chats:
            ids = [c.id for c in chats]
            want = highlight if highlight in ids else (self.current_id if self.current_id in ids else ids[0])
            ol.highlighted = ids.index(want)

    def _selected_id(self) -> int | None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None or ol.option_count == 0:
            return None
        option = ol.get_option_at_index(ol.highlighted)
        return int(option.id) if option.id is not None else None

    @on(OptionList.OptionSelected)
    def _open(self, event: OptionList.OptionSelected):
        self.dismiss(("open", int(event.option.id)))

    def action_new(self):
        self.dismiss(("new", None))

    def action_rename(self):
        cid = self._selected_id()
        if cid is None:
            return
        chat = self.store.get_chat(cid)

        def done(title: str | None):
            if title and title.strip():
                def renamed():
                    getattr(self.app, "chat_renamed", lambda _cid: None)(cid)
                    if self.app.screen is self:   # a rename kept for a locked history may land later
                        self.reload(cid)

                self.app.save_to_history("the new title", lambda: self.store.update_chat(cid, title=title.strip()),
                                         renamed)

        self.app.push_screen(TextPrompt("Rename chat", chat.title if chat else ""), done)

    def action_delete(self):
        cid = self._selected_id()
        if cid is None:
            return
        chat = self.store.get_chat(cid)

        def done(yes: bool | None):
            if yes:
                self.app.delete_chat(cid)
                self.reload()

        self.app.push_screen(Confirm(f"Delete the chat “{chat.title if chat else cid}”?", "Delete"), done)


# -- small dialogs --------------------------------------------------------------------------
class TextPrompt(_Modal):
    """One line (or several, multiline=True) of text; returns it or None."""

    def __init__(self, title: str, value: str = "", *, multiline: bool = False, hint: str = ""):
        super().__init__()
        self.title_text, self.value, self.multiline, self.hint = title, value, multiline, hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            if self.multiline:
                yield TextArea(self.value, id="prompt-text")
            else:
                yield Input(self.value, id="prompt-text")
            if self.hint:
                yield Label(self.hint, classes="hint")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("OK", variant="primary", id="ok")

    def on_mount(self):
        self.query_one("#prompt-text").focus()

    def _value(self) -> str:
        w = self.query_one("#prompt-text")
        return w.text if isinstance(w, TextArea) else w.value

    @on(Input.Submitted)
    def _submit(self):
        self.dismiss(self._value())

    @on(Button.Pressed, "#ok")
    def _ok(self):
        self.dismiss(self._value())

    @on(Button.Pressed, "#cancel")
    def _cancel(self):
        self.dismiss(None)


class Confirm(_Modal):
    AUTO_FOCUS = "#yes"

    def __init__(self, question: str, yes: str = "Yes", no: str = "Cancel"):
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question)
            with Horizontal(classes="buttons"):
                yield Button(self.no, id="no")
                yield Button(self.yes, variant="primary", id="yes")

    @on(Button.Pressed, "#yes")
    def _yes(self):
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def _no(self):
        self.dismiss(False)


SAMPLING_FIELDS = [
    ("temperature", float, "temperature (0 = greedy)"),
    ("top_k", int, "top-k (0 = off)"),
    ("top_p", float, "top-p"),
    ("min_p", float, "min-p"),
    ("repeat_penalty", float, "repeat penalty (1 = off)"),
    ("repeat_last_n", int, "repeat window"),
    ("seed", int, "seed (empty = random)"),
    ("max_tokens", int, "max tokens per reply"),
]


class ChatSettings(_Modal):
    """Per-chat system prompt and sampling settings; returns a dict or None.

    The system prompt has the focus when it opens; Enter saves from any field (Ctrl+J or
    Alt+Enter adds a line to the system prompt); Esc cancels; the form scrolls on a small screen.
    """

    DEFAULT_CSS = """
    ChatSettings #cs-form { height: auto; max-height: 50vh; }
    ChatSettings #cs-system { height: auto; min-height: 3; max-height: 6; margin-bottom: 1; }
    ChatSettings .row { height: 1; }
    ChatSettings .row Label { width: 28; }
    ChatSettings .row Input { width: 1fr; }
    ChatSettings .buttons { height: 1; }
    ChatSettings .buttons .hint { width: 1fr; margin-top: 0; }
    """

    def __init__(self, system_prompt: str, values: dict, thinking: bool | None, supports_thinking: bool):
        super().__init__()
        self.system_prompt, self.values = system_prompt, values
        self.thinking, self.supports_thinking = thinking, supports_thinking

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Chat settings", classes="title")
            with VerticalScroll(id="cs-form"):
                yield Label("System prompt")
                yield EnterSubmitsTextArea(self.system_prompt, id="cs-system")
                for key, _kind, label in SAMPLING_FIELDS:
                    v = self.values.get(key)
                    with Horizontal(classes="row"):
                        yield Label(label)
                        yield Input("" if v is None else str(v), id=f"cs-{key}", compact=True)
                with Horizontal(classes="row"):
                    yield Label("thinking" + ("" if self.supports_thinking else " (model has none)"))
                    yield Checkbox("on", value=bool(self.thinking) if self.thinking is not None else True,
                                   id="cs-thinking", disabled=not self.supports_thinking, compact=True)
            with Horizontal(classes="buttons"):
                yield Label("Enter saves · Esc cancels", classes="hint")
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("Save", variant="primary", id="ok", compact=True)

    def on_mount(self):
        area = self.query_one("#cs-system", EnterSubmitsTextArea)
        area.focus()
        area.move_cursor(area.document.end)

    @on(Button.Pressed, "#cancel")
    def _cancel(self):
        self.dismiss(None)

    @on(Input.Submitted)
    @on(EnterSubmitsTextArea.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self, event: Message | None = None):
        if event is not None:
            event.stop()   # the system prompt's Submitted must not reach the app (it would be sent)
        out: dict = {"system_prompt": self.query_one("#cs-system", EnterSubmitsTextArea).text, "sampling": {}}
        for key, kind, label in SAMPLING_FIELDS:
            field = self.query_one(f"#cs-{key}", Input)
            raw = field.value.strip()
            if raw == "":
                if key == "seed":
                    out["sampling"][key] = None
                continue
            try:
                out["sampling"][key] = kind(raw)
            except ValueError:
                self.notify(f"{label}: {raw!r} is not a number", severity="error")
                field.focus()
                return
        if self.supports_thinking:
            out["thinking"] = self.query_one("#cs-thinking", Checkbox).value
        self.dismiss(out)


class HelpScreen(_Modal):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical():
            with VerticalScroll():
                yield Markdown(self.text)
            yield Label("Esc closes", classes="hint")
