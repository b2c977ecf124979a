"""Chats in SQLite: the queries (chats, messages, drafts, search) over `HistoryDB`.

A reply is written while it streams (status 'streaming', updated about once a second)
and closed as 'done', 'stopped' or 'error', so a chat survives the process being killed
at any moment: on reopening, a reply left 'streaming' is shown as interrupted.
Opening, checking, migrating and recovering the file is `chatapp.history_db`'s job.

Used from the UI thread only (sqlite3 connections are per thread).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatapp.history_db import SCHEMA_VERSION, HistoryBusyError, HistoryDB, wait_until_writable

__all__ = ["SCHEMA_VERSION", "Chat", "ChatStore", "HistoryBusyError", "Message", "delete_state", "state_path",
           "wait_until_writable"]

log = logging.getLogger("deltatalk")


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




class ChatStore(HistoryDB):
    """The chats, messages, drafts and hints of one history file."""

    # -- hints (meta) ---------------------------------------------------------------------
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
        chat = self.get_chat(int(cur.lastrowid or 0))
        assert chat is not None   # inserted in the transaction above
        return chat

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
        return Message(int(cur.lastrowid or 0), chat_id, role, content, thinking, status, stats or {})

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
