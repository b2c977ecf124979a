"""Pilot tests of the chat screen with the FakeBackend: send, stream, stop, gauge, overlay,
regenerate, edit, thinking, copy, export, errors."""

from __future__ import annotations

import pytest

from tests.fakes import FakeBackend
from chatapp.widgets import Gauge, MessageBox, SpeedOverlay
from tests.chatapp.conftest import boxes, make_app, notes, ready, send, wait_reply, wait_until

pytestmark = pytest.mark.asyncio

async def test_send_streams_markdown_reply_and_stores_it(fake_model):
    app = make_app(FakeBackend(["Hi **there**, friend.\n\n```python\nprint(1)\n```"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hello")
        await wait_reply(pilot, app)
        b = boxes(app)
        assert [x.role for x in b] == ["user", "assistant"]
        assert b[1].content.startswith("Hi **there**, friend.")
        assert b[1].status == "done"
        assert app.chat_input.text == ""       # the input is cleared after sending
        stored = app.store.messages(app.chat.id)
        assert [(m.role, m.status) for m in stored] == [("user", "done"), ("assistant", "done")]
        assert stored[1].content == b[1].content
        assert app.chat.title == "hello"
        # the backend got the conversation
        assert app.backend.calls[-1]["messages"] == [{"role": "user", "content": "hello"}]


async def test_text_goes_up_in_batches(fake_model, monkeypatch):
    words = " ".join(f"w{i}" for i in range(400))
    app = make_app(FakeBackend([words]), model_path=fake_model)
    chunks = []
    orig = MessageBox.append

    async def counting(self, text):
        chunks.append(text)
        await orig(self, text)

    monkeypatch.setattr(MessageBox, "append", counting)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "count")
        await wait_reply(pilot, app)
        assert "".join(chunks) == words       # nothing lost
        assert len(chunks) < 40                # far fewer UI updates than the 400 tokens
        assert boxes(app)[-1].content == words


async def test_enter_sends_shift_enter_and_ctrl_j_add_newlines(fake_model):
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.chat_input.focus()
        await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
        assert app.chat_input.text == "a\nb\nc"
        assert not app.generating and not boxes(app)
        await pilot.press("enter")
        await wait_reply(pilot, app)
        assert boxes(app)[0].content == "a\nb\nc"


async def test_escape_stops_and_keeps_partial_reply(fake_model):
    long = " ".join(f"word{i}" for i in range(300))
    fake = FakeBackend([long], hold_after=40, token_delay=0.002)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "talk a lot")
        await wait_until(pilot, lambda: fake.held.is_set() and app.chat_view.reply_box is not None
                         and app.chat_view.reply_box.content.startswith("word0 word1"), what="streamed tokens")
        await pilot.press("escape")
        await wait_reply(pilot, app)
        reply = boxes(app)[-1]
        assert reply.status == "stopped"
        assert reply.content == " ".join(f"word{i}" for i in range(41))   # + the token sampled at the stop
        assert reply.query_one(".status").display           # marked on screen
        stored = app.store.messages(app.chat.id)[-1]
        assert stored.status == "stopped" and stored.content == reply.content
        assert app.gauge.turn.finish == "cancelled"
        # the partial reply is part of the conversation for the next turn
        await send(pilot, app, "go on")
        await wait_until(pilot, lambda: fake.held.is_set() and len(fake.calls) == 2)
        await pilot.press("escape")
        await wait_reply(pilot, app)
        assert fake.calls[1]["messages"][1] == {"role": "assistant", "content": reply.content}


async def test_gauge_shows_speed_ttft_context_and_reuse(fake_model):
    fake = FakeBackend(["one two three four", "five six seven"], n_ctx=4096)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(140, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first question")
        await wait_reply(pilot, app)
        g = app.query_one(Gauge)
        assert g.turn.decode_tps == FakeBackend.DECODE_TPS
        assert g.turn.ttft_s == FakeBackend.TTFT_S
        assert g.turn.prompt_tps == FakeBackend.PROMPT_TPS
        assert g.turn.reused_tokens == 0 and g.turn.prompt_tokens == 4
        assert "42.0 tok/s" in g.tps_text()
        details = g.details_text()
        assert "TTFT 125 ms" in details and "1,234 tok/s prompt" in details
        assert "ctx 8/4,096" in details   # 4 prompt tokens + 4 generated
        assert "reused 0 of 4 prompt tokens" in details
        await send(pilot, app, "second")
        await wait_reply(pilot, app)
        # the second prompt extends the first: the old prompt + reply are reused
        assert g.turn.reused_tokens == 8 and g.turn.prompt_tokens == 11
        assert "reused 8 of 11 prompt tokens" in g.details_text()
        assert g.turn.speed_history()[-1] == FakeBackend.DECODE_TPS
        assert str(g.query_one("#g-spark").render()).strip("█ ") == ""   # a steady speed is full bars
        assert len(app.turns) == 2


async def test_speed_overlay_toggles_and_shows_memory_threads_and_bandwidth_share(fake_model):
    app = make_app(FakeBackend(["a b c d e"]), model_path=fake_model)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        await wait_reply(pilot, app)
        overlay = app.query_one(SpeedOverlay)
        assert not overlay.display
        await pilot.press("f2")
        assert overlay.display
        # the stats are read in a worker (the first read measures memory bandwidth)
        await wait_until(pilot, lambda: overlay.stats.threads == 2, what="overlay stats")
        text = overlay.render_text()
        assert "threads 2 · threading layer workqueue" in text and "kernels avx2" in text
        assert "model weights" in text and "100.0 MB" in text
        assert "KV cache" in text and "recurrent state" in text and "checkpoints" in text
        assert "RSS" in text and "300.0 MB" in text
        # 100 MB x 42 tok/s / 10 GB/s = 42 % of the bound of 100 tok/s
        assert "42%" in text and "100.0 tok/s" in text
        assert "1,234" in text and "125 ms" in text
        await pilot.press("f2")
        assert not overlay.display


async def test_speed_overlay_says_where_the_weights_are_mapped(fake_model):
    from chatapp.backend import BackendStats

    fake = FakeBackend(["a b"])
    fake._stats = BackendStats(model_bytes=100_000_000, threads=2, bandwidth_bytes_s=35e9,
                               weight_pages="weights on 2 MB pages: 98%")
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(pilot, app)
        overlay = app.query_one(SpeedOverlay)
        await pilot.press("f2")
        await wait_until(pilot, lambda: overlay.stats.threads == 2, what="overlay stats")
        assert "weights on 2 MB pages: 98%" in overlay.render_text()


async def test_regenerate_replaces_the_last_reply(fake_model):
    fake = FakeBackend(["first answer", "second answer"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "question")
        await wait_reply(pilot, app)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(fake.calls) == 2)
        await wait_reply(pilot, app)
        b = boxes(app)
        assert [x.content for x in b] == ["question", "second answer"]
        assert fake.calls[1]["messages"] == [{"role": "user", "content": "question"}]
        assert [m.content for m in app.store.messages(app.chat.id)] == ["question", "second answer"]


async def test_edit_last_message_puts_it_back_in_the_input(fake_model):
    fake = FakeBackend(["reply one", "reply two", "reply three"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first")
        await wait_reply(pilot, app)
        await send(pilot, app, "secnd")
        await wait_reply(pilot, app)
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert app.chat_input.text == "secnd"
        assert [x.content for x in boxes(app)] == ["first", "reply one"]
        app.chat_input.text = "second"
        await pilot.press("enter")
        await wait_reply(pilot, app)
        assert [x.content for x in boxes(app)] == ["first", "reply one", "second", "reply three"]
        assert fake.calls[-1]["messages"][-1] == {"role": "user", "content": "second"}


async def test_thinking_shows_in_a_collapsible_and_can_be_turned_off(fake_model):
    fake = FakeBackend(["<think>Let me think.</think>\n\nThe answer is 4."], supports_thinking=True)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "2+2?")
        await wait_reply(pilot, app)
        reply = boxes(app)[-1]
        assert reply.thinking == "Let me think."
        assert reply.content == "The answer is 4."
        assert reply._think_box.display and reply._think_box.collapsed
        assert fake.calls[-1]["enable_thinking"] is True
        await pilot.press("ctrl+t")
        assert app.chat.thinking is False
        await send(pilot, app, "again")
        await wait_reply(pilot, app)
        assert fake.calls[-1]["enable_thinking"] is False
        stored = app.store.messages(app.chat.id)[1]
        assert stored.thinking == "Let me think." and stored.content == "The answer is 4."


async def test_thinking_toggle_on_a_model_without_it_says_so(fake_model):
    app = make_app(FakeBackend(["x"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+t")
        assert any("no thinking mode" in n for n in notes(app))


async def test_copy_last_reply_and_code_blocks(fake_model):
    reply = "Two blocks:\n\n```python\nprint('a')\n```\n\nand\n\n```sh\necho b\n```"
    app = make_app(FakeBackend([reply]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "code please")
        await wait_reply(pilot, app)
        await pilot.press("f3")
        assert app.clipboard == reply
        await pilot.press("f4")
        assert app.clipboard == "echo b"
        assert app.code_blocks() == ["print('a')", "echo b"]
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Copy code block 1" in titles and "Copy code block 2" in titles
        next(c for c in app.get_system_commands(app.screen) if c.title == "Copy code block 1").callback()
        assert app.clipboard == "print('a')"


async def test_export_markdown(fake_model, home):
    app = make_app(FakeBackend(["An answer."]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "A question")
        await wait_reply(pilot, app)
        out = home / "export.md"
        app.action_export()
        await pilot.pause()
        from textual.widgets import Input

        app.screen.query_one(Input).value = str(out)
        await pilot.press("enter")
        await wait_until(pilot, out.exists, what="export file")
        text = out.read_text()
        assert text.startswith("# A question")
        assert "## You\n\nA question" in text and "## Assistant\n\nAn answer." in text


async def test_engine_error_is_a_notification_not_a_traceback(fake_model, home):
    from engine.errors import TemplateError

    fake = FakeBackend(fail_on_reply=TemplateError("unknown filter 'foo' at line 3"))
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        await wait_reply(pilot, app)
        errs = notes(app, "error")
        assert errs == ["chat template error: unknown filter 'foo' at line 3"]
        assert boxes(app)[-1].status == "error"
        assert app.is_running
        log = (home / "dt" / "log" / "deltatalk.log").read_text()
        assert "Traceback" in log and "TemplateError" in log
        # the failed reply is not sent back to the model next time
        fake.fail_on_reply = None
        await send(pilot, app, "again")
        await wait_reply(pilot, app)
        assert fake.calls[-1]["messages"] == [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]


async def test_out_of_memory_and_unexpected_errors_get_one_line_causes(fake_model):
    app = make_app(FakeBackend(fail_on_reply=MemoryError()), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        await wait_reply(pilot, app)
        assert any("out of memory" in n for n in notes(app, "error"))
        app.backend.fail_on_reply = RuntimeError("boom\nsecond line")
        await send(pilot, app, "hi")
        await wait_reply(pilot, app)
        assert "RuntimeError: boom second line" in notes(app, "error")


async def test_chat_settings_system_prompt_and_sampling_reach_the_backend(fake_model):
    fake = FakeBackend(["ok"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+s")
        await pilot.pause()
        from textual.widgets import Input, TextArea

        scr = app.screen
        scr.query_one("#cs-system", TextArea).text = "You are terse."
        scr.query_one("#cs-temperature", Input).value = "0"
        scr.query_one("#cs-max_tokens", Input).value = "77"
        await pilot.press("enter")   # Enter in the system prompt saves (the focus is there on open)
        await pilot.pause()
        assert app.chat.system_prompt == "You are terse."
        await send(pilot, app, "hi")
        await wait_reply(pilot, app)
        call = fake.calls[-1]
        assert call["messages"][0] == {"role": "system", "content": "You are terse."}
        assert call["settings"].temperature == 0.0
        assert call["max_tokens"] == 77


async def test_sampling_flags_on_the_command_line_reach_the_backend(fake_model, monkeypatch):
    """`deltatalk --temp 0.2 ...` goes cli.main -> run_tui -> the App; its reply is asked with the flags,
    the fields not given keep the config's values, and a chat's own settings win over a flag."""
    import chatapp.app as appmod
    import chatapp.cli as cli
    from engine.sampling import SamplingSettings

    fake = FakeBackend(["ok"])
    started = []
    monkeypatch.setattr(appmod.DeltatalkApp, "_new_local_backend", lambda self: fake)
    monkeypatch.setattr(appmod.DeltatalkApp, "run", lambda self: started.append(self))
    assert cli.main(["--temp", "0.2", "--top-k", "7", "--seed", "5", "--max-tokens", "9",
                     "-m", str(fake_model)]) == 0
    app = started[0]
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hello")
        await wait_reply(pilot, app)
        call = fake.calls[-1]
        assert (call["settings"].temperature, call["settings"].top_k, call["settings"].seed) == (0.2, 7, 5)
        assert call["max_tokens"] == 9
        assert call["settings"].top_p == SamplingSettings().top_p    # not given: the config's (the default)
        await pilot.press("ctrl+s")
        await pilot.pause()
        from textual.widgets import Input

        assert app.screen.query_one("#cs-temperature", Input).value == "0.2"   # the form shows the flag
        app.screen.query_one("#cs-temperature", Input).value = "0.9"
        await pilot.press("enter")
        await pilot.pause()
        await send(pilot, app, "again")
        await wait_reply(pilot, app)
        call = fake.calls[-1]
        assert (call["settings"].temperature, call["settings"].top_k, call["max_tokens"]) == (0.9, 7, 9)


async def test_sending_while_no_model_is_loaded_warns(home):
    app = make_app(FakeBackend(["x"]))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await send(pilot, app, "hello")
        await pilot.pause()
        assert not boxes(app)
        assert any("No model" in n for n in notes(app))
        assert app.chat_input.text == "hello"   # the text is kept


async def test_view_follows_the_reply_unless_the_user_scrolled_up(fake_model):
    long = "\n\n".join(f"Paragraph {i} with some words." for i in range(50))
    fake = FakeBackend([long, long], hold_after=200, token_delay=0.002)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        view = app.messages_view
        await send(pilot, app, "long please")
        await wait_until(pilot, lambda: fake.held.is_set() and view.max_scroll_y > 20, what="overflowing reply")
        await pilot.pause(0.1)
        assert view.scroll_y >= view.max_scroll_y - 2          # following the bottom while streaming
        fake.resume.set()
        await wait_reply(pilot, app)
        await pilot.pause(0.1)
        assert view.scroll_y >= view.max_scroll_y - 2
        # next reply: the user scrolls up while it streams, and the view stays put
        await send(pilot, app, "again")
        await wait_until(pilot, lambda: fake.held.is_set() and len(fake.calls) == 2)
        await pilot.pause(0.1)
        view.release_anchor()
        view.scroll_to(y=5, animate=False)
        await pilot.pause(0.1)
        fake.resume.set()
        await wait_reply(pilot, app)
        await pilot.pause(0.1)
        assert view.scroll_y < 10 < view.max_scroll_y
