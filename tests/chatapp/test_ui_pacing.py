"""The UI must not pace the engine (issue 13): on a machine where the compute threads take every
core, each millisecond the UI thread renders is one the whole thread team waits.

Text batches widen only where the UI shares the cores (BatchPacer, ui_shares_cores); the gauge
changes text, never sizes or display, while a reply streams (a layout pass of the screen costs
several ms); the prompt box's cursor does not blink meanwhile (two screen updates a second); a
reply's first paragraph takes the widget its PENDING mark was in (no mount at the first token)."""

from __future__ import annotations

import pytest
from textual.app import App
from textual.widget import Widget
from textual.widgets import Markdown
from textual.widgets._markdown import MarkdownBlock, MarkdownFence, MarkdownH1, MarkdownH2, MarkdownParagraph

from chatapp.backend import BackendStats
from chatapp.reply_stream import (BATCH_SECONDS, MAX_BATCH_SECONDS, SHARED_START_SECONDS, UI_SHARE_TARGET,
                                  BatchPacer, ui_shares_cores)
from chatapp.transcript import PENDING, MessageBox
from chatapp.widgets import SPARK_WIDTH, Gauge, prefill_bar_text
from tests.chatapp.conftest import make_app, ready, send, wait_reply, wait_until
from tests.fakes import FakeBackend


class Clocks:
    """Wall and UI-thread CPU clocks the test moves by hand."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def reply(self, shares_cores: bool) -> BatchPacer:
        """A pacer on these clocks, a reply started and its first batch shown (the clock runs)."""
        pacer = BatchPacer(wall_clock=lambda: self.wall, cpu_clock=lambda: self.cpu)
        pacer.restart(shares_cores)
        pacer.ui_tick()
        return pacer

    def batch(self, pacer: BatchPacer, ui_cpu: float):
        """One batch `pacer.seconds` after the last, which cost the UI thread `ui_cpu` seconds."""
        self.wall += pacer.seconds
        self.cpu += ui_cpu
        pacer.ui_tick()


def test_with_a_core_for_the_ui_batches_stay_40_ms_apart_however_costly():
    c = Clocks()
    p = c.reply(shares_cores=False)
    for _ in range(10):
        c.batch(p, ui_cpu=0.03)   # the UI busy 75% of the time: its own core, nobody waits
    assert p.seconds == BATCH_SECONDS


def test_sharing_the_cores_batches_go_to_the_target_share_wider_at_once_narrower_by_halves():
    c = Clocks()
    p = c.reply(shares_cores=True)
    assert p.seconds == SHARED_START_SECONDS == MAX_BATCH_SECONDS   # a reply's first batches cost most
    c.batch(p, ui_cpu=0.5)
    assert p.seconds == MAX_BATCH_SECONDS                 # never further apart than this
    c.batch(p, ui_cpu=0.2 * UI_SHARE_TARGET)              # cheap: 0.2 s would do, but one batch may be chance
    assert p.seconds == pytest.approx((1.0 * 0.2) ** 0.5)
    cost = 0.8 * UI_SHARE_TARGET                          # the target share at 0.8 s (16 ms at 2%)
    c.batch(p, ui_cpu=cost)
    assert p.seconds == pytest.approx(0.8)                # wider at once
    c.batch(p, ui_cpu=cost)
    assert p.seconds == pytest.approx(0.8)                # steady at the target share
    for _ in range(30):
        c.batch(p, ui_cpu=0.0)
    assert p.seconds == pytest.approx(BATCH_SECONDS, rel=0.02) and p.seconds >= BATCH_SECONDS


def test_each_reply_starts_at_the_shared_start_or_at_40_ms():
    c = Clocks()
    p = c.reply(shares_cores=True)
    for _ in range(30):
        c.batch(p, ui_cpu=0.0)
    assert p.seconds < 0.05
    p.restart(shares_cores=True)
    assert p.seconds == SHARED_START_SECONDS
    c.batch(p, ui_cpu=0.0)   # the first batch after a restart only starts the clock
    assert p.seconds == SHARED_START_SECONDS
    p.restart(shares_cores=False)
    assert p.seconds == BATCH_SECONDS


def test_the_ui_shares_the_cores_when_the_engine_may_take_all_of_them():
    assert ui_shares_cores(BackendStats(threads=2, threads_max=2, cpus=2))
    assert ui_shares_cores(BackendStats(threads=1, threads_max=2, cpus=2))      # adaptive: may grow back
    assert not ui_shares_cores(BackendStats(threads=4, threads_max=4, cpus=8))  # SMT siblings / spare cores
    assert not ui_shares_cores(BackendStats(threads=1, threads_max=1, cpus=2))  # --threads 1 on 2 CPUs
    assert not ui_shares_cores(BackendStats(remote="http://x", threads=0, cpus=0))


def test_prefill_bar_fills_the_sparklines_place():
    assert prefill_bar_text(0, 100) == "░" * SPARK_WIDTH
    assert prefill_bar_text(25, 100) == "█" * 4 + "░" * 12
    assert prefill_bar_text(100, 100) == prefill_bar_text(150, 100) == "█" * SPARK_WIDTH
    assert prefill_bar_text(0, 0) == "░" * SPARK_WIDTH
    assert len(prefill_bar_text(7, 9, width=10)) == 10


@pytest.mark.asyncio
async def test_a_streaming_reply_lays_out_nothing_of_the_gauge_and_stops_the_cursor_blink(fake_model,
                                                                                        monkeypatch):
    layouts = []   # widgets that asked for a layout of the screen from the gauge's updates
    in_gauge_update = [False]
    original_refresh = Widget.refresh

    def refresh(self, *args, **kw):
        if in_gauge_update[0] and kw.get("layout"):
            layouts.append(type(self).__name__)
        return original_refresh(self, *args, **kw)

    def recorded(method):
        def run(self, *args, **kw):
            in_gauge_update[0] = True
            try:
                return method(self, *args, **kw)
            finally:
                in_gauge_update[0] = False
        return run

    monkeypatch.setattr(Widget, "refresh", refresh)
    monkeypatch.setattr(Gauge, "on_prefill", recorded(Gauge.on_prefill))
    monkeypatch.setattr(Gauge, "on_tokens", recorded(Gauge.on_tokens))
    fake = FakeBackend(["one two three four five six seven eight nine ten eleven twelve"],
                       hold_after=6, token_delay=0.002)
    app = make_app(fake, model_path=fake_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        assert app.chat_input.cursor_blink
        await send(pilot, app, "count")
        await wait_until(pilot, lambda: fake.held.is_set() and app.gauge.turn.generated > 0,
                         what="reply streaming")
        gauge = app.query_one(Gauge)
        activity = gauge.query_one("#g-spark")
        assert activity.display and "░" not in str(activity.render())   # the sparkline, not the prefill bar
        assert not app.chat_input.cursor_blink                          # no blinking while it streams
        fake.resume.set()
        await wait_reply(pilot, app)
        assert app.chat_input.cursor_blink
    assert app.turns and app.turns[-1].generated >= 6
    assert layouts == []


class _BoxApp(App):
    def __init__(self, box):
        super().__init__()
        self.box = box

    def compose(self):
        yield self.box


def _body_blocks(box) -> list:
    return list(box.query_one(".body", Markdown).query(MarkdownBlock))


@pytest.mark.asyncio
async def test_a_streaming_reply_shows_pending_and_its_first_paragraph_takes_that_widget():
    box = MessageBox("assistant", streaming=True)
    async with _BoxApp(box).run_test(size=(80, 20)) as pilot:
        await pilot.pause()
        blocks = _body_blocks(box)
        assert len(blocks) == 1 and str(blocks[0].render()).strip() == PENDING
        await box.append("Hello there, ")
        await box.append("general.")
        await pilot.pause()
        after = _body_blocks(box)
        assert after == blocks                 # the same widget: nothing mounted for the first text
        assert str(after[0].render()).strip() == "Hello there, general."
        await box.append("\n\n## Next\n\nmore")
        await pilot.pause()
        assert [type(b) for b in _body_blocks(box)] == [MarkdownParagraph, MarkdownH2, MarkdownParagraph]
        await box.finish()
        await pilot.pause()
        assert box.content == "Hello there, general.\n\n## Next\n\nmore"
        assert PENDING not in "".join(str(b.render()) for b in _body_blocks(box))


@pytest.mark.asyncio
async def test_a_reply_that_begins_with_a_block_replaces_pending_and_an_empty_one_leaves_nothing():
    heading, empty = MessageBox("assistant", streaming=True), MessageBox("assistant", streaming=True)
    async with _BoxApp(heading).run_test(size=(80, 20)) as pilot:
        await pilot.pause()
        await heading.append("# Title\n\n```python\nx = 1\n")
        await pilot.pause()
        kinds = [type(b) for b in _body_blocks(heading)]
        assert kinds == [MarkdownH1, MarkdownFence], kinds   # formatted while it streams, no PENDING
    async with _BoxApp(empty).run_test(size=(80, 20)) as pilot:
        await pilot.pause()
        await empty.finish("cancelled")   # stopped before its first token
        await pilot.pause()
        assert _body_blocks(empty) == [] and empty.content == ""


def test_the_engine_hands_tokens_over_when_a_batch_is_due_and_batches_end_where_they_were_due():
    """stream_reply tells the backend how long tokens may gather: 0 until the first is up (TTFT),
    then until the next batch is due. A batch handed over late ends at the token made when it
    was due (by `made_at`), so the screen shows text as of then, not a batch behind."""
    import threading
    import time

    from chatapp.reply_stream import ReplyChunk, ReplyRequest, stream_reply
    from engine.generate import GenerationResponse
    from engine.sampling import SamplingSettings

    asked = []

    class Backend(FakeBackend):
        made = [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1]   # a token every 0.3 s (their clock)

        def reply(self, messages, settings, *, handover=None, **kwargs):
            t0 = time.monotonic()
            for i, t in enumerate(self.made):
                asked.append(handover())
                yield GenerationResponse(f"t{i} ", i, 1, 1.0, 0.1, i + 1, 10.0,
                                         "length" if i == len(self.made) - 1 else None, made_at=t0 + t)

        def last_turn(self):
            from engine.session import TurnStats

            return TurnStats()

        def session_stats(self):
            return {}

    pacer = BatchPacer()
    pacer.restart(shares_cores=True)   # 1 s apart
    posted = []
    req = ReplyRequest(gen_id=1, chat_id=None, messages=[], settings=SamplingSettings(), max_tokens=8,
                       thinking=None, cancel=threading.Event())
    stream_reply(Backend(), req, posted.append, pacer)
    assert asked[0] == 0.0                                     # nothing up yet: hand the first token over at once
    assert 0.9 < asked[1] <= MAX_BATCH_SECONDS                 # then: until the next batch is due (1 s)
    chunks = [m.text for m in posted if isinstance(m, ReplyChunk)]
    # the first token at once; then each batch ends at the first token made >= 1 s after the last end
    assert chunks == ["t0 ", "t1 t2 t3 t4 ", "t5 t6 t7 "]
    pacer.restart(shares_cores=False)   # a core to spare: 40 ms batches, every token here
    posted.clear()
    stream_reply(Backend(), req, posted.append, pacer)
    assert [m.text for m in posted if isinstance(m, ReplyChunk)] == [f"t{i} " for i in range(8)]
