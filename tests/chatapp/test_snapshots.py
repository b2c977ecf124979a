"""Snapshot tests (pytest-textual-snapshot): the chat screen after a scripted reply, the model
picker and the speed overlay. The FakeBackend's timings and sizes are frozen, the model
files are generated with fixed seeds, notifications are cleared and the cursor does not
blink, so the pictures are the same on every run.

Update the pictures (after looking at the report) with:
    pytest tests/chatapp/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import gguf
import numpy as np

from tests.fakes import FakeBackend
from chatapp.screens import ModelPicker
from tests.chatapp.conftest import make_app, send, wait_until

SIZE = (110, 34)
REPLY = ("Delta rules update a **fast-weight** memory:\n\n"
         "1. read the old value\n2. write the difference\n\n"
         "```python\nS = S + beta * (v - S @ k) @ k.T\n```")


async def _still(pilot):
    """Nothing that moves or times out: no toasts, no blinking cursor."""
    app = pilot.app
    app.clear_notifications()
    app.chat_input.cursor_blink = False
    await pilot.pause()
    from chatapp.widgets import Gauge

    app.query_one(Gauge).refresh_text()   # the figures fitted to the gauge's settled width
    await pilot.pause()


async def _chat_with_reply(pilot):
    app = pilot.app
    await wait_until(pilot, lambda: app.backend.info is not None and app.loading is None, what="model")
    await send(pilot, app, "How does the delta rule work?")
    await wait_until(pilot, lambda: not app.generating and app.turns, what="reply")
    await _still(pilot)


def test_chat_screen_after_a_reply(snap_compare, fake_model):
    app = make_app(FakeBackend([REPLY]), model_path=fake_model)
    assert snap_compare(app, terminal_size=SIZE, run_before=_chat_with_reply)


def test_speed_overlay(snap_compare, fake_model):
    app = make_app(FakeBackend([REPLY]), model_path=fake_model)

    async def run_before(pilot):
        await _chat_with_reply(pilot)
        await pilot.press("f2")
        from chatapp.widgets import SpeedOverlay

        overlay = app.query_one(SpeedOverlay)
        await wait_until(pilot, lambda: overlay.stats.threads == 2, what="overlay stats")
        await _still(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def _write_unsupported(path):
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_context_length(2048)
    w.add_file_type(7)   # Q8_0
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_model_picker(snap_compare, home):
    from chatapp.discovery import candidates
    from chatapp.paths import models_dir
    from tests.tiny_models import write_tiny_llama

    md = models_dir()
    md.mkdir(parents=True)
    write_tiny_llama(md / "tiny-llama-Q8_0.gguf", seed=0)
    _write_unsupported(md / "mamba-tiny.gguf")

    def find():
        return candidates(md, [], home=home / "home", env={}, huggingface=False, lmstudio=False, ollama=False)

    # no model yet: the app opens the picker by itself
    app = make_app(FakeBackend(), find_models=find)

    async def run_before(pilot):
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker) and app.screen.done_scanning,
                         what="picker filled")
        await _still(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


# -- 80x24: everything must be usable on the smallest common terminal (issue 17) ----------------
SMALL = (80, 24)
REPLY_LINES = "Paris: Les Halles\nTennis: Roland Garros\nFood: **croissants**"


def test_chat_screen_at_80x24(snap_compare, fake_model):
    app = make_app(FakeBackend([REPLY_LINES]), model_path=fake_model)

    async def run_before(pilot):
        await wait_until(pilot, lambda: app.backend.info is not None and app.loading is None, what="model")
        await send(pilot, app, "Three places:\n**one** per line, please")
        await wait_until(pilot, lambda: not app.generating and app.turns, what="reply")
        await _still(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_model_picker_at_80x24(snap_compare, home):
    from chatapp.discovery import candidates
    from chatapp.paths import models_dir
    from tests.tiny_models import write_tiny_llama

    md = models_dir()
    md.mkdir(parents=True)
    write_tiny_llama(md / "tiny-llama-Q8_0.gguf", seed=0)
    write_tiny_llama(md / "tiny-base-Q8_0.gguf", seed=0, chat_template=False)
    _write_unsupported(md / "mamba-tiny.gguf")
    (md / "broken.gguf").write_bytes(b"H\xcfe\x00" + b"\0" * 16)

    def find():
        return candidates(md, [], home=home / "home", env={}, huggingface=False, lmstudio=False, ollama=False)

    app = make_app(FakeBackend(), find_models=find)

    async def run_before(pilot):
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker) and app.screen.done_scanning,
                         what="picker filled")
        await _still(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_chat_settings_at_80x24(snap_compare, fake_model):
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)

    async def run_before(pilot):
        from chatapp.screens import ChatSettings

        await wait_until(pilot, lambda: app.backend.info is not None and app.loading is None, what="model")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatSettings), what="settings")
        await pilot.pause()
        app.screen.query_one("#cs-system").cursor_blink = False
        await _still(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)
