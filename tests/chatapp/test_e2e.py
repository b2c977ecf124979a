"""End to end: the real app on the real default model, driven through Pilot."""

from __future__ import annotations

import re
import time

import pytest

from tests.chatapp.conftest import make_app

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]


async def test_real_model_streams_a_reply_and_the_gauge_shows_speed(home, default_model_path, monkeypatch):
    from chatapp.engine_backend import EngineBackend
    from chatapp.config import Config
    from chatapp.widgets import Gauge, MessageBox

    config = Config.load()
    config.overrides["max_tokens"] = 40
    config.overrides["sampling"] = {"temperature": 0.0}
    chunks = []
    orig = MessageBox.append

    async def counting(self, text):
        chunks.append(text)
        await orig(self, text)

    monkeypatch.setattr(MessageBox, "append", counting)
    shown = []          # what the gauge's speed label showed, every time it was repainted
    orig_refresh = Gauge.refresh_text

    def recording(self):
        orig_refresh(self)
        shown.append(str(self.query_one("#g-tps").render()))

    monkeypatch.setattr(Gauge, "refresh_text", recording)
    backend = EngineBackend()
    app = make_app(backend, model_path=default_model_path, config=config)
    async with app.run_test(size=(110, 34)) as pilot:
        deadline = time.monotonic() + 600   # the first run compiles the kernels
        while backend.info is None or app.loading is not None:
            assert time.monotonic() < deadline, "the default model did not load"
            assert not [n for n in app._notifications if n.severity == "error"], "loading failed"
            await pilot.pause(0.1)
        # type the question as a user would, then Enter
        app.chat_input.focus()
        question = "What is the capital of France?"
        await pilot.press(*[{" ": "space", "?": "question_mark"}.get(ch, ch) for ch in question])
        assert app.chat_input.text == "What is the capital of France?"
        await pilot.press("enter")
        while not app.turns and not app.generating:   # the reply starts
            await pilot.pause(0.01)
        gauge = app.query_one(Gauge)
        deadline = time.monotonic() + 300
        while app.generating:
            assert time.monotonic() < deadline, "the reply did not finish"
            await pilot.pause(0.05)
        seen_tps = [float(m.group(1)) for t in shown if (m := re.search(r"([\d.]+) tok/s", t))]
        await pilot.pause()
        reply = list(app.query(MessageBox))[-1]
        assert reply.role == "assistant" and reply.status in ("done", "length")
        assert reply.content.strip(), "the reply is empty"
        assert len(chunks) > 1, f"the reply came in one piece: {chunks}"
        assert any(v > 0 for v in seen_tps), f"the gauge never showed a speed: {seen_tps[:5]}"
        assert gauge.turn.decode_tps > 0 and gauge.turn.generated > 1
        assert not [n for n in app._notifications if n.severity == "error"]
