"""The chat history's SQLite file: opening, checking, migrating, recovering; transactions.

`HistoryDB` is the base of `chatapp.store.ChatStore` (the queries). One file in the data
dir, WAL journal, every change in a transaction (`tx()`: BEGIN IMMEDIATE ... COMMIT).

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

import logging
import os
import sqlite3
import time
from collections.abc import Callable
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


class HistoryDB:
    """An open chat history: `db` (the connection), `notice`, `moved_to`, `in_memory`."""

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
