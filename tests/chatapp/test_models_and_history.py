"""Pilot tests: model picker and discovery, loading and switching models, startup, chats in
SQLite across restarts, chat list, config (theme, keymap)."""

from __future__ import annotations

import json

import pytest
from textual.widgets import DataTable

from tests.fakes import FakeBackend
from chatapp.screens import ChatList, Confirm, ModelPicker
from chatapp.widgets import MessageBox, SpeedOverlay
from tests.chatapp.conftest import boxes, make_app, notes, ready, send, wait_reply, wait_until

pytestmark = pytest.mark.asyncio

async def test_picker_lists_models_and_loads_the_choice(model_tree):
    fake = FakeBackend(["hi"])
    app = make_app(fake, find_models=None)   # the real discovery, in the temp home
    async with app.run_test(size=(160, 40)) as pilot:
        # no last model, supported models exist: the picker opens by itself
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker), what="picker")
        picker = app.screen
        await wait_until(pilot, lambda: picker.done_scanning, what="scan")
        table = picker.query_one(DataTable)
        assert table.row_count == 5
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        first = rows[0]
        # columns: Model, Status, Size, Quant, Context, Arch, From (Status stays visible at 80 columns)
        assert first[0] == "tiny-llama.gguf" and list(first[2:6]) == ["103.8 KB", "Q8_0", "256", "llama"]
        assert first[1] == "✓ supported"
        bad = next(r for r in rows if r[0] == "truncated.gguf")
        assert bad[1].startswith("✗ ")
        sources = {r[6] for r in rows}
        assert sources == {"models", "huggingface", "lmstudio", "ollama"}
        # selecting an unsupported row says why and stays open
        table.move_cursor(row=rows.index(bad))
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ModelPicker)
        assert any("truncated.gguf" in n for n in notes(app, "warning"))
        table.move_cursor(row=0)
        await pilot.press("enter")
        await ready(pilot, app)
        assert fake.loads == [model_tree["tiny"]]
        assert "tiny-llama.gguf" in app.sub_title
        assert app.store.get_meta("last_model") == str(model_tree["tiny"])


async def test_model_switch_mid_chat_keeps_the_chat_and_the_old_model_until_ready(fake_model, home):
    fake = FakeBackend(["answer one", "answer two"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "q1")
        await wait_reply(pilot, app)
        other = home / "other.gguf"
        other.write_bytes(b"GGUF" + b"\0" * 10)
        fake.load_delay = 2.0   # long enough that one pause never outlasts it, even on a loaded machine
        app.load_model(other)
        await pilot.pause()
        assert app.loading == other
        assert app.backend.info.path == fake_model     # still usable while the new one loads
        assert app.query_one("#loadbar").display
        await ready(pilot, app)
        assert app.backend.info.path == other
        assert not app.query_one("#loadbar").display
        await send(pilot, app, "q2")
        await wait_reply(pilot, app)
        assert [b.content for b in app.query(MessageBox)] == ["q1", "answer one", "q2", "answer two"]
        assert fake.calls[-1]["messages"][:2] == [{"role": "user", "content": "q1"},
                                                 {"role": "assistant", "content": "answer one"}]


async def test_a_load_that_ends_under_a_dialog_still_updates_the_app(fake_model):
    """A load that ends while a dialog is open is taken in (the app holds its own widgets: App.query
    sees only the active screen), and the chat works once the dialog closes."""
    from chatapp.screens import HelpScreen

    fake = FakeBackend(["fine"], load_delay=0.5)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help open")
        # (Loaded reaches the load bar first, then bubbles up to the App: wait for both)
        await wait_until(pilot, lambda: fake.info is not None and app.loading is None
                         and app.sub_title.startswith("fake-model.gguf"), what="load taken in by the app")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await send(pilot, app, "hi")
        await wait_reply(pilot, app)
        assert boxes(app, "assistant")[-1].content == "fine"


async def test_load_failure_is_a_notification_and_keeps_the_previous_model(fake_model, home):
    from engine.errors import ModelFileError

    fake = FakeBackend(["x"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        fake.fail_on_load = ModelFileError(home / "broken.gguf", "truncated: tensor 'x' needs bytes 10..20")
        app.load_model(home / "broken.gguf")
        await wait_until(pilot, lambda: app.loading is None, what="load to fail")
        await pilot.pause()
        errs = notes(app, "error")
        assert len(errs) == 1
        assert errs[0].startswith("broken.gguf: truncated: tensor 'x' needs bytes 10..20")
        assert "still using fake-model.gguf" in errs[0]
        assert app.backend.info.path == fake_model
        assert "Traceback" in (home / "dt/log/deltatalk.log").read_text()


async def test_chats_survive_restart_and_last_model_reopens(fake_model, home):
    app = make_app(FakeBackend(["first reply"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "remember me")
        await wait_reply(pilot, app)
        chat_id = app.chat.id
    assert (home / "dt/data/chats.sqlite3").exists()
    fake2 = FakeBackend(["second reply"])
    app2 = make_app(fake2)   # no -m: the last used model is opened
    async with app2.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app2)
        assert fake2.loads == [fake_model]
        assert app2.chat.id == chat_id
        await pilot.pause()
        assert [b.content for b in app2.query(MessageBox)] == ["remember me", "first reply"]
        await send(pilot, app2, "more")
        await wait_reply(pilot, app2)
        assert fake2.calls[-1]["messages"][0] == {"role": "user", "content": "remember me"}


async def test_reply_killed_mid_stream_reopens_as_interrupted(fake_model, home):
    from chatapp.paths import data_dir
    from chatapp.store import ChatStore

    store = ChatStore(data_dir() / "chats.sqlite3")
    chat = store.new_chat("crashed")
    store.add_message(chat.id, "user", "hi")
    store.add_message(chat.id, "assistant", "half a rep", status="streaming")
    store.set_meta("last_chat", str(chat.id))
    store.close()
    app = make_app(FakeBackend(["x"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.pause()
        b = boxes(app)
        assert b[1].content == "half a rep" and b[1].status == "interrupted"
        assert "interrupted" in str(b[1].query_one(".status").render())


async def test_new_chat_and_chat_list_open_rename_delete(fake_model):
    app = make_app(FakeBackend(["r1", "r2"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "chat one")
        await wait_reply(pilot, app)
        first = app.chat.id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.chat is None and not boxes(app)
        await send(pilot, app, "chat two")
        await wait_reply(pilot, app)
        second = app.chat.id
        assert second != first
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert isinstance(app.screen, ChatList)
        from textual.widgets import Input, OptionList

        ol = app.screen.query_one(OptionList)
        assert ol.option_count == 2
        ol.highlighted = [ol.get_option_at_index(i).id for i in range(2)].index(str(first))
        await pilot.press("r")
        await pilot.pause()
        app.screen.query_one(Input).value = "Renamed"
        await pilot.press("enter")
        await pilot.pause()
        assert app.store.get_chat(first).title == "Renamed"
        await pilot.press("enter")   # open the highlighted chat
        await pilot.pause()
        assert app.chat.id == first
        assert [b.content for b in app.query(MessageBox)] == ["chat one", "r1"]
        assert app.title == "deltatalk — Renamed"
        await pilot.press("ctrl+l")
        await pilot.pause()
        ol = app.screen.query_one(OptionList)
        ol.highlighted = [ol.get_option_at_index(i).id for i in range(2)].index(str(second))
        await pilot.press("d")
        await pilot.pause()
        await wait_until(pilot, lambda: isinstance(app.screen, Confirm) and app.screen.query("#yes"))
        await pilot.click("#yes")
        await pilot.pause()
        assert app.store.get_chat(second) is None
        assert app.screen.query_one(OptionList).option_count == 1


async def test_startup_without_models_offers_the_default_model(home):
    app = make_app(FakeBackend(["x"]), offer_fetch=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, Confirm) and app.screen.query("#no"),
                         what="fetch offer")
        assert "default model" in app.screen.question
        await pilot.click("#no")
        await pilot.pause()
        assert any("Ctrl+O" in n for n in notes(app, "warning"))


async def test_theme_is_persisted_and_keymap_comes_from_the_config(fake_model, home):
    from chatapp.config import Config, config_path

    cfg = config_path()
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({"keymap": {"toggle_speed": "f9"}, "theme": "nord"}))
    app = make_app(FakeBackend(["x"]), model_path=fake_model, config=Config.load())
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        assert app.theme == "nord"
        await pilot.press("f9")
        assert app.query_one(SpeedOverlay).display
        app.theme = "gruvbox"
        await pilot.pause()
    saved = json.loads(cfg.read_text())
    assert saved["theme"] == "gruvbox"
    assert saved["keymap"] == {"toggle_speed": "f9"}


async def test_broken_config_falls_back_to_defaults_with_a_warning(fake_model, home):
    from chatapp.config import Config, config_path

    cfg = config_path()
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("{not json")
    app = make_app(FakeBackend(["x"]), model_path=fake_model, config=Config.load())
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        assert any("using the defaults" in n for n in notes(app, "warning"))


async def test_everything_is_in_the_command_palette(fake_model):
    app = make_app(FakeBackend(["x"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for want in ("Switch model", "New chat", "Chats", "Rename chat", "Delete chat", "Stop", "Regenerate",
                     "Edit last message", "Chat settings", "Toggle thinking", "Speed overlay", "Copy last reply",
                     "Export chat", "Theme"):
            assert want in titles, want


async def test_accepting_the_fetch_offer_fetches_then_loads_the_default_model(home, monkeypatch):
    import chatapp.model_loader as loader
    from chatapp.default_model import default_model_path

    target = default_model_path()

    class FakePopen:
        def __init__(self, cmd, **kw):
            assert "fetch" in cmd[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"GGUF" + b"\0" * 20)
            self.stderr = iter(["Downloading the default model…\n", "  100%  93.0 / 93.0 MB\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(loader.subprocess, "Popen", FakePopen)
    fake = FakeBackend(["x"])
    app = make_app(fake, offer_fetch=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, Confirm) and app.screen.query("#yes"))
        await pilot.click("#yes")
        await wait_until(pilot, lambda: fake.info is not None and app.loading is None, what="default model")
        assert fake.loads == [target]



async def test_first_start_opens_the_default_model_when_it_is_there(tmp_path, monkeypatch):
    """./chat fetches the default model, then the app should chat on it without a picker."""
    from chatapp import default_model
    from chatapp.app import DeltatalkApp
    from tests.fakes import FakeBackend

    model = tmp_path / "models" / default_model.FILENAME
    model.parent.mkdir(parents=True)
    model.write_bytes(b"GGUF")
    monkeypatch.setenv("DELTATALK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTATALK_MODELS_DIR", str(model.parent))
    app = DeltatalkApp(backend=FakeBackend())
    async with app.run_test() as pilot:
        for _ in range(50):
            await pilot.pause(0.05)
            if app.backend.info is not None:
                break
        assert app.backend.info is not None and app.backend.info.path == model
