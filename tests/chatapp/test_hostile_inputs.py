"""Hostile files and damaged state, one class of input per test: discovery (headers, manifests,
special files, links), the chat history (damaged, foreign, older, newer, read-only, busy) and a
chat template over its limits in `deltatalk run`. Bounds are checked as a subprocess timeout
(time) and the peak RSS growth (memory), never as a speed assertion."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatapp.discovery import Candidate, candidates
from chatapp.model_headers import describe, describe_all
from chatapp.store import ChatStore, HistoryBusyError, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20


def gguf_header(kvs: bytes = b"", n_kv: int = 0, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs


def kv_array(key: str, elem_type: int, count: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, elem_type, count)


def write_huge_array_gguf(path: Path, key="tokenizer.ggml.scores") -> Path:
    """A GGUF declaring an array of 2^60 f32 entries (gguf.GGUFReader loops over it for minutes)."""
    path.write_bytes(gguf_header(kv_array(key, 6, 1 << 60), n_kv=1) + b"\0" * 64)
    return path


def write_slow_string_array_gguf(path: Path, n: int = 3_000_000) -> Path:
    """A header that is valid as far as it goes but costs the parser one step per string."""
    with open(path, "wb") as f:
        f.write(gguf_header(kv_array("tokenizer.ggml.tokens", 8, n), n_kv=1))
        f.write((struct.pack("<Q", 1) + b"a") * n)
    return path


# -- discovery: one file's header ---------------------------------------------------------------
def test_describe_says_why_in_plain_words(tmp_path, tiny_llama_path):
    files = {
        "zip.gguf": b"PK\x03\x04" + b"\0" * 100,
        "binary.gguf": b"H\xcfe\x00" + b"\xff" * 100,
        "empty.gguf": b"",
        "short.gguf": b"GGUF\x03\x00",
        "huge-array.gguf": None,
        "truncated.gguf": tiny_llama_path.read_bytes()[:100],
        "cut-data.gguf": tiny_llama_path.read_bytes()[:-1000],
    }
    for name, data in files.items():
        if data is None:
            write_huge_array_gguf(tmp_path / name)
        else:
            (tmp_path / name).write_bytes(data)
    rows = {name: describe(Candidate(tmp_path / name, "models", name)) for name in files}
    assert rows["zip.gguf"].reason == "not a GGUF file (starts with 50 4b 03 04)"
    assert rows["binary.gguf"].reason == "not a GGUF file (starts with 48 cf 65 00)"
    assert rows["empty.gguf"].reason == "empty file"
    assert rows["short.gguf"].reason == "truncated header (6 bytes, a GGUF header needs 24)"
    assert "array length 1152921504606846976 is implausible" in rows["huge-array.gguf"].reason
    assert rows["truncated.gguf"].reason.startswith("truncated file: ")
    assert rows["cut-data.gguf"].reason.startswith("truncated file: tensor ")
    for name, e in rows.items():
        assert not e.supported and not e.readable, name
        assert "b'" not in e.reason and "\\x" not in e.reason and "\n" not in e.reason, e.reason
    good = describe(Candidate(tiny_llama_path, "models", "tiny"))
    assert good.supported and good.readable and good.reason == ""


def test_describe_never_falls_back_to_an_unbounded_reader(tmp_path, monkeypatch):
    import gguf

    def refuse(*a, **k):
        raise AssertionError("gguf.GGUFReader must not be used on untrusted files")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    e = describe(Candidate(write_huge_array_gguf(tmp_path / "a.gguf"), "models", "a.gguf"))
    assert not e.supported and "implausible" in e.reason


_DESCRIBE_RUNNER = r"""
import json, sys
from pathlib import Path
def vm(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from chatapp.discovery import Candidate, candidates
from chatapp.model_headers import describe
before = vm('VmRSS')
what, arg = sys.argv[1], Path(sys.argv[2])
if what == "describe":
    out = describe(Candidate(arg, "models", arg.name)).reason
else:
    out = [c.name for c in candidates(arg / "models", [], home=arg, env={}, huggingface=False, lmstudio=False)]
print(json.dumps({"out": out, "grew": vm('VmHWM') - before}))
"""


def _bounded(what: str, arg: Path, timeout: float = 60) -> dict:
    proc = subprocess.run([sys.executable, "-c", _DESCRIBE_RUNNER, what, str(arg)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("key", ["tokenizer.ggml.scores", "qwen35.recurrent_layers"])
def test_array_of_2_pow_60_entries_costs_bounded_time_and_memory(tmp_path, key):
    doc = _bounded("describe", write_huge_array_gguf(tmp_path / "huge.gguf", key))
    assert "implausible" in doc["out"]
    assert doc["grew"] < 300 * MB, doc


def test_sparse_1gb_ollama_manifest_is_not_read_whole(tmp_path):
    man = tmp_path / ".ollama" / "models" / "manifests" / "registry.ollama.ai" / "library" / "big"
    man.mkdir(parents=True)
    with open(man / "latest", "wb") as f:
        f.write(b'{"layers": [')
        f.truncate(1 << 30)   # sparse: 1 GB that reads as zeros
    (tmp_path / "models").mkdir()
    doc = _bounded("candidates", tmp_path)
    assert doc["out"] == []
    assert doc["grew"] < 300 * MB, doc


def test_slow_header_is_abandoned_and_the_rest_still_described(tmp_path, tiny_llama_path):
    slow = write_slow_string_array_gguf(tmp_path / "slow.gguf")
    found = [Candidate(slow, "models", "slow.gguf"), Candidate(tiny_llama_path, "models", "tiny.gguf")]
    rows = list(describe_all(found, file_seconds=1.0))
    assert [r.name for r in rows] == ["slow.gguf", "tiny.gguf"]
    assert rows[0].reason == "unreadable: reading its header took over 1 s" and not rows[0].readable
    assert rows[1].supported


def test_describe_all_gives_unchecked_rows_past_the_deadline(tmp_path, tiny_llama_path):
    import time

    found = [Candidate(tiny_llama_path, "models", "tiny.gguf")]
    (row,) = describe_all(found, deadline=time.monotonic() - 1)
    assert not row.supported and row.reason == "not checked: the scan's time limit was reached"


def test_scan_skips_fifos_sockets_devices_and_broken_links(tmp_path, tiny_llama_path):
    md = tmp_path / "models"
    md.mkdir()
    (md / "good.gguf").write_bytes(tiny_llama_path.read_bytes())
    os.mkfifo(md / "fifo.gguf")
    (md / "dangling.gguf").symlink_to(md / "missing.gguf")
    (md / "loop.gguf").symlink_to(md / "loop.gguf")
    (md / "device.gguf").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(md / "sock.gguf"))
        found = candidates(md, [], home=tmp_path, env={}, huggingface=False, lmstudio=False, ollama=False)
    finally:
        sock.close()
    assert [c.name for c in found] == ["good.gguf"]


def test_ollama_digest_cannot_name_a_file_outside_blobs(tmp_path, tiny_llama_path):
    om = tmp_path / ".ollama" / "models"
    (om / "blobs").mkdir(parents=True)
    (tmp_path / "outside").write_bytes(tiny_llama_path.read_bytes())
    man = om / "manifests" / "r" / "library" / "evil"
    man.mkdir(parents=True)
    (man / "latest").write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "../../../outside"}]}))
    assert candidates(tmp_path / "none", [], home=tmp_path, env={}, huggingface=False, lmstudio=False) == []


def test_deltatalk_models_lists_broken_files_without_a_traceback(home, tiny_llama_path, capsys):
    from chatapp.cli import main
    from chatapp.paths import models_dir

    md = models_dir()
    md.mkdir(parents=True)
    (md / "tiny.gguf").write_bytes(tiny_llama_path.read_bytes())
    (md / "zip.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (md / "dangling.gguf").symlink_to(md / "missing.gguf")
    (md / "loop.gguf").symlink_to(md / "loop.gguf")
    os.mkfifo(md / "fifo.gguf")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny.gguf  [supported]" in out
    assert "zip.gguf  [not a GGUF file (starts with 50 4b 03 04)]" in out
    assert out.rstrip().endswith("1 GGUF file(s), 1 supported; 1 other file(s) are not readable GGUF files")
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((Path(r["path"]).name, r["readable"]) for r in rows) == [("tiny.gguf", True), ("zip.gguf", False)]


# -- a chat template over its limits in `deltatalk run` -------------------------------------------
def test_run_falls_back_to_chatml_with_one_line_on_stderr(tmp_path, capsys):
    from chatapp.cli import main
    from tests.tiny_models import write_tiny_llama

    model = write_tiny_llama(tmp_path / "hostile-template.gguf", chat_template="{{ 'x' * 10**9 }}")
    assert main(["run", "-m", str(model), "-p", "hello", "--temp", "0", "--max-tokens", "2", "--json",
                 "--ctx", "64"]) == 0
    out, err = capsys.readouterr()
    (r,) = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert r["prompt_token_ids"][0] == 1   # <|im_start|>: the built-in ChatML
    notices = [line for line in err.splitlines() if "limit" in line]
    assert notices == ["deltatalk: the chat template went over a limit: '*' would build 1,000,000,000 characters "
                       "(limit 8,388,608); using the built-in ChatML format instead"]


# -- the chat history -------------------------------------------------------------------------------
def make_history(path: Path) -> Path:
    s = ChatStore(path)
    chat = s.new_chat("kept chat")
    s.add_message(chat.id, "user", "hello")
    s.close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # everything in the main file
    con.close()
    return path


def make_old_history(path: Path) -> Path:
    """A history from before schema_version was recorded, lacking columns added since."""
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE chats (id INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT 'New chat',
                            created REAL NOT NULL, updated REAL NOT NULL, model TEXT);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, chat_id INTEGER NOT NULL, role TEXT NOT NULL,
                               content TEXT NOT NULL, created REAL NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO chats(title, created, updated) VALUES ('old chat', 1, 2);
        INSERT INTO messages(chat_id, role, content, created) VALUES (1, 'user', 'old question', 1);
        INSERT INTO messages(chat_id, role, content, created) VALUES (1, 'assistant', 'old answer', 2);
        INSERT INTO meta VALUES ('last_chat', '1');
    """)
    con.commit()
    con.close()
    return path


def test_old_schema_is_migrated_and_usable(tmp_path):
    path = make_old_history(tmp_path / "chats.sqlite3")
    s = ChatStore(path)
    assert s.notice is None and not s.in_memory
    assert s.get_meta("schema_version") == str(SCHEMA_VERSION)
    (chat,) = s.list_chats()
    assert (chat.title, chat.system_prompt, chat.settings, chat.thinking) == ("old chat", "", {}, None)
    assert [(m.role, m.content, m.status, m.thinking, m.stats) for m in s.messages(1)] == [
        ("user", "old question", "done", "", {}), ("assistant", "old answer", "done", "", {})]
    s.update_chat(1, thinking=True, settings={"temperature": 0.5})
    s.add_message(1, "assistant", "new", thinking="hm", stats={"decode_tps": 3.0})
    s.close()
    s = ChatStore(path)   # reopened: current, nothing to migrate
    assert s.get_chat(1).thinking is True and s.get_chat(1).settings == {"temperature": 0.5}
    assert s.messages(1)[-1].stats == {"decode_tps": 3.0}
    s.close()


def test_current_version_missing_a_column_is_repaired(tmp_path):
    path = make_history(tmp_path / "chats.sqlite3")
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE messages DROP COLUMN stats")
    con.commit()
    con.close()
    s = ChatStore(path)
    assert s.messages(1)[0].stats == {}
    s.add_message(1, "assistant", "x", stats={"a": 1})
    assert s.messages(1)[-1].stats == {"a": 1}


def _garbage(data: bytes) -> bytes:
    return os.urandom(len(data))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2 + 100]


def _page_corrupted(data: bytes) -> bytes:
    b = bytearray(data)
    b[4096 + 8: 4096 + 400] = b"\xa5" * 392   # inside the second page: the chats table's b-tree
    return bytes(b)


@pytest.mark.parametrize("damage", [_garbage, _truncated, _page_corrupted])
def test_damaged_history_is_moved_aside_and_a_fresh_one_opened(tmp_path, damage):
    path = make_history(tmp_path / "chats.sqlite3")
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    s = ChatStore(path)
    assert s.moved_to is not None and s.moved_to.parent == tmp_path
    assert s.moved_to.name.startswith("chats.damaged-") and s.moved_to.suffix == ".sqlite3"
    assert s.moved_to.read_bytes() == damaged              # kept as it was
    assert str(s.moved_to) in s.notice and "damaged" in s.notice
    assert s.list_chats() == []
    chat = s.new_chat("after")
    s.add_message(chat.id, "user", "still chatting")
    s.close()
    s = ChatStore(path)
    assert s.notice is None and [c.title for c in s.list_chats()] == ["after"]


def test_foreign_database_is_moved_aside(tmp_path):
    path = tmp_path / "chats.sqlite3"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE chats (name TEXT)")
    con.commit()
    con.close()
    s = ChatStore(path)
    assert "not a deltatalk history: table chats has no id column" in s.notice
    assert s.moved_to.exists() and s.new_chat("x").id == 1


def test_history_from_a_newer_version_is_left_alone(tmp_path):
    path = make_history(tmp_path / "chats.sqlite3")
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    before = path.read_bytes()
    s = ChatStore(path)
    assert s.path == tmp_path / f"chats-schema{SCHEMA_VERSION}.sqlite3"
    assert "newer deltatalk (schema 99)" in s.notice
    s.new_chat("here")
    s.close()
    assert path.read_bytes() == before


def test_read_only_history_is_copied_into_memory(tmp_path, monkeypatch):
    path = make_history(tmp_path / "chats.sqlite3")
    if os.geteuid() == 0:
        # root writes through file modes: make the write at open fail the way a read-only file does
        def read_only(self, p):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        monkeypatch.setattr(ChatStore, "_open_file", read_only)
    else:
        path.chmod(0o444)
        tmp_path.chmod(0o555)
    try:
        s = ChatStore(path)
        assert s.in_memory and "cannot be written" in s.notice and str(path) in s.notice
        assert [c.title for c in s.list_chats()] == ["kept chat"]   # the history is still there
        s.add_message(1, "user", "goes on")                         # and chatting goes on
        assert [m.content for m in s.messages(1)] == ["hello", "goes on"]
    finally:
        tmp_path.chmod(0o755)


def test_busy_history_raises_busy_then_waits_for_the_lock(tmp_path):
    path = make_history(tmp_path / "chats.sqlite3")
    s = ChatStore(path, busy_timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")   # another program holds the write lock
    try:
        assert s.set_meta("last_chat", "1") is False        # a hint: skipped, not an error
        with pytest.raises(HistoryBusyError):
            s.add_message(1, "user", "typed while locked")
        assert not s.wait_writable(0.3)
        threading.Timer(0.5, lambda: other.execute("ROLLBACK")).start()
        assert s.wait_writable(30)
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
    s.add_message(1, "user", "typed while locked")
    assert [m.content for m in s.messages(1)] == ["hello", "typed while locked"]
