"""A chat's own settings: its system prompt, sampling and thinking (Ctrl+S).

Where a reply's sampling comes from, later ones winning for each field: the defaults of
`engine.sampling.SamplingSettings`, the config file's "sampling" / "max_tokens", the
command line's sampling flags for this run (`deltatalk --temp 0.2`: held as config
overrides, never saved), then the chat's own settings saved from this dialog. A flag
thus sets every chat that has not chosen that field itself.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Checkbox, Input, Label

from chatapp.config import Config
from chatapp.generation_defaults import GENERATION_DEFAULTS
from chatapp.prompt_input import EnterSubmitsTextArea
from chatapp.screens.modal import Modal
from chatapp.store import Chat
from engine.sampling import SamplingSettings



def _settings(fields: dict) -> SamplingSettings:
    """SamplingSettings from a dict of settings (keys it does not know, like max_tokens, are skipped); validated."""
    known = set(SamplingSettings.__dataclass_fields__)
    return SamplingSettings(**{k: v for k, v in fields.items() if k in known}).validate()


def sampling_for(config: Config, chat: Chat | None) -> tuple[SamplingSettings, int]:
    """The sampling settings and max_tokens of the next reply in `chat`; ValueError/TypeError if invalid."""
    fields = {**(config.get("sampling") or {}), **((chat.settings or {}) if chat else {})}
    max_tokens = int(fields.pop("max_tokens", None) or config.get("max_tokens") or GENERATION_DEFAULTS.max_tokens)
    return _settings(fields), max_tokens


def check_chat_sampling(config: Config, chosen: dict):
    """Raise ValueError if the chat's chosen sampling, over the config's, is not valid."""
    _settings({**(config.get("sampling") or {}), **chosen})


def form_values(config: Config, chat: Chat | None) -> dict:
    """What the settings form shows: the defaults, the config (and flags), then the chat's own."""
    values = {**SamplingSettings().to_dict(), **(config.get("sampling") or {})}
    values["max_tokens"] = config.get("max_tokens")
    if chat:
        values.update(chat.settings or {})
    return values


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


class ChatSettings(Modal):
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
