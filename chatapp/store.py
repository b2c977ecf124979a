"""Chats in SQLite: one file in the data dir, WAL journal, every change in a transaction.

A reply is written while it streams (status 'streaming', updated about once a second)
and closed as 'done', 'stopped' or 'error', so a chat survives the process being killed
at any moment: on reopening, a reply left 'streaming' is shown as interrupted.

Opening never leaves the user without a history (`ChatStore.notice` says what happened):
- the schema version (meta.schema_version) is checked and older versions migrated
  (MIGRATIONS); every table is checked for the columns this version reads, and a missing
  one is added with its default;
- a damaged file (not a database, truncated, failing `PRAGMA quick_check`) or a foreign one
  (our tables without their key columns) is moved aside, renamed with a timestamp
  (chats.damaged-YYYYmmdd-HHMMSS.sqlite3, its WAL beside it), and a fresh one is started;
- a history written by a newer deltatalk is left alone: a separate file for this version;
- a read-only file (or folder) is copied into memory: the chats are shown and chatting goes
  on, but nothing new is saved until the permissions are fixed. Chosen over a fresh file
  elsewhere: that would split the history in two places without the user noticing.
Another process holding the write lock longer than `busy_timeout` makes a write raise
`HistoryBusyError` (the app waits in a worker with `wait_writable` and keeps the typed text);
meta writes are hints (last chat, last model) and are skipped instead.

Used from the UI thread only (sqlite3 connections are per thread).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("deltatalk")

SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 1.0    # a write on the UI thread waits this long for another process's lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id            INTEGER PRIMARY KEY,
    title         TEXT NOT NULL DEFAULT 'New chat',
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    model         TEXT,
    system_prompt TEXT NOT NULL DEFAULT '',
    settings      TEXT NOT NULL DEFAULT '{}',
    thinking      INTEGER            -- NULL: the model's default
);
CREATE TABLE IF NOT EXISTS messages (
    id        INTEGER PRIMARY KEY,
    chat_id   INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role      TEXT NOT NULL,
    content   TEXT NOT NULL,
    thinking  TEXT NOT NULL DEFAULT '',
    status    TEXT NOT NULL DEFAULT 'done',   -- done | streaming | stopped | error
    stats     TEXT NOT NULL DEFAULT '{}',
    created   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_chat ON messages(chat_id, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# The columns this version reads, as ALTER TABLE ... ADD COLUMN can add them to an older table.
# The key columns (id, and messages.chat_id) cannot be added: a table without them is foreign.
_KEY_COLUMNS = {"chats": ("id",), "messages": ("id", "chat_id"), "meta": ("key",)}
_COLUMNS = {
    "chats": {"title": "TEXT NOT NULL DEFAULT 'New chat'", "created": "REAL NOT NULL DEFAULT 0",
              "updated": "REAL NOT NULL DEFAULT 0", "model": "TEXT", "system_prompt": "TEXT NOT NULL DEFAULT ''",
              "settings": "TEXT NOT NULL DEFAULT '{}'", "thinking": "INTEGER"},
    "messages": {"role": "TEXT NOT NULL DEFAULT 'user'", "content": "TEXT NOT NULL DEFAULT ''",
                 "thinking": "TEXT NOT NULL DEFAULT ''", "status": "TEXT NOT NULL DEFAULT 'done'",
                 "stats": "TEXT NOT NULL DEFAULT '{}'", "created": "REAL NOT NULL DEFAULT 0"},
    "meta": {"value": "TEXT NOT NULL DEFAULT ''"},
}


class HistoryBusyError(Exception):
    """Another process holds the history's write lock."""


class _Damaged(Exception):
    """The file is not a usable history (why in the message)."""


def _add_missing_columns(db: sqlite3.Connection):
    """Version 0 -> 1: histories from before the version was recorded lack later columns."""
    for table, columns in _COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns.items():
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


# MIGRATIONS[v] brings a version-v history to v + 1 (run in one transaction with the new version).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _add_missing_columns}


def _error_name(e: sqlite3.Error) -> str:
    return getattr(e, "sqlite_errorname", "") or ""


def _is_busy(e: sqlite3.Error) -> bool:
    name = _error_name(e)
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e)


def _is_read_only(e: sqlite3.Error) -> bool:
    name = _error_name(e)
    return name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")) \
        or "readonly" in str(e) or "unable to open" in str(e)


def _json_object(text) -> dict:
    """A settings/stats column; a damaged value reads as empty rather than breaking the chat."""
    try:
        v = json.loads(text or "{}")
    except (TypeError, ValueError, RecursionError):
        return {}
    return v if isinstance(v, dict) else {}


@dataclass
class Message:
    id: int
    chat_id: int
    role: str
    content: str
    thinking: str = ""
    status: str = "done"
    stats: dict = field(default_factory=dict)


@dataclass
class Chat:
    id: int
    title: str
    created: float
    updated: float
    model: str | None = None
    system_prompt: str = ""
    settings: dict = field(default_factory=dict)
    thinking: bool | None = None
    n_messages: int = 0




class _NewerSchema(Exception):
    pass


def wait_until_writable(path: Path, timeout: float, cancel=None) -> bool:
    """(Any thread.) Wait until no other process holds the history's write lock; False on timeout/cancel."""
    end = time.monotonic() + timeout
    try:
        con = sqlite3.connect(str(path), isolation_level=None, timeout=0.25)
    except sqlite3.Error:
        return False
    try:
        while True:
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("ROLLBACK")
                return True
            except sqlite3.Error as e:
                if not _is_busy(e):
                    return False
            if time.monotonic() > end or (cancel is not None and cancel.is_set()):
                return False
    finally:
        con.close()


class ChatStore:
    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT_SECONDS):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.notice: str | None = None       # what opening had to do, for the user (None: nothing)
        self.moved_to: Path | None = None    # where a damaged history was moved
        self.in_memory = False               # read-only history copied into memory: nothing is saved
        self.db = self._open()

    # -- opening --------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return self._open_in_memory(f"its folder cannot be created: {e.strerror or e}")
        try:
            return self._open_file(self.path)
        except _NewerSchema as e:
            newer = self.path
            self.path = self.path.with_name(f"{newer.stem}-schema{SCHEMA_VERSION}{newer.suffix}")
            note = (f"The chat history {newer} was written by a newer deltatalk (schema {e}); it is left "
                    f"untouched and this version keeps its chats in {self.path}.")
            db = self._open_recovering()
            self.notice = note + (" " + self.notice if self.notice else "")
            return db
        except (HistoryBusyError, _Damaged, sqlite3.Error):
            return self._open_recovering()

    def _open_recovering(self) -> sqlite3.Connection:
        """Open self.path; a damaged file is moved aside and a read-only one copied into memory."""
        try:
            return self._open_file(self.path)
        except HistoryBusyError:
            raise
        except _NewerSchema as e:
            return self._open_in_memory(f"{self.path} was written by a newer deltatalk (schema {e})")
        except _Damaged as e:
            return self._replace_damaged(str(e))
        except sqlite3.Error as e:
            if _is_busy(e):
                raise HistoryBusyError(f"the chat history {self.path} is locked by another program") from None
            if _is_read_only(e):
                return self._open_read_only_copy(str(e))
            return self._replace_damaged(str(e))

    def _connect(self, target: str, **kw) -> sqlite3.Connection:
        db = sqlite3.connect(target, isolation_level=None, timeout=self.busy_timeout, **kw)
        db.row_factory = sqlite3.Row
        return db

    def _open_file(self, path: Path) -> sqlite3.Connection:
        db = self._connect(str(path))
        try:
            self._prepare(db, wal=True)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db: sqlite3.Connection, wal: bool):
        """Check, migrate and configure an open history (raises _Damaged / _NewerSchema / sqlite3.Error)."""
        rows = db.execute("PRAGMA quick_check").fetchall()
        if [tuple(r) for r in rows] != [("ok",)]:
            raise _Damaged(f"integrity check failed: {str(rows[0][0])[:120]}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, keys in _KEY_COLUMNS.items():
            if table in tables:
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                missing = [k for k in keys if k not in have]
                if missing:
                    raise _Damaged(f"not a deltatalk history: table {table} has no {missing[0]} column")
        version = self._stored_version(db, tables)
        if version is not None and version > SCHEMA_VERSION:
            raise _NewerSchema(version)
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        if version == SCHEMA_VERSION and not self._missing_columns(db, tables):
            return
        with _Tx(db):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            v = SCHEMA_VERSION if version is None else version   # a new file starts current
            while v < SCHEMA_VERSION:
                MIGRATIONS[v](db)
                v += 1
            _add_missing_columns(db)   # a table that still lacks a column this version reads
            db.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),))
        if version is not None and version < SCHEMA_VERSION:
            log.info("chat history %s migrated from schema %s to %s", self.path, version, SCHEMA_VERSION)

    @staticmethod
    def _stored_version(db: sqlite3.Connection, tables: set[str]) -> int | None:
        """None for a new (empty) file; 0 for a history from before the version was recorded."""
        if not tables & set(_COLUMNS):
            return None
        if "meta" not in tables:
            return 0
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            return 0
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise _Damaged(f"schema_version {str(row[0])[:20]!r} is not a number") from None

    @staticmethod
    def _missing_columns(db: sqlite3.Connection, tables: set[str]) -> bool:
        for table, columns in _COLUMNS.items():
            if table not in tables:
                return True
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if any(c not in have for c in columns):
                return True
        return False

    def _replace_damaged(self, why: str) -> sqlite3.Connection:
        try:
            moved = self._move_aside()
        except OSError as e:
            return self._open_in_memory(f"it is damaged ({why}) and could not be moved aside: {e.strerror or e}")
        self.moved_to = moved
        log.warning("chat history %s damaged (%s): moved to %s", self.path, why, moved)
        try:
            db = self._open_file(self.path)
        except (_Damaged, _NewerSchema, sqlite3.Error) as e:
            return self._open_in_memory(f"a new history could not be started there: {e}")
        self.notice = (f"The chat history was damaged ({why}). It was moved to {moved} (kept, not deleted) "
                       "and a new history was started.")
        return db

    def _move_aside(self) -> Path:
        """Rename the history (and its WAL) to <name>.damaged-<timestamp>; the shared-memory index goes."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.stem}.damaged-{stamp}{self.path.suffix}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.stem}.damaged-{stamp}-{n}{self.path.suffix}")
            n += 1
        os.replace(self.path, target)
        wal = Path(str(self.path) + "-wal")
        if wal.exists():
            os.replace(wal, Path(str(target) + "-wal"))
        try:
            Path(str(self.path) + "-shm").unlink()
        except FileNotFoundError:
            pass
        return target

    def _open_read_only_copy(self, why: str) -> sqlite3.Connection:
        """The history cannot be written: copy what it holds into memory and go on from there."""
        db = self._connect(":memory:")
        for mode in ("ro", "ro&immutable=1"):
            try:
                src = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={mode}", uri=True,
                                      timeout=self.busy_timeout)
                try:
                    src.backup(db)
                finally:
                    src.close()
                break
            except sqlite3.Error:
                continue
        try:
            self._prepare(db, wal=False)
        except (_Damaged, _NewerSchema, sqlite3.Error):
            db.close()
            db = self._connect(":memory:")
            self._prepare(db, wal=False)
        self.in_memory = True
        self.notice = (f"The chat history {self.path} cannot be written ({why}). Your chats are shown, but "
                       "new messages are kept only until you quit: make the file and its folder writable "
                       "to save them.")
        return db

    def _open_in_memory(self, why: str) -> sqlite3.Connection:
        db = self._connect(":memory:")
        self._prepare(db, wal=False)
        self.in_memory = True
        self.notice = (f"The chat history {self.path} cannot be used ({why}). Chats are kept only until "
                       "you quit.")
        return db

    def wait_writable(self, timeout: float, cancel=None) -> bool:
        """(Any thread.) Wait until another process releases the write lock."""
        return True if self.in_memory else wait_until_writable(self.path, timeout, cancel)

    # -- plumbing -----------------------------------------------------------------------
    def tx(self):
        return _Tx(self.db)

    def close(self):
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> bool:
        """Meta values are hints (last chat, last model): a busy history skips the write (False)."""
        try:
            with self.tx():
                self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                                "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))
        except HistoryBusyError:
            log.info("chat history busy: %s not remembered", key)
            return False
        return True

    # -- chats --------------------------------------------------------------------------
    def _chat(self, row) -> Chat:
        thinking = row["thinking"]
        return Chat(id=row["id"], title=row["title"], created=row["created"], updated=row["updated"],
                    model=row["model"], system_prompt=row["system_prompt"],
                    settings=_json_object(row["settings"]),
                    thinking=None if thinking is None else bool(thinking),
                    n_messages=row["n"] if "n" in row.keys() else 0)  # noqa: SIM118 (sqlite3.Row: `in` tests values)

    def new_chat(self, title: str = "New chat", system_prompt: str = "", settings: dict | None = None,
                 model: str | None = None) -> Chat:
        now = time.time()
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO chats(title, created, updated, model, system_prompt, settings) VALUES(?,?,?,?,?,?)",
                (title, now, now, model, system_prompt, json.dumps(settings or {})))
        return self.get_chat(cur.lastrowid)

    def get_chat(self, chat_id: int) -> Chat | None:
        row = self.db.execute("SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id) AS n "
                              "FROM chats c WHERE c.id=?", (chat_id,)).fetchone()
        return self._chat(row) if row else None

    def list_chats(self) -> list[Chat]:
        rows = self.db.execute("SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id) AS n "
                               "FROM chats c ORDER BY c.updated DESC, c.id DESC").fetchall()
        return [self._chat(r) for r in rows]

    def update_chat(self, chat_id: int, **fields):
        allowed = {"title", "model", "system_prompt", "settings", "thinking"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown chat fields {sorted(bad)}")
        if "settings" in fields:
            fields["settings"] = json.dumps(fields["settings"] or {})
        if "thinking" in fields and fields["thinking"] is not None:
            fields["thinking"] = int(bool(fields["thinking"]))
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.tx():
            self.db.execute(f"UPDATE chats SET {sets}, updated=? WHERE id=?",
                            (*fields.values(), time.time(), chat_id))

    def delete_chat(self, chat_id: int):
        with self.tx():
            self.db.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
            self.db.execute("DELETE FROM chats WHERE id=?", (chat_id,))
            self.db.execute("DELETE FROM meta WHERE key=?", (self._draft_key(chat_id),))

    # -- messages -----------------------------------------------------------------------
    def _msg(self, row) -> Message:
        return Message(id=row["id"], chat_id=row["chat_id"], role=row["role"], content=row["content"],
                       thinking=row["thinking"], status=row["status"], stats=_json_object(row["stats"]))

    def messages(self, chat_id: int) -> list[Message]:
        rows = self.db.execute("SELECT * FROM messages WHERE chat_id=? ORDER BY id", (chat_id,)).fetchall()
        return [self._msg(r) for r in rows]

    def add_message(self, chat_id: int, role: str, content: str, status: str = "done",
                    thinking: str = "", stats: dict | None = None) -> Message:
        now = time.time()
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO messages(chat_id, role, content, thinking, status, stats, created) "
                "VALUES(?,?,?,?,?,?,?)", (chat_id, role, content, thinking, status, json.dumps(stats or {}), now))
            self.db.execute("UPDATE chats SET updated=? WHERE id=?", (now, chat_id))
        return Message(cur.lastrowid, chat_id, role, content, thinking, status, stats or {})

    def update_message(self, msg_id: int, *, content: str | None = None, thinking: str | None = None,
                       status: str | None = None, stats: dict | None = None):
        fields = {}
        if content is not None:
            fields["content"] = content
        if thinking is not None:
            fields["thinking"] = thinking
        if status is not None:
            fields["status"] = status
        if stats is not None:
            fields["stats"] = json.dumps(stats)
        if not fields:
            return
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.tx():
            self.db.execute(f"UPDATE messages SET {sets} WHERE id=?", (*fields.values(), msg_id))

    def delete_messages_from(self, chat_id: int, msg_id: int):
        """Delete a message and everything after it in its chat (regenerate / edit)."""
        with self.tx():
            self.db.execute("DELETE FROM messages WHERE chat_id=? AND id>=?", (chat_id, msg_id))

    # -- drafts, earlier prompts, search (no schema change: drafts live in `meta`, the rest is queried) --
    @staticmethod
    def _draft_key(chat_id: int | None) -> str:
        return f"draft:{chat_id}" if chat_id is not None else "draft:new"

    def get_draft(self, chat_id: int | None) -> str:
        """The unsent text of a chat's prompt box (chat_id None: the box of a chat not started yet)."""
        return self.get_meta(self._draft_key(chat_id), "") or ""

    def set_draft(self, chat_id: int | None, text: str):
        if text.strip():
            self.set_meta(self._draft_key(chat_id), text)
        else:
            with self.tx():
                self.db.execute("DELETE FROM meta WHERE key=?", (self._draft_key(chat_id),))

    def earlier_prompts(self, limit: int = 200) -> list[str]:
        """The user's messages over all chats, newest first, each text once (for Up in the prompt box)."""
        rows = self.db.execute("SELECT content FROM messages WHERE role='user' GROUP BY content "
                               "ORDER BY MAX(id) DESC LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows]

    def search_chats(self, query: str) -> list[Chat]:
        """Chats whose title, model or any message contains `query` (case-insensitive), newest first."""
        q = query.strip()
        if not q:
            return self.list_chats()
        like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id) AS n FROM chats c "
            "WHERE c.title LIKE ?1 ESCAPE '\\' OR IFNULL(c.model, '') LIKE ?1 ESCAPE '\\' OR EXISTS "
            "(SELECT 1 FROM messages m WHERE m.chat_id=c.id AND m.content LIKE ?1 ESCAPE '\\') "
            "ORDER BY c.updated DESC, c.id DESC", (like,)).fetchall()
        return [self._chat(r) for r in rows]

    def measured_prefill_speed(self, model: str, min_tokens: int = 64) -> float | None:
        """The newest prefill speed (tok/s) measured with `model` on a prompt of at least `min_tokens`
        prefilled tokens (short prefills run far below the machine's speed), or None."""
        rows = self.db.execute("SELECT stats FROM messages WHERE role='assistant' AND stats LIKE '%\"model\"%' "
                               "ORDER BY id DESC LIMIT 500").fetchall()
        for (raw,) in rows:
            try:
                st = json.loads(raw or "{}")
            except ValueError:
                continue
            if st.get("model") != model:
                continue
            prefilled = st.get("prompt_tokens", 0) - st.get("reused_tokens", 0)
            if prefilled >= min_tokens and st.get("prompt_tps", 0) > 0:
                return float(st["prompt_tps"])
        return None


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise HistoryBusyError("the chat history is locked by another program") from None
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self.db.execute("ROLLBACK")
                if _is_busy(e):
                    raise HistoryBusyError("the chat history is locked by another program") from None
                raise
        else:
            self.db.execute("ROLLBACK")
        return False


def state_path(chat_id: int) -> Path:
    """Where a chat's engine state (KV cache, recurrent state, checkpoints) is saved beside its history."""
    from chatapp.paths import data_dir

    return data_dir() / "states" / f"chat-{int(chat_id)}.npz"


def delete_state(chat_id: int):
    for p in (state_path(chat_id), state_path(chat_id).with_name(state_path(chat_id).name + ".tmp")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass
