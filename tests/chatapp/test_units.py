"""Unit tests of the non-UI parts: store, thinking splitter, errors, config."""

from __future__ import annotations

import sqlite3

from chatapp.thinking import ThinkSplitter, split_thinking


def test_store_uses_wal_and_transactions(tmp_path):
    from chatapp.store import ChatStore

    s = ChatStore(tmp_path / "c.sqlite3")
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c = s.new_chat("t", system_prompt="sys", settings={"temperature": 0.1})
    m = s.add_message(c.id, "user", "hello")
    s.add_message(c.id, "assistant", "part", status="streaming")
    # a failing transaction leaves nothing behind
    try:
        with s.tx():
            s.db.execute("INSERT INTO messages(chat_id, role, content, created) VALUES(?,?,?,0)", (c.id, "user", "x"))
            raise RuntimeError
    except RuntimeError:
        pass
    assert [x.content for x in s.messages(c.id)] == ["hello", "part"]
    # another connection (another process) sees committed data
    other = sqlite3.connect(tmp_path / "c.sqlite3")
    assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2
    s.delete_messages_from(c.id, m.id + 1)
    assert [x.content for x in s.messages(c.id)] == ["hello"]
    got = s.get_chat(c.id)
    assert got.settings == {"temperature": 0.1} and got.system_prompt == "sys" and got.thinking is None
    s.update_chat(c.id, thinking=False, title="u")
    assert s.get_chat(c.id).thinking is False
    s.delete_chat(c.id)
    assert s.list_chats() == []


def test_think_splitter_handles_tags_split_across_chunks():
    s = ThinkSplitter()
    out = [s.feed(ch) for ch in "<think>abc</think>\n\nHello"]
    s.flush()
    assert s.thinking == "abc" and s.answer.strip() == "Hello"
    assert "".join(t for t, _ in out) == "abc"
    assert split_thinking("no thinking here") == ("", "no thinking here")
    assert split_thinking("answer <think>not thinking</think>") == ("", "answer <think>not thinking</think>")
    s2 = ThinkSplitter(starts_thinking=True)
    s2.feed("reasoning</think>answer")
    assert (s2.thinking, s2.answer) == ("reasoning", "answer")


def test_error_descriptions_are_one_line():
    from chatapp.errors import describe_error
    from engine.errors import ContextOverflowError, ModelFileError

    e = ModelFileError("/x/m.gguf", "architecture 'qwen9' is not supported", "architectures llama")
    assert describe_error(e) == "m.gguf: architecture 'qwen9' is not supported (supported: architectures llama)"
    assert "new chat" in describe_error(ContextOverflowError("the prompt has 9000 tokens"))
    assert "\n" not in describe_error(ValueError("a\nb"))


def test_config_overrides_are_not_saved(tmp_path):
    import json

    from chatapp.config import Config

    c = Config.load(tmp_path / "config.json")
    c.overrides["threads"] = 3
    assert c.get("threads") == 3
    c.set("theme", "nord")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["theme"] == "nord" and saved["threads"] is None


def test_deltatalk_chat_runs_the_tui_and_plain_the_line_chat(monkeypatch, tmp_path):
    from pathlib import Path

    import chatapp.app as appmod
    import chatapp.chat_cli as chat_cli
    import chatapp.cli as cli

    seen = []
    monkeypatch.setattr(appmod, "run_tui", lambda **kw: seen.append(("tui", kw)) or 0)
    monkeypatch.setattr(chat_cli, "cmd_chat_plain", lambda args: seen.append(("plain", args.model)) or 0)
    assert cli.main([]) == 0
    model = tmp_path / "m.gguf"  # -m must name an existing regular file
    model.write_bytes(b"GGUF")
    assert cli.main(["chat", "-m", str(model), "--threads", "2"]) == 0
    assert cli.main(["chat", "--plain"]) == 0
    assert seen[0] == ("tui", {"model": None, "threads": None, "ctx": None, "system": None, "sampling": {},
                               "max_tokens": None})
    assert seen[1][1]["model"] == Path(model) and seen[1][1]["threads"] == 2
    assert seen[2] == ("plain", None)


# -- the gauge's sparkline ----------------------------------------------------------------
def test_spark_text_scale_starts_at_zero_and_newest_is_right():
    from chatapp.widgets import SPARK_LEVELS, spark_text

    assert spark_text([], width=4) == "    "
    # a steady speed is full bars however many columns there are
    assert spark_text([42.0], width=4) == "   █"
    assert spark_text([42.0] * 10, width=4) == "████"
    # half the speed is half height, not the bottom of a min..max scale
    assert spark_text([40.0, 20.0], width=2) == "█" + SPARK_LEVELS[4]
    # only the newest `width` columns count
    assert spark_text([1.0] * 100 + [10.0] * 2, width=2) == "██"
    # a very slow moment stays visible (never a blank column inside the window)
    assert spark_text([100.0, 0.1], width=2) == "█" + SPARK_LEVELS[1]


def test_speed_columns_count_tokens_not_ui_batches():
    from chatapp.widgets import SPARK_TOKENS_PER_COLUMN as K, SPARK_WIDTH, TurnRecord

    def feed(batches, tps=30.0):
        t = TurnRecord()
        for n in batches:
            t.record_speed(n, tps)
        return t.speed_history()

    assert feed([20]) == feed([1] * 20) == feed([3, 7, 10]) == [30.0] * (-(-20 // K))
    # a column averages its tokens; the newest column may be partial
    t = TurnRecord()
    t.record_speed(K, 10.0)
    t.record_speed(K // 2, 20.0)
    t.record_speed(K // 2, 40.0)
    t.record_speed(1, 7.0)
    assert t.speed_history() == [10.0, 30.0, 7.0]
    # the window keeps the newest SPARK_WIDTH columns
    assert len(feed([K * SPARK_WIDTH * 3])) == SPARK_WIDTH


def test_sampling_flags_reach_the_tui_over_the_config_file(monkeypatch, home):
    """`deltatalk --temp 0.2 --max-tokens 9`: the app uses those, the config file's other values stay."""
    import json

    import chatapp.app as appmod
    from chatapp.config import config_path

    config_path().parent.mkdir(parents=True, exist_ok=True)
    config_path().write_text(json.dumps({"sampling": {"top_k": 7, "temperature": 1.5}, "max_tokens": 300}))
    configs = []

    class NoScreen:
        return_code = 0

        def __init__(self, **kw):
            configs.append(kw["config"])

        def run(self):
            pass

    monkeypatch.setattr(appmod, "DeltatalkApp", NoScreen)
    from chatapp.cli import main

    assert main(["--temp", "0.2", "--max-tokens", "9"]) == 0
    assert main([]) == 0
    flags, plain = configs
    assert flags.get("sampling")["temperature"] == 0.2 and flags.get("sampling")["top_k"] == 7
    assert flags.get("max_tokens") == 9
    assert plain.get("sampling")["temperature"] == 1.5 and plain.get("max_tokens") == 300
    assert "temperature" in json.loads(config_path().read_text())["sampling"]   # nothing saved by the flags
    assert json.loads(config_path().read_text())["sampling"]["temperature"] == 1.5
