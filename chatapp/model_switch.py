"""Switching models in the middle of a chat: say what it costs before it is paid.

A new model cannot use the previous one's cache: its first reply reads the whole chat
again (prefill). The estimate is the chat's tokens over a prefill speed measured on this
machine: the newest one measured with that model, or else the current model's scaled by
the ratio of the file sizes (prefill is compute-bound, so it scales with the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Label, Static

from chatapp.screens.modal import Modal
from chatapp.transcript import model_label


@dataclass
class SwitchCost:
    tokens: int                 # the chat's tokens the new model reads before its first reply
    seconds: float | None       # None: no prefill speed measured on this machine yet
    basis: str = ""             # how the time was estimated

    def text(self) -> str:
        if self.tokens <= 0:
            return "nothing to read again"
        what = f"{self.tokens:,} tokens"
        if self.seconds is None:
            return f"{what}, time unknown (no prefill speed measured on this machine yet)"
        return f"{what}, about {format_seconds(self.seconds)} ({self.basis})"


def format_seconds(s: float) -> str:
    if s < 1:
        return "under a second"
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


def estimate_switch(tokens: int, measured_tps: float | None, current_tps: float | None = None,
                    current_bytes: int = 0, new_bytes: int = 0) -> SwitchCost:
    """`measured_tps`: prefill tok/s measured with the new model; else `current_tps` (the current
    model's) is scaled by current_bytes / new_bytes."""
    if measured_tps and measured_tps > 0:
        return SwitchCost(tokens, tokens / measured_tps, f"at {measured_tps:,.0f} tok/s measured with it")
    if current_tps and current_tps > 0 and current_bytes > 0 and new_bytes > 0:
        tps = current_tps * current_bytes / new_bytes
        return SwitchCost(tokens, tokens / tps, f"at ~{tps:,.0f} tok/s, from the current model's speed")
    return SwitchCost(tokens, None)


class ModelSwitchDialog(Modal):
    """Returns "continue" (switch and keep this chat), "new" (switch and start a new chat) or None."""

    AUTO_FOCUS = "#switch-new"
    DEFAULT_CSS = """
    ModelSwitchDialog .buttons Button { min-width: 12; }
    """

    def __init__(self, new_model: str, cost: SwitchCost):
        super().__init__()
        self.new_model, self.cost = new_model, cost

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Switch to {model_label(self.new_model)}?", classes="title", markup=False)
            yield Static(f"To continue this chat, {model_label(self.new_model)} first reads all of it again, "
                         f"before its first reply: {self.cost.text()}. A new chat starts right away.",
                         markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="switch-cancel")
                yield Button("Continue this chat", id="switch-continue")
                yield Button("New chat", variant="primary", id="switch-new")

    @on(Button.Pressed, "#switch-new")
    def _new(self):
        self.dismiss("new")

    @on(Button.Pressed, "#switch-continue")
    def _continue(self):
        self.dismiss("continue")

    @on(Button.Pressed, "#switch-cancel")
    def _cancel(self):
        self.dismiss(None)
