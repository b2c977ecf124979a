"""The chat list: open, search, rename and delete chats (Ctrl+L)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from chatapp.screens.dialogs import Confirm, TextPrompt
from chatapp.screens.modal import Modal, shorten
from chatapp.history_writes import HistoryWriter
from chatapp.store import ChatStore
from chatapp.transcript import model_label


def chat_date(ts: float, now: float | None = None) -> str:
    """Today: the time; this year: day and month; else the full date."""
    t, today = time.localtime(ts), time.localtime(now if now is not None else time.time())
    if t[:3] == today[:3]:
        return time.strftime("today %H:%M", t)
    if t.tm_year == today.tm_year:
        return f"{t.tm_mday} {time.strftime('%b', t)}"
    return f"{t.tm_mday} {time.strftime('%b %Y', t)}"


class ChatList(Modal):
    """Returns ("open", id) | ("new", None) | None; rename and delete happen in place.

    Each chat shows its date, model and size; / searches titles, models and message text.
    A rename or a delete is done in the history here and then told to the app (`Renamed`,
    `Deleted`), which updates what it shows; `busy_id` is the chat whose reply is streaming:
    it cannot be deleted until the reply ends.
    """

    class Renamed(Message):
        def __init__(self, chat_id: int):
            super().__init__()
            self.chat_id = chat_id

    class Deleted(Message):
        def __init__(self, chat_id: int):
            super().__init__()
            self.chat_id = chat_id

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

    def __init__(self, store: ChatStore, current_id: int | None = None, busy_id: int | None = None,
                 writer: HistoryWriter | None = None):
        super().__init__()
        self.store = store
        self.writer = writer   # keeps a change while another program locks the history
        self.current_id = current_id
        self.busy_id = busy_id

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
        if event.option.id is not None:
            self.dismiss(("open", int(event.option.id)))

    def action_new(self):
        self.dismiss(("new", None))

    def _save(self, what: str, apply: Callable[[], object], then: Callable[[], None]):
        if self.writer is not None:
            self.writer.write(what, apply, then)
        else:
            apply()
            then()

    def action_rename(self):
        cid = self._selected_id()
        if cid is None:
            return
        chat = self.store.get_chat(cid)

        def done(title: str | None):
            if title and title.strip():
                def renamed():
                    self.app.post_message(self.Renamed(cid))   # the list may be closed by then
                    if self.app.screen is self:   # a rename kept for a locked history may land later
                        self.reload(cid)

                self._save("the new title", lambda: self.store.update_chat(cid, title=title.strip()), renamed)

        self.app.push_screen(TextPrompt("Rename chat", chat.title if chat else ""), done)

    def action_delete(self):
        cid = self._selected_id()
        if cid is None:
            return
        if cid == self.busy_id:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        chat = self.store.get_chat(cid)

        def done(yes: bool | None):
            if yes:
                def deleted():
                    self.app.post_message(self.Deleted(cid))
                    if self.app.screen is self:
                        self.reload()

                self._save("the deletion of the chat", lambda: self.store.delete_chat(cid), deleted)

        self.app.push_screen(Confirm(f"Delete the chat “{chat.title if chat else cid}”?", "Delete"), done)
