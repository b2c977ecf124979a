"""Pilot tests of issue 17: the TUI as users of oterm, elia, ollama and llama-cli expect it.

Text kept as typed, page keys from the prompt box, Ctrl+C, Up for earlier prompts, the
settings form's keys, restored chats at their end with their draft, the cost of a model
switch, base models, the 80x24 layout, figures of a new chat, chat list search."""

from __future__ import annotations


import pytest
from textual.widgets import Button, DataTable, Label, Markdown, OptionList, Static

from tests.fakes import FakeBackend
from chatapp.model_switch import ModelSwitchDialog, estimate_switch
from chatapp.prompt_input import EnterSubmitsTextArea
from chatapp.screens import ChatList, ChatSettings, ModelPicker
from chatapp.widgets import Gauge
from tests.chatapp.conftest import boxes, make_app, notes, ready, send, wait_reply, wait_until

pytestmark = pytest.mark.asyncio


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


# -- 2. scrolling from the prompt box -----------------------------------------------------------
async def test_page_keys_in_the_prompt_box_scroll_and_stop_following_until_the_end(fake_model, monkeypatch):
    import chatapp.reply_stream as reply_stream

    # text batches stay 40 ms apart even on a loaded machine (the pacer would widen them, and
    # text generated before the fake holds would wait for the next token): this test is about
    # scrolling, not pacing
    monkeypatch.setattr(reply_stream, "MAX_BATCH_SECONDS", reply_stream.BATCH_SECONDS)
    long = "\n\n".join(f"Paragraph {i} with some words." for i in range(60))
    fake = FakeBackend([long], hold_after=150, token_delay=0.001)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        view = app.messages_view
        await send(pilot, app, "long please")
        await wait_until(pilot, lambda: fake.held.is_set() and view.max_scroll_y > 30, what="overflowing reply")
        await pilot.pause(0.1)
        assert view.following and view.scroll_y >= view.max_scroll_y - 1
        assert app.focused is app.chat_input
        bottom = view.scroll_y
        await pilot.press("pageup")
        await pilot.pause()
        assert view.scroll_y < bottom - 5 and not view.following
        assert app.focused is app.chat_input            # the focus stays in the box: typing still works
        await pilot.press("shift+pageup")
        await pilot.pause()
        up = view.scroll_y
        fake.resume.set()                               # the rest of the reply streams in...
        await wait_reply(pilot, app)
        await pilot.pause(0.1)
        assert view.scroll_y == up < view.max_scroll_y - 30   # ...and the view stays where the user is
        await pilot.press("ctrl+home")
        await pilot.pause()
        assert view.scroll_y == 0
        await pilot.press("pagedown")
        await pilot.pause()
        assert 0 < view.scroll_y < view.max_scroll_y
        await pilot.press("ctrl+end")
        await pilot.pause()
        assert view.scroll_y == view.max_scroll_y and view.following
        await pilot.press("x")
        assert app.chat_input.text == "x"


# -- 6. keys from other tools --------------------------------------------------------------------
async def test_ctrl_c_stops_a_reply_and_quits_only_when_idle_and_pressed_twice(fake_model):
    long = " ".join(f"word{i}" for i in range(300))
    fake = FakeBackend([long], hold_after=30, token_delay=0.001)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "talk")
        await wait_until(pilot, lambda: fake.held.is_set(), what="streaming")
        await pilot.press("ctrl+c")
        await wait_reply(pilot, app)
        assert boxes(app, "assistant")[0].status == "stopped"
        assert app.is_running
        await pilot.press("ctrl+c")                     # idle: the first press only says how to quit
        await pilot.pause()
        assert app.is_running
        assert any("Ctrl+C again" in n for n in notes(app))
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert not app.is_running


async def test_ctrl_c_with_text_selected_in_the_box_copies_it(fake_model):
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        app.chat_input.text = "copy me"
        app.chat_input.focus()
        app.chat_input.select_all()
        await pilot.press("ctrl+c", "ctrl+c")
        await pilot.pause()
        assert app.is_running and app.clipboard == "copy me"


async def test_up_in_an_empty_box_recalls_earlier_prompts(fake_model):
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        for text in ("first question", "second\nquestion", "third"):
            await send(pilot, app, text)
            await wait_reply(pilot, app)
        inp = app.chat_input
        assert inp.text == ""
        await pilot.press("up")
        assert inp.text == "third"
        await pilot.press("up")
        assert inp.text == "second\nquestion"          # the cursor is at its end (second line)...
        await pilot.press("up")
        assert inp.text == "second\nquestion"          # ...so Up first moves within it
        await pilot.press("up")
        assert inp.text == "first question"
        await pilot.press("up")
        assert inp.text == "first question"            # the oldest stays
        await pilot.press("down")
        assert inp.text == "second\nquestion"
        await pilot.press("down", "down")
        assert inp.text == "" and not app.generating    # back to the (empty) text being typed
        await pilot.press(*"new", "up")
        assert inp.text == "new"                        # Up in a box with text moves the cursor only


async def test_alt_enter_is_a_newline_and_the_next_keys_are_kept():
    """The terminal sends ESC CR for Alt+Enter (tmux, xterm); the keys typed right after it must survive."""
    from textual._xterm_parser import XTermParser

    from chatapp.prompt_input import teach_alt_enter

    teach_alt_enter()
    parser = XTermParser()
    keys = [getattr(m, "key", None) for m in [*parser.feed("a\x1b\rbc"), *parser.feed("")]]
    assert keys == ["a", "alt+enter", "b", "c"]
    assert "alt+enter" in EnterSubmitsTextArea.NEWLINE_KEYS


async def test_hint_names_the_newline_key_this_terminal_reports():
    from chatapp.prompt_input import newline_hint, shift_enter_reported

    assert shift_enter_reported({"TERM": "xterm-kitty"}) and shift_enter_reported({"TERM_PROGRAM": "WezTerm"})
    assert not shift_enter_reported({"TERM": "tmux-256color"}) and not shift_enter_reported({})
    assert "Shift+Enter" in newline_hint(True)
    assert "Ctrl+J" in newline_hint(False) and "Shift+Enter" not in newline_hint(False)


async def test_hint_switches_to_shift_enter_once_the_terminal_reports_it(fake_model, monkeypatch):
    for var in ("TERM_PROGRAM", "LC_TERMINAL", "KITTY_WINDOW_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        assert "Ctrl+J" in str(app.chat_input.placeholder)
        app.chat_input.focus()
        await pilot.press("a", "shift+enter", "b")
        assert app.chat_input.text == "a\nb"
        assert "Shift+Enter" in str(app.chat_input.placeholder)


# -- 4. settings ----------------------------------------------------------------------------------
async def test_settings_focus_the_first_field_enter_saves_esc_cancels(fake_model):
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatSettings), what="settings")
        await pilot.pause()
        assert app.focused is app.screen.query_one("#cs-system")
        await pilot.press(*"Be terse.", "ctrl+j", *"Very.")      # typed keys land in the first field
        await pilot.press("tab")
        assert app.focused is app.screen.query_one("#cs-temperature")
        app.focused.value = ""
        await pilot.press(*"0.2", "enter")                          # Enter in a field saves
        await wait_until(pilot, lambda: not isinstance(app.screen, ChatSettings), what="saved")
        assert app.chat.system_prompt == "Be terse.\nVery."
        assert app.chat.settings["temperature"] == 0.2
        assert not boxes(app)                                       # nothing was sent as a message
        # Esc cancels: nothing changes
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatSettings), what="settings again")
        await pilot.press(*" Changed", "escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, ChatSettings), what="cancelled")
        assert app.store.get_chat(app.chat.id).system_prompt == "Be terse.\nVery."


async def test_settings_form_scrolls_to_every_field_at_80x24(fake_model):
    app = make_app(FakeBackend(["ok"]), model_path=fake_model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatSettings), what="settings")
        await pilot.pause()
        screen = app.screen
        form = screen.query_one("#cs-form")
        save = screen.query_one("#ok", Button)
        assert save.region.bottom <= 24 and save.region.height >= 1      # Save on screen
        assert form.max_scroll_y > 0                                    # the form scrolls...
        for _ in range(8):                                              # the last number field
            await pilot.press("tab")
        await pilot.pause()
        field = app.focused                                             # ...to the field that has the focus
        assert field.id == "cs-max_tokens"
        assert form.region.contains_region(field.region)


# -- 5. a restored chat opens at its end, with its draft ------------------------------------------
async def test_restored_chat_opens_at_the_bottom_with_its_unsent_draft(fake_model):
    long = "\n\n".join(f"Paragraph {i} of a long answer." for i in range(40))
    app = make_app(FakeBackend([long]), model_path=fake_model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first chat")
        await wait_reply(pilot, app)
        first = app.chat.id
        await pilot.press(*"half-written ", "ctrl+j", *"second line")
        await pilot.press("ctrl+n")                     # another chat has its own (empty) box
        await pilot.pause()
        assert app.chat is None and app.chat_input.text == ""
        await send(pilot, app, "second chat")
        await wait_reply(pilot, app)
        await pilot.press(*"draft of chat two")
        await pilot.press("ctrl+q")                     # quit with both drafts unsent
    app2 = make_app(FakeBackend(["x"]), model_path=fake_model)
    async with app2.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app2)
        await pilot.pause(0.2)
        assert app2.chat_input.text == "draft of chat two"
        await app2.open_chat(first)
        await pilot.pause(0.2)
        view = app2.messages_view
        assert view.max_scroll_y > 20
        assert view.scroll_y == view.max_scroll_y       # at the latest message, not at the top
        assert app2.chat_input.text == "half-written \nsecond line"


# -- 3. switching models mid-chat -------------------------------------------------------------------
async def test_switch_cost_uses_the_measured_speed_or_scales_the_current_one():
    measured = estimate_switch(1082, 170.0)
    assert measured.seconds == pytest.approx(1082 / 170.0)
    assert "1,082 tokens" in measured.text() and "6 s" in measured.text() and "measured" in measured.text()
    scaled = estimate_switch(3763, None, current_tps=800.0, current_bytes=100, new_bytes=2000)
    assert scaled.seconds == pytest.approx(3763 / 40.0)
    assert "1.6 min" in scaled.text()
    assert estimate_switch(10, None).seconds is None and "unknown" in estimate_switch(10, None).text()


async def test_model_switch_mid_chat_shows_the_cost_first_and_can_start_a_new_chat(home):
    from chatapp.store import ChatStore

    a, b = home / "model-a.gguf", home / "model-b.gguf"
    for p in (a, b):
        p.write_bytes(b"GGUF" + b"\0" * 60)
    words = " ".join(f"w{i}" for i in range(100))
    fake = FakeBackend([words])
    app = make_app(fake, model_path=a)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "a question " + words)
        await wait_reply(pilot, app)
        chat = app.chat.id
        tokens = fake.session_stats()["context_used"]
        assert tokens > 100
        assert boxes(app, "assistant")[0].role_text() == "Assistant · model-a"      # each reply says its model
        # a speed measured earlier with model-b on this machine
        app.store.add_message(chat, "assistant", "old", stats={"model": "model-b.gguf", "prompt_tokens": 500,
                                                                "reused_tokens": 0, "prompt_tps": 250.0})
        app._confirm_switch(b)
        await wait_until(pilot, lambda: isinstance(app.screen, ModelSwitchDialog), what="switch dialog")
        await pilot.pause()
        text = " ".join(" ".join(shown_text(w).split()) for w in app.screen.query(Static))
        assert f"{tokens:,} tokens" in text and "250 tok/s measured" in text
        assert fake.loads == [a]                          # nothing paid yet
        await pilot.press("escape")                       # cancel: nothing happens
        await pilot.pause()
        assert fake.loads == [a] and app.chat.id == chat
        app._confirm_switch(b)
        await wait_until(pilot, lambda: isinstance(app.screen, ModelSwitchDialog), what="switch dialog")
        await pilot.pause()
        await pilot.click("#switch-new")
        await wait_until(pilot, lambda: fake.loads[-1] == b and app.loading is None, what="model-b loaded")
        assert app.chat is None and not boxes(app)        # a new chat: nothing to read again
        await send(pilot, app, "hello b")
        await wait_reply(pilot, app)
        assert boxes(app, "assistant")[0].role_text() == "Assistant · model-b"
        assert ChatStore(app.store.path).messages(app.chat.id)[-1].stats["model"] == "model-b.gguf"


async def test_model_switch_continue_keeps_the_chat_and_says_what_the_next_reply_costs(home):
    a, b = home / "model-a.gguf", home / "model-b.gguf"
    for p in (a, b):
        p.write_bytes(b"GGUF" + b"\0" * 60)
    fake = FakeBackend(["one two three"])
    app = make_app(fake, model_path=a)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi there")
        await wait_reply(pilot, app)
        chat = app.chat.id
        app._confirm_switch(b)
        await wait_until(pilot, lambda: isinstance(app.screen, ModelSwitchDialog), what="switch dialog")
        await pilot.pause()
        await pilot.click("#switch-continue")
        await wait_until(pilot, lambda: fake.loads[-1] == b and app.loading is None, what="model-b loaded")
        assert app.chat.id == chat
        note = boxes(app, "system-note")[-1]
        assert "model-b" in note.content and "reads this chat again" in note.content
        await send(pilot, app, "and now?")
        await wait_reply(pilot, app)
        labels = [b.role_text() for b in boxes(app, "assistant")]
        assert labels == ["Assistant · model-a", "Assistant · model-b"]


async def test_picking_another_model_in_a_chat_goes_through_the_cost_dialog(home):
    from chatapp.discovery import Candidate

    a, b = home / "model-a.gguf", home / "model-b.gguf"
    for p in (a, b):
        p.write_bytes(b"GGUF" + b"\0" * 60)
    fake = FakeBackend(["one two"])
    app = make_app(fake, model_path=a, find_models=lambda: [Candidate(b, "models", b.name)])
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hi")
        await wait_reply(pilot, app)
        app.action_pick_model()
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker) and app.screen.done_scanning,
                         what="picker")
        app.screen.dismiss(b)                             # (the stand-in file is no real GGUF: chosen directly)
        await wait_until(pilot, lambda: isinstance(app.screen, ModelSwitchDialog), what="switch dialog")
        assert fake.loads == [a]


# -- 3. base models ----------------------------------------------------------------------------------
async def test_base_model_is_marked_in_the_picker_and_said_in_the_chat(home):
    from chatapp.discovery import candidates
    from chatapp.paths import models_dir
    from tests.tiny_models import write_tiny_llama

    md = models_dir()
    md.mkdir(parents=True)
    write_tiny_llama(md / "tiny-chat.gguf")
    base = write_tiny_llama(md / "tiny-base.gguf", chat_template=False)

    def find():
        return candidates(md, [], home=home / "home", env={}, huggingface=False, lmstudio=False, ollama=False)

    fake = FakeBackend(["and so on and so on"], base_model=True)
    app = make_app(fake, find_models=find)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker) and app.screen.done_scanning,
                         what="picker")
        table = app.screen.query_one(DataTable)
        status = {str(k.value): table.get_cell(k, "status") for k in table.rows}
        assert status[str(base)] == "✓ base model: completion only"
        assert status[str(md / "tiny-chat.gguf")] == "✓ supported"
        table.move_cursor(row=table.get_row_index(str(base)))
        await pilot.pause()
        assert "base model" in str(app.screen.query_one("#picker-detail", Label).render())
        await pilot.press("enter")
        await ready(pilot, app)
        await wait_until(pilot, lambda: boxes(app, "system-note"), what="note in the chat")
        assert "base model" in boxes(app, "system-note")[0].content
        assert "completion only" in boxes(app, "system-note")[0].content


# -- 7. readable at 80x24 ---------------------------------------------------------------------------
async def test_picker_shows_readable_reasons_and_does_not_count_broken_files(home):
    from chatapp.discovery import candidates
    from chatapp.paths import models_dir
    from tests.tiny_models import write_tiny_llama

    md = models_dir()
    md.mkdir(parents=True)
    write_tiny_llama(md / "tiny-llama.gguf")
    (md / "not-gguf.gguf").write_bytes(b"H\xcfe\x00" + b"\x00" * 64)
    (md / "cut.gguf").write_bytes(b"GGUF\x03")

    def find():
        return candidates(md, [], home=home / "home", env={}, huggingface=False, lmstudio=False, ollama=False)

    app = make_app(FakeBackend(), find_models=find)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker) and app.screen.done_scanning,
                         what="picker")
        await pilot.pause()
        screen = app.screen
        summary = str(screen.query_one("#picker-status", Label).render())
        assert summary.startswith("1 model found, 1 supported.") and "2 files could not be read" in summary
        table = screen.query_one(DataTable)
        statuses = [table.get_cell(k, "status") for k in table.rows]
        assert all(len(s) <= 32 for s in statuses)
        assert "✗ not a GGUF file" in statuses
        status_col = table.columns["status"]
        assert table.region.x + sum(c.get_render_width(table) for c in list(table.columns.values())[:2]) <= 80
        assert status_col.label.plain == "Status"
        row = table.get_row_index(str(md / "not-gguf.gguf"))
        table.move_cursor(row=row)
        await pilot.pause()
        detail = str(screen.query_one("#picker-detail", Label).render())
        assert detail.startswith("not-gguf.gguf: not a GGUF file") and "b'" not in detail and "\\x" not in detail


async def test_footer_keeps_help_and_settings_and_the_gauge_fits_one_line_at_80x24(fake_model):
    app = make_app(FakeBackend(["one two three four five six"]), model_path=fake_model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "q " * 40)
        await wait_reply(pilot, app)
        await pilot.pause()
        visible = {k.action for k in app.screen.query("FooterKey") if k.region.width and k.region.right <= 80}
        assert {"help", "chat_settings", "pick_model", "new_chat", "chat_list"} <= visible, visible
        gauge = app.query_one(Gauge)
        details = gauge.query_one("#g-details", Label)
        await wait_until(pilot, lambda: len(str(details.render())) <= details.size.width,
                         what="figures refitted after the gauge's layout settled")
        text = str(details.render())
        assert "\n" not in text and len(text) <= details.size.width and "TTFT" in text and "ctx" in text
        assert gauge.size.height == 1


async def test_gauge_drops_the_least_important_figures_to_fit():
    from chatapp.widgets import TurnRecord

    g = Gauge()
    g.n_ctx = 8192
    g.turn = TurnRecord(prompt_tokens=143, reused_tokens=116, prefilled_tokens=27, prefill_done=27,
                        prefill_total=27, prompt_tps=430.0, ttft_s=0.086, decode_tps=51.4, generated=200,
                        context_used=328)
    full = g.details_text()
    assert full == "430 tok/s prompt · TTFT 86 ms · ctx 328/8,192 · reused 116 of 143 prompt tokens"
    assert g.details_text(60) == "pp 430 t/s · TTFT 86 ms · ctx 328/8,192 · reused 116/143"
    assert g.details_text(40) == "TTFT 86 ms · ctx 328/8,192"
    assert g.details_text(12) == "TTFT 86 ms"


# -- 8. first reply, new chat, regenerate ----------------------------------------------------------------
async def test_new_chat_resets_the_speed_figures(fake_model):
    app = make_app(FakeBackend(["a b c d"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hello")
        await wait_reply(pilot, app)
        gauge = app.query_one(Gauge)
        assert gauge.turn.decode_tps > 0 and app.turns
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert gauge.turn.decode_tps == 0 and gauge.turn.ttft_s == 0 and not app.turns
        assert "tok/s" in gauge.tps_text() and "TTFT" not in gauge.details_text()


async def test_regenerate_in_an_empty_chat_says_why_nothing_happens(fake_model):
    app = make_app(FakeBackend(["x"]), model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert any("no message yet" in n for n in notes(app, "warning"))
        assert not app.generating and not app.backend.calls


async def test_load_bar_says_warming_up_while_the_first_reply_warm_up_runs(fake_model):
    from chatapp.model_loader import LOAD_STAGES

    assert "Warming up" in LOAD_STAGES["warm"]


# -- also: chat list with dates, model and search; titles cut at a word ------------------------------------
async def test_chat_list_shows_dates_models_and_searches(fake_model):
    app = make_app(FakeBackend(["The capital is Paris.", "Use a hash map.", "ok"]), model_path=fake_model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "What is the capital of France, and why did it become the capital city?")
        await wait_reply(pilot, app)
        assert app.chat.title == "What is the capital of France, and why did it…"   # cut at a word
        await pilot.press("ctrl+n")
        await send(pilot, app, "How do I count words in Python?")
        await wait_reply(pilot, app)
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatList), what="chat list")
        await pilot.pause()
        ol = app.screen.query_one(OptionList)
        texts = [str(ol.get_option_at_index(i).prompt) for i in range(ol.option_count)]
        assert len(texts) == 2 and "count words" in texts[0]
        assert all("today" in t and "fake-model" in t and "2 messages" in t for t in texts)
        await pilot.press("slash", *"paris")          # searches message text too
        await pilot.pause()
        texts = [str(ol.get_option_at_index(i).prompt) for i in range(ol.option_count)]
        assert len(texts) == 1 and "capital of France" in texts[0]
        await pilot.press("enter")
        await wait_until(pilot, lambda: not isinstance(app.screen, ChatList), what="opened")
        assert "capital" in app.chat.title


async def test_chat_dates_and_shortened_titles():
    import time

    from chatapp.screens import chat_date, shorten

    now = time.mktime((2026, 12, 5, 15, 0, 0, 0, 0, -1))
    assert chat_date(now - 3600, now) == "today 14:00"
    assert chat_date(time.mktime((2026, 3, 9, 10, 0, 0, 0, 0, -1)), now) == "9 Mar"
    assert chat_date(time.mktime((2025, 3, 9, 10, 0, 0, 0, 0, -1)), now) == "9 Mar 2025"
    assert shorten("short", 10) == "short"
    assert shorten("alpha beta gamma delta", 14) == "alpha beta…"
    assert shorten("SmolLM2-135M-Instruct.Q4_1.gguf", 20) == "SmolLM2-135M…"
