"""The TUI on a remote backend: a real `deltatalk serve` subprocess (tiny model), driven through Pilot."""

from __future__ import annotations

import time

import pytest

from tests.chatapp.conftest import make_app, notes, ready, send, wait_reply, wait_until
from tests.chatapp.serve_process import ServeProcess

pytestmark = pytest.mark.asyncio
UNREACHABLE = "http://127.0.0.1:9/v1"     # the discard port: nothing listens on loopback


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.tiny_models import write_tiny_llama

    # wider than the default tiny model (~20 MB, written at test time): a few hundred tok/s, so a
    # long reply is still streaming when Esc is pressed
    model = write_tiny_llama(tmp_path_factory.mktemp("remote-tui") / "tiny-remote.gguf", n_ctx_train=4096,
                             d_model=512, n_head=8, n_head_kv=4, n_layer=8, n_ff=1024)
    with ServeProcess(model, "--ctx", "4096", "--threads", "1") as s:
        yield s


def _config(max_tokens: int, endpoints: list[dict], repeat_penalty: float = 1.0):
    from chatapp.config import Config

    config = Config.load()
    config.overrides["max_tokens"] = max_tokens
    # a random tiny model repeats one token under greedy decoding; a strong repetition penalty
    # makes it write varied (if meaningless, partly invalid UTF-8) text
    config.overrides["sampling"] = {"temperature": 0.0, "repeat_penalty": repeat_penalty}
    config.data["endpoints"] = endpoints
    return config


async def test_picker_lists_endpoints_and_switches_to_one(home, server):
    from tests.fakes import FakeBackend
    from chatapp.remote_backend import RemoteBackend
    from chatapp.screens import ModelPicker

    local = FakeBackend(["local reply"])
    config = _config(40, [{"url": server.url}, {"url": UNREACHABLE}], repeat_penalty=3.0)
    app = make_app(local, config=config)
    async with app.run_test(size=(130, 44)) as pilot:
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker), what="picker")
        picker = app.screen
        await wait_until(pilot, lambda: len(picker.remote_rows) == 2, timeout=15, what="endpoints probed")
        table = picker.query_one("#picker-remote")
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        reachable = [r for r in rows if r[1] == server.url]
        assert reachable and reachable[0][0] == "tiny-remote" and "reachable" in reachable[0][3]
        down = [r for r in rows if r[1] == UNREACHABLE]
        assert down and down[0][3].startswith("✗ cannot reach")
        table.focus()
        table.move_cursor(row=rows.index(reachable[0]))
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.backend, RemoteBackend) and app.backend.info is not None,
                         timeout=15, what="connected")
        assert app.backend.info.endpoint == server.url and app.backend.info.n_ctx == 4096
        assert app.config.endpoints[0]["model"] == "tiny-remote"   # remembered
        await send(pilot, app, "hello over there")
        await wait_reply(pilot, app, timeout=30)
        reply = app.store.messages(app.chat.id)[-1]
        assert reply.role == "assistant" and reply.content.strip() and local.calls == []
        assert reply.stats["generated"] == 40 and reply.stats["decode_tps"] > 0


async def test_remote_reply_streams_with_a_gauge_and_esc_stops_it(home, server):
    from tests.fakes import FakeBackend
    from chatapp.remote import RemoteChoice
    from chatapp.widgets import SpeedOverlay

    app = make_app(FakeBackend(), config=_config(40, []), endpoint=RemoteChoice(server.url))
    async with app.run_test(size=(130, 44)) as pilot:
        await ready(pilot, app)
        assert app.backend.info.arch == "remote"
        await send(pilot, app, "first question")
        await wait_reply(pilot, app, timeout=60)
        turn = app.turns[-1]
        assert turn.generated > 5 and turn.decode_tps > 0 and turn.ttft_s > 0
        assert turn.prompt_tokens > 0            # from the server's usage
        await pilot.press("f2")
        await wait_until(pilot, lambda: "remote" in str(app.query_one(SpeedOverlay).render()), what="overlay")
        await pilot.press("f2")
        # a long reply (3000 tokens asked): Esc stops it and the server's engine is free again
        app.config.overrides["max_tokens"] = 3000
        await send(pilot, app, "and a long answer, please")
        await wait_until(pilot, lambda: app.generating and app.gauge.turn.generated >= 5, timeout=30,
                         what="tokens streaming")
        assert app.gauge.turn.decode_tps > 0
        await pilot.press("escape")
        await wait_reply(pilot, app, timeout=10)
        assert app.turns[-1].finish == "cancelled" and app.turns[-1].generated < 3000
        assert app.store.messages(app.chat.id)[-1].status == "stopped"
        deadline = time.monotonic() + 10
        while server.health()["busy"] and time.monotonic() < deadline:
            await pilot.pause(0.1)
        assert not server.health()["busy"]
        assert server.health()["last"]["finish"] == "cancelled"
        # the follow-up reuses the server's cache for the history
        app.config.overrides["max_tokens"] = 20
        await send(pilot, app, "short again")
        await wait_reply(pilot, app, timeout=60)
        assert app.turns[-1].reused_tokens > 0


async def test_unreachable_endpoint_is_a_notice_not_a_crash(home):
    from tests.fakes import FakeBackend
    from chatapp.remote import RemoteChoice

    app = make_app(FakeBackend(), config=_config(8, []), endpoint=RemoteChoice(UNREACHABLE))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: any("cannot reach" in n for n in notes(app, "error")), timeout=15,
                         what="a notice")
        assert app.is_running and app.backend.info is None
