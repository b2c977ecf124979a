"""The prompt box: Enter sends, a newline key that works in this terminal, earlier prompts on Up,
and the transcript's page keys (the focus never has to leave the box to scroll)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

# Terminals that report Shift+Enter apart from Enter (kitty keyboard protocol, which Textual
# turns on). Elsewhere Shift+Enter arrives as a plain Enter and would send.
SHIFT_ENTER_TERMINALS = ("kitty", "wezterm", "ghostty", "foot", "iterm.app", "rio")


def shift_enter_reported(env: Mapping[str, str] = os.environ) -> bool:
    """True when this terminal is known to tell Shift+Enter from Enter."""
    names = " ".join(env.get(k, "") for k in ("TERM_PROGRAM", "TERM", "LC_TERMINAL")).lower()
    return any(t in names for t in SHIFT_ENTER_TERMINALS) or bool(env.get("KITTY_WINDOW_ID"))


class _KeyName(str):
    """Stands in for a textual.keys.Keys member in Textual's sequence table (it reads `.value`)."""

    @property
    def value(self) -> str:
        return str(self)


def teach_alt_enter():
    """Make Textual's terminal parser report ESC CR (Alt+Enter in most terminals, and tmux) as
    "alt+enter". Textual does not know the sequence: it waits for more input, takes in the keys
    typed next, and then replays it as a plain Enter, which sends the message while the keys
    typed after it land in the box that is about to be cleared."""
    from textual._ansi_sequences import ANSI_SEQUENCES_KEYS

    ANSI_SEQUENCES_KEYS.setdefault("\x1b\r", (_KeyName("alt+enter"),))


def newline_hint(shift_enter: bool) -> str:
    keys = "Shift+Enter" if shift_enter else "Ctrl+J or Alt+Enter"
    return f"Message · Enter sends · {keys}: new line · ↑ earlier prompts"


class EnterSubmitsTextArea(TextArea):
    """Multi-line text where Enter submits; Shift+Enter (where the terminal reports it), Ctrl+J and
    Alt+Enter add a newline. Used by the prompt box and the chat settings' system prompt."""

    class Submitted(Message):
        def __init__(self, area: EnterSubmitsTextArea, text: str):
            super().__init__()
            self.area, self.text = area, text

        @property
        def control(self) -> EnterSubmitsTextArea:
            return self.area

    NEWLINE_KEYS = ("shift+enter", "ctrl+j", "alt+enter", "ctrl+enter")

    async def _on_key(self, event: events.Key) -> None:
        if self.read_only:
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.newline_key_used(event.key)
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
            return
        await super()._on_key(event)

    def newline_key_used(self, key: str):
        pass


class ChatInput(EnterSubmitsTextArea):
    """The prompt box. Up in an empty box (or while going through earlier prompts) recalls earlier
    prompts, newest first; Down goes forward again and finally back to what was being typed."""

    DEFAULT_CSS = """
    ChatInput { height: auto; min-height: 3; max-height: 10; }
    """

    BINDINGS = [
        Binding("pageup,shift+pageup", "app.scroll_transcript('up')", "Scroll up", show=False),
        Binding("pagedown,shift+pagedown", "app.scroll_transcript('down')", "Scroll down", show=False),
        Binding("ctrl+home", "app.scroll_transcript('home')", "Top", show=False),
        Binding("ctrl+end", "app.scroll_transcript('end')", "End", show=False),
    ]

    def __init__(self, *args, history: Callable[[], list[str]] | None = None, **kw):
        super().__init__(*args, **kw)
        self._history_source = history       # earlier prompts, newest first
        self._history: list[str] | None = None
        self._history_pos = -1               # -1: not going through the history
        self._typed = ""                     # what was in the box before going back
        self.shift_enter_seen = False

    def newline_key_used(self, key: str):
        if key == "shift+enter" and not self.shift_enter_seen:   # this terminal reports it: say so
            self.shift_enter_seen = True
            self.placeholder = newline_hint(True)

    # -- earlier prompts ------------------------------------------------------------------
    def forget_history(self):
        """After sending (or switching chats): the next Up starts from the newest prompt again."""
        self._history = None
        self._history_pos = -1

    def _show(self, text: str):
        self.text = text
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        browsing = self._history_pos >= 0
        if not select and (not self.text or (browsing and self.cursor_location[0] == 0)):
            if self._history is None:
                self._history = list(self._history_source()) if self._history_source else []
            if self._history_pos + 1 < len(self._history):
                if not browsing:
                    self._typed = self.text
                self._history_pos += 1
                self._show(self._history[self._history_pos])
                return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if (not select and self._history_pos >= 0 and self._history is not None
                and self.cursor_location[0] == self.document.line_count - 1):
            self._history_pos -= 1
            self._show(self._history[self._history_pos] if self._history_pos >= 0 else self._typed)
            return
        super().action_cursor_down(select)
