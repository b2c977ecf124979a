"""Pilot tests of issue 17: the TUI as users of oterm, elia, ollama and llama-cli expect it.

Text kept as typed, page keys from the prompt box, Ctrl+C, Up for earlier prompts, the
settings form's keys, restored chats at their end with their draft, the cost of a model
switch, base models, the 80x24 layout, figures of a new chat, chat list search."""

from __future__ import annotations

import shutil

import pytest
from textual.widgets import Button, DataTable, Input, Label, Markdown, OptionList, Static

from chatapp.backend import FakeBackend
from chatapp.model_switch import ModelSwitchDialog, estimate_switch
from chatapp.prompt_input import EnterSubmitsTextArea
from chatapp.screens import ChatList, ChatSettings, ModelPicker
from chatapp.transcript import MessageBox
from chatapp.widgets import Gauge
from tests.chatapp.conftest import make_app, notes, ready, send, wait_reply, wait_until

pytestmark = pytest.mark.asyncio


def boxes(app, role=None):
    return [b for b in app.query(MessageBox) if role is None or b.role == role]


def shown_text(widget) -> str:
    """What a widget shows, as plain text (lines joined with newlines)."""
    return "\n".join(line.text.rstrip() for line in widget.render_lines(widget.region.reset_offset))


# -- 1. text as typed; replies keep their line breaks ------------------------------------------
async def test_user_text_is_shown_exactly_as_typed(fake_model):
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)
    typed = "Line one\nline **two** and `code`\n# not a heading\n  - indented, not a list"
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.chat_input.focus()
        await pilot.press(*"Line one", "ctrl+j", *"line **two** and `code`", "alt+enter", *"# not a heading",
                          "shift+enter", *"  - indented, not a list")
        await pilot.press("enter")
        await wait_reply(pilot, app)
        user = boxes(app, "user")[0]
        assert user.content == typed
        body = user.query_one(".plain", Static)
        assert not body.query(Markdown)
        text = shown_text(body)
        assert text.splitlines()[:4] == typed.splitlines()   # the characters and the line breaks, verbatim
        assert app.store.messages(app.chat.id)[0].content == typed


async def test_reply_keeps_single_line_breaks(fake_model):
    reply = "Paris: Les Halles\nTennis: Roland Garros\nFood: **croissants**"
    app = make_app(FakeBackend([reply]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "places?")
        await wait_reply(pilot, app)
        md = boxes(app, "assistant")[0].query_one(Markdown)
        await pilot.pause()
        shown = "\n".join(shown_text(block) for block in md.query("MarkdownParagraph"))
        lines = [ln.strip() for ln in shown.splitlines() if ln.strip()]
        assert lines == ["Paris: Les Halles", "Tennis: Roland Garros", "Food: croissants"]   # Markdown still rendered
