"""Pilot tests: a hostile chat template, a damaged / older / locked chat history and hostile
files in the picker. The app goes on in each case and tells the user what happened."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from textual.widgets import DataTable, Label, Static

from tests.fakes import FakeBackend
from chatapp.screens import ModelPicker
from chatapp.widgets import MessageBox
from tests.chatapp.conftest import boxes, make_app, notes, ready, send, wait_reply, wait_until
from tests.chatapp.test_hostile_inputs import make_old_history, write_huge_array_gguf

pytestmark = pytest.mark.asyncio

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CHATML_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def chat_notices(app) -> list[str]:
    return [str(w.render()) for w in app.query(".chat-notice").results(Static)]


async def test_hostile_template_falls_back_with_a_notice_and_esc_stops(fake_model):
    # the reply holds before its first piece until Esc: Esc stops it whether it lands while the
    # template renders (2 s, then the fallback) or after. (Pilot's key press returns only when
    # the app is idle, after the render; waiting for `app.generating` then once found the whole
    # reply already over. The UI itself keeps ticking every 20 ms through the render.)
    fake = FakeBackend(["one two three four five six"], template=NESTED_LOOPS, hold_after=0)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        await wait_until(pilot, lambda: fake.calls, timeout=20, what="the reply requested")
        await pilot.press("escape")          # (most often while the template is still rendering)
        await wait_reply(pilot, app, timeout=30)
        assert boxes(app)[-1].status == "stopped"
        await wait_until(pilot, lambda: chat_notices(app), what="the fallback notice")
        (notice,) = chat_notices(app)
        assert "rendering took longer than 2 s" in notice and "built-in ChatML format" in notice
        assert any("built-in ChatML" in n for n in notes(app, "warning"))
        assert fake.rendered == [CHATML_HI]
        fake.hold_after = None
        await send(pilot, app, "again")        # the fallback stays: no second wait, no second notice
        await wait_reply(pilot, app, timeout=30)
        assert boxes(app)[-1].content == "one two three four five six"
        assert len(chat_notices(app)) == 1 and fake.rendered[-1].endswith("again<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.filterwarnings("ignore")
def test_app_quits_while_a_hostile_template_renders(home, fake_model):
    script = textwrap.dedent(f"""
        import asyncio
        from tests.fakes import FakeBackend
        from tests.chatapp.conftest import boxes, make_app, ready, send

        async def main():
            app = make_app(FakeBackend(["x"], template={NESTED_LOOPS!r}), model_path={str(fake_model)!r})
            async with app.run_test() as pilot:
                await ready(pilot, app)
                await send(pilot, app, "hi")
                await pilot.pause(0.2)       # the render is running in a worker thread
            print("quit", flush=True)       # leaving run_test quits the app

        asyncio.run(main())
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "quit"


async def test_damaged_history_is_moved_aside_and_chatting_goes_on(fake_model, home):
    from chatapp.paths import data_dir

    db = data_dir() / "chats.sqlite3"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    app = make_app(FakeBackend(["fine"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        (moved,) = db.parent.glob("chats.damaged-*.sqlite3")
        assert moved.read_bytes() == b"this is not a database" * 100
        assert any(str(moved) in n for n in notes(app, "warning"))
        assert any(str(moved) in n for n in chat_notices(app))
        await send(pilot, app, "hello")
        await wait_reply(pilot, app)
        assert [m.content for m in app.store.messages(app.chat.id)] == ["hello", "fine"]


async def test_history_from_an_older_version_is_migrated(fake_model, home):
    from chatapp.paths import data_dir
    from chatapp.store import SCHEMA_VERSION

    db = data_dir() / "chats.sqlite3"
    db.parent.mkdir(parents=True)
    make_old_history(db)
    fake = FakeBackend(["new answer"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.pause()
        assert app.chat.id == 1 and [b.content for b in app.query(MessageBox)] == ["old question", "old answer"]
        assert app.store.get_meta("schema_version") == str(SCHEMA_VERSION)
        await send(pilot, app, "new question")
        await wait_reply(pilot, app)
        assert [m["content"] for m in fake.calls[-1]["messages"]] == ["old question", "old answer", "new question"]
        assert [m.content for m in app.store.messages(1)][-1] == "new answer"
        assert not chat_notices(app)


async def test_locked_history_keeps_the_typed_message_and_sends_it_when_free(fake_model, home):
    from chatapp.paths import data_dir

    fake = FakeBackend(["got it"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        other = sqlite3.connect(data_dir() / "chats.sqlite3", isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")       # another program holds the write lock
        try:
            await send(pilot, app, "typed while locked")
            await wait_until(pilot, lambda: chat_notices(app), timeout=10, what="the busy notice")
            assert "locked by another program" in chat_notices(app)[0]
            assert app.chat_input.text == "typed while locked"   # not lost
            assert not fake.calls
        finally:
            other.execute("ROLLBACK")
            other.close()
        await wait_until(pilot, lambda: fake.calls, timeout=15, what="the kept message sent")
        await wait_reply(pilot, app)
        assert app.chat_input.text == ""
        assert [m.content for m in app.store.messages(app.chat.id)] == ["typed while locked", "got it"]


async def test_picker_shows_readable_reasons_and_does_not_count_broken_files(model_tree):
    from chatapp.paths import models_dir
    from chatapp.screens import readable_reason

    (models_dir() / "zip.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    write_huge_array_gguf(models_dir() / "huge-array.gguf")
    app = make_app(FakeBackend(["hi"]), find_models=None)
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker), timeout=30, what="picker")
        picker = app.screen
        await wait_until(pilot, lambda: picker.done_scanning, timeout=60, what="scan")
        table = picker.query_one("#picker-table", DataTable)
        status = {r[0]: r[1] for r in (table.get_row_at(i) for i in range(table.row_count))}
        assert status["zip.gguf"] == "✗ not a GGUF file"          # short form; the reason is below the table
        reason = {e.name: readable_reason(e.reason) for e in picker.entries.values()}
        assert reason["zip.gguf"] == "not a GGUF file (starts with 50 4b 03 04)"
        assert reason["huge-array.gguf"].startswith("metadata 'tokenizer.ggml.scores': array length")
        assert reason["truncated.gguf"].startswith("truncated file: ")
        summary = str(picker.query_one("#picker-status", Label).render())
        assert summary == "4 models found, 4 supported. 3 files could not be read as GGUF (highlight for why)."
