"""A second process holds the chat history's write lock: a rename, a deletion or new chat
settings is kept (never lost, never an exception in the user's face), the user is told in one
line, the wait happens off the UI thread, and the change lands when the lock is free."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from chatapp.history_writes import HistoryWriter
from chatapp.store import ChatStore
from tests.chatapp.conftest import make_app, ready, send, wait_reply, wait_until
from tests.fakes import FakeBackend

HOLD_LOCK = ("import sqlite3, sys\n"
             "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "db.execute('BEGIN IMMEDIATE')\n"
             "print('locked', flush=True)\n"
             "sys.stdin.readline()\n"
             "db.execute('ROLLBACK')\n")


@contextmanager
def locked_by_another_process(db: Path):
    """Another program (a separate process) holds the history's write lock until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0


def test_changes_kept_while_locked_land_in_order_when_free(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3", busy_timeout=0.1)
    a, b = store.new_chat(title="a"), store.new_chat(title="b")
    ui: queue.Queue = queue.Queue()      # what the waiting thread asks the "UI thread" (this one) to run
    said: list[str] = []
    landed: list[str] = []
    writer = HistoryWriter(store, notify=said.append, call_on_ui=ui.put, quitting=threading.Event(),
                           wait_seconds=0.5)
    with locked_by_another_process(store.path):
        assert not writer.write("the new title", lambda: store.update_chat(a.id, title="renamed"),
                                lambda: landed.append("rename"))
        assert not writer.write("the chat settings", lambda: store.update_chat(a.id, settings={"top_k": 3}),
                                lambda: landed.append("settings"))
        assert not writer.write("the deletion of the chat", lambda: store.delete_chat(b.id),
                                lambda: landed.append("delete"))
        ui.get(timeout=30)()             # still locked after a wait round: the user hears it once
        assert writer.pending == 3 and not landed
        assert store.get_chat(a.id).title == "a" and store.get_chat(b.id) is not None
    ui.get(timeout=30)()                 # the lock is free: the kept changes are applied here
    assert landed == ["rename", "settings", "delete"] and writer.pending == 0
    chat = store.get_chat(a.id)
    assert chat.title == "renamed" and chat.settings == {"top_k": 3} and store.get_chat(b.id) is None
    assert all("\n" not in s for s in said)
    assert "locked by another program" in said[0] and "the new title" in said[0]
    assert any("still locked" in s and "3 change(s)" in s for s in said)
    assert "free again" in said[-1]


def test_a_free_history_writes_at_once(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3", busy_timeout=0.1)
    chat = store.new_chat(title="a")
    said: list[str] = []
    writer = HistoryWriter(store, notify=said.append, call_on_ui=lambda fn: fn(), quitting=threading.Event())
    assert writer.write("the new title", lambda: store.update_chat(chat.id, title="b"))
    assert store.get_chat(chat.id).title == "b" and not said and writer.pending == 0


def pick(app, chat_id: int):
    from textual.widgets import OptionList

    ol = app.screen.query_one(OptionList)
    ol.highlighted = [ol.get_option_at_index(i).id for i in range(ol.option_count)].index(str(chat_id))


@pytest.mark.asyncio
async def test_rename_delete_and_settings_in_the_app_survive_a_locked_history(fake_model, home):
    from textual.widgets import Input

    from chatapp.paths import data_dir
    from chatapp.screens import ChatList, ChatSettings, Confirm, TextPrompt

    app = make_app(FakeBackend(["one", "two"]), model_path=fake_model)
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first chat")
        await wait_reply(pilot, app)
        first = app.chat.id
        await pilot.press("ctrl+n")
        await send(pilot, app, "second chat")
        await wait_reply(pilot, app)
        second = app.chat.id
        app.history_writer.wait_seconds = 1.0
        with locked_by_another_process(data_dir() / "chats.sqlite3"):
            await pilot.press("ctrl+l")
            await wait_until(pilot, lambda: isinstance(app.screen, ChatList), what="chat list")
            pick(app, second)
            await pilot.press("r")
            await wait_until(pilot, lambda: isinstance(app.screen, TextPrompt), what="rename prompt")
            app.screen.query_one(Input).value = "Renamed while locked"
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, ChatList), what="back in the list")
            pick(app, first)
            await pilot.press("d")
            await wait_until(pilot, lambda: isinstance(app.screen, Confirm) and app.screen.query("#yes"))
            await pilot.click("#yes")
            await wait_until(pilot, lambda: isinstance(app.screen, ChatList), what="back in the list")
            await pilot.press("escape")
            await wait_until(pilot, lambda: not isinstance(app.screen, ChatList), what="list closed")
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: isinstance(app.screen, ChatSettings), what="settings")
            app.screen.query_one("#cs-temperature", Input).value = "0.25"
            await pilot.press("enter")
            await wait_until(pilot, lambda: not isinstance(app.screen, ChatSettings), what="settings closed")
            await wait_until(pilot, lambda: app.history_writer.pending == 3, what="three kept changes")
            await wait_until(pilot, lambda: any("still locked" in n.message for n in app._notifications),
                             timeout=30, what="the still-locked notice")
            assert app.store.get_chat(second).title == "second chat"      # nothing written yet
            assert app.store.get_chat(first) is not None
            assert not isinstance(app.screen, Confirm) and app.is_running   # no error dialog, no crash
        await wait_until(pilot, lambda: app.history_writer.pending == 0, timeout=30, what="kept changes saved")
        chat = app.store.get_chat(second)
        assert chat.title == "Renamed while locked" and chat.settings["temperature"] == 0.25
        assert app.store.get_chat(first) is None
        assert app.title == "deltatalk — Renamed while locked" and app.chat.settings["temperature"] == 0.25
        notices = [n.message for n in app._notifications]
        assert any("locked by another program" in n and "the new title" in n for n in notices)
        assert any("free again" in n for n in notices)
