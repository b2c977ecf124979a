"""The base of the deltatalk dialogs: a centred box over the chat, Esc closes it."""

from __future__ import annotations

from textual.binding import Binding
from textual.screen import ModalScreen


class Modal(ModalScreen):
    DEFAULT_CSS = """
    Modal { align: center middle; }
    Modal > Vertical {
        width: 90%; max-width: 130; height: auto; max-height: 90%;
        padding: 1 2; background: $surface; border: thick $accent;
    }
    Modal .title { text-style: bold; margin-bottom: 1; }
    Modal .hint { color: $text-muted; margin-top: 1; width: 100%; }
    Modal .buttons { height: auto; margin-top: 1; align-horizontal: right; }
    Modal .buttons Button { margin-left: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Close")]

    def action_cancel(self):
        self.dismiss(None)


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
