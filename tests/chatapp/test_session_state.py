"""The engine session follows the open chat: its state is saved beside the history after
every reply (in the worker thread), restored when the chat is opened again, reset for a
new chat; a full context shows which messages were dropped.
"""

from __future__ import annotations

import threading

import pytest

from tests.fakes import FakeBackend
from chatapp.store import state_path
from chatapp.widgets import Gauge, MessageBox
from tests.chatapp.conftest import make_app, notes, ready, send, wait_reply, wait_until


EIGHT = "a b c d e f g h"   # 8 fake tokens


@pytest.mark.asyncio
async def test_context_full_shows_which_messages_were_dropped(fake_model):
    # prompt = <user> + 8 words + <assistant>; reserve = n_ctx // 4 = 10
    fake = FakeBackend([EIGHT], n_ctx=40)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot, app)
        for q in ("one two three four five six seven eight", "nine ten eleven twelve thirteen fourteen x y"):
            await send(pilot, app, q)
            await wait_reply(pilot, app)
        assert all(not b.dropped for b in app.query(MessageBox))
        await send(pilot, app, "the third question has eight words ok")
        await wait_reply(pilot, app)
        reply = list(app.query(MessageBox))[-1]
        assert reply.dropped == 2
        notice = reply.query_one(".notice")
        assert notice.display and str(notice.render()) == "context full: dropped the 2 oldest messages"
        assert any("dropped the 2 oldest messages" in n for n in notes(app, "warning"))
        # the first user message and its reply were left out of the prompt
        assert fake.tokens[:2] == ["<user>", "nine"]
        assert fake.last_turn().dropped_messages == 2
        stored = app.store.messages(app.chat.id)[-1]
        assert stored.stats["dropped_messages"] == 2
        # reopening the chat shows the notice again
        await app.open_chat(app.chat.id)
        await pilot.pause()
        again = list(app.query(MessageBox))[-1]
        assert again.dropped == 2 and again.query_one(".notice").display


@pytest.mark.asyncio
async def test_state_is_saved_in_the_worker_and_restored_when_the_chat_is_reopened(fake_model):
    fake = FakeBackend(["one two three", "four five"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hello there")
        await wait_reply(pilot, app)
        first = app.chat.id
        path = state_path(first)
        assert path.is_file()
        assert fake.saves == [(path, False)]          # saved once, not on the UI thread
        # a new chat resets the session
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: fake.binds and fake.binds[-1] == (None, "reset"), what="reset")
        assert fake.tokens == []
        await send(pilot, app, "another chat")
        await wait_reply(pilot, app)
        second = app.chat.id
        assert fake.last_turn().reused_tokens == 0
        # back to the first chat: its saved state is loaded, nothing is prefilled again
        await app.open_chat(first)
        await wait_until(pilot, lambda: fake.binds[-1] == (first, "loaded"), what="state loaded")
        g = app.query_one(Gauge)
        assert "ctx 7/4,096" in g.details_text()    # the gauge shows that chat's context at once
        await send(pilot, app, "more")
        await wait_reply(pilot, app)
        turn = fake.last_turn()
        assert turn.reused_tokens == 7 and turn.prefilled_tokens == 3   # only "<user> more <assistant>"
        assert fake.binds[-1] == (first, "kept")
        assert {p for p, _ in fake.saves} == {state_path(first), state_path(second)}
        assert not any(on_ui for _, on_ui in fake.saves)
        # deleting a chat deletes its state
        app.delete_chat(second)
        assert not state_path(second).exists()


@pytest.mark.asyncio
async def test_a_state_from_another_model_falls_back_to_a_full_prefill(fake_model, home):
    fake = FakeBackend(["one two three"])
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "hello")
        await wait_reply(pilot, app)
        cid = app.chat.id
        # the chat's state was made by another model
        state_path(cid).write_text('{"model": "other.gguf", "tokens": ["<user>", "x"]}')
        await pilot.press("ctrl+n")
        await app.open_chat(cid)
        await wait_until(pilot, lambda: fake.binds[-1] == (cid, "mismatch"), what="mismatch")
        await send(pilot, app, "again")
        await wait_reply(pilot, app)
        assert fake.last_turn().reused_tokens == 0          # prefilled from scratch
        assert list(app.query(MessageBox))[-1].content == "one two three"
        assert not notes(app, "error")                       # silent for the user (it is logged)


@pytest.mark.asyncio
async def test_reopening_a_chat_reuses_the_saved_engine_state(home, tmp_path):
    """The real engine (tiny llama): close the app, start it again, the first reply reuses the state."""
    from chatapp.engine_backend import EngineBackend
    from chatapp.config import Config
    from tests.tiny_models import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny-llama.gguf")

    def config():
        c = Config.load()
        c.overrides["max_tokens"] = 6
        c.overrides["sampling"] = {"temperature": 0.0}
        return c

    app = make_app(EngineBackend(n_ctx=256), model_path=model, config=config())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.backend.info is not None and app.loading is None, 120,
                         "tiny model loaded")
        await send(pilot, app, "hello")
        await wait_reply(pilot, app, timeout=60)
        cid = app.chat.id
        assert state_path(cid).is_file() and state_path(cid).stat().st_size > 0
        fed_before = list(app.backend._session.tokens)
    # a new process: a fresh backend and app; the last chat and model are opened again
    backend = EngineBackend(n_ctx=256)
    app2 = make_app(backend, model_path=model, config=config())
    async with app2.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: backend.info is not None and app2.loading is None, 120, "model")
        assert app2.chat is not None and app2.chat.id == cid
        assert backend.state_events[-1] == (cid, "loaded")
        assert backend._session.tokens == fed_before            # no prefill was needed
        await send(pilot, app2, "and more")
        await wait_reply(pilot, app2, timeout=60)
        turn = backend._session.last_turn
        assert turn.reused_tokens > 0 and turn.reused_tokens >= len(fed_before) - 1
        assert turn.prefilled_tokens < turn.prompt_tokens


def test_engine_backend_state_of_another_model_is_a_silent_mismatch(tmp_path):
    from chatapp.engine_backend import EngineBackend
    from engine.sampling import SamplingSettings
    from tests.tiny_models import write_tiny_llama

    a = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=2)
    st = tmp_path / "states" / "chat-1.npz"
    be = EngineBackend(n_ctx=128)
    be.load(a)
    assert be.bind(1, st) == "reset"
    msgs = [{"role": "user", "content": "hi"}]
    list(be.reply(msgs, SamplingSettings(temperature=0), max_tokens=3, enable_thinking=None,
                  cancel=threading.Event(), save_to=st))
    assert st.is_file()
    be.load(b, bind=(1, st))                      # another model: the state does not fit it
    assert be.state_events[-1] == (1, "mismatch")
    assert be._session.tokens == []
    out = list(be.reply(msgs, SamplingSettings(temperature=0), max_tokens=3, enable_thinking=None,
                        cancel=threading.Event(), save_to=st))
    assert out and be.last_turn().reused_tokens == 0
    be.load(b, bind=(1, st))                      # now the state is b's
    assert be.state_events[-1] == (1, "loaded")
