"""Small dialogs: a line of text, a yes/no question, the help text."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Markdown, Static, TextArea

from chatapp.screens.modal import Modal


class TextPrompt(Modal):
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
        return w.text if isinstance(w, TextArea) else self.query_one("#prompt-text", Input).value

    @on(Input.Submitted)
    def _submit(self):
        self.dismiss(self._value())

    @on(Button.Pressed, "#ok")
    def _ok(self):
        self.dismiss(self._value())

    @on(Button.Pressed, "#cancel")
    def _cancel(self):
        self.dismiss(None)


class Confirm(Modal):
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


class HelpScreen(Modal):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical():
            with VerticalScroll():
                yield Markdown(self.text)
            yield Label("Esc closes", classes="hint")
