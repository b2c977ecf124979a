"""The chat view: the open chat's transcript, the live gauge and the prompt box, and a reply's
whole life: send, start, stream, pace, stop, regenerate, edit, the figures.

Attributes down: the app sets `store` (once the history is open), `backend` (whenever the model
or endpoint changes), `model_loading`, and opens chats with `open()`. Messages up: `ChatStarted`
(a first message or the settings made a new chat), `FiguresChanged` (a reply ended, or another
chat's figures are shown: the speed overlay follows), `HistoryLocked` (another program holds the
history: the app waits for it and calls `retry`).

The reply itself runs in a thread worker (`chatapp.reply_stream.stream_reply`) that posts
`ReplyChunk` / `PrefillProgress` / `ReplyDone` / `ReplyFailed` to this widget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widget import Widget

from chatapp.backend import ChatBackend
from chatapp.chat_text import code_blocks, conversation, last_user_message
from chatapp.config import Config
from chatapp.errors import describe_error, log, log_exception
from chatapp.prompt_input import ChatInput, newline_hint, shift_enter_reported
from chatapp.reply_stream import (BatchPacer, PrefillProgress, ReplyChunk, ReplyDone, ReplyFailed, ReplyRequest,
                                  bind_session, stream_reply, ui_shares_cores)
from chatapp.screens import shorten
from chatapp.screens.chat_settings import sampling_for
from chatapp.store import Chat, ChatStore, HistoryBusyError, state_path
from chatapp.transcript import MessageBox, Transcript
from chatapp.widgets import Gauge, TurnRecord

FINISH_STATUS = {"stop": "done", None: "done", "length": "length", "cancelled": "stopped"}
SAVE_PARTIAL_SECONDS = 1.0    # a streaming reply is written to SQLite this often
DRAFT_SAVE_SECONDS = 0.5      # the prompt box's text is saved this long after the last change
TITLE_CHARS = 48


def notify_error(node: Widget | App, exc: BaseException, doing: str = "", title: str = "Error"):
    """An error the user must see: one line in a toast (the traceback goes to the log)."""
    log_exception(exc, doing)
    node.notify(describe_error(exc, doing), severity="error", title=title, timeout=8)


class SessionBound(Message):
    """The session now holds a chat (restored from its saved state, or reset)."""

    def __init__(self, chat_id: int | None, outcome: str, stats: dict):
        super().__init__()
        self.chat_id, self.outcome, self.stats = chat_id, outcome, stats


class ChatView(Vertical):
    DEFAULT_CSS = """
    ChatView { height: 1fr; }
    """

    class ChatStarted(Message):
        def __init__(self, chat: Chat):
            super().__init__()
            self.chat = chat

    class FiguresChanged(Message):
        pass

    class HistoryLocked(Message):
        """`text` for the user; `retry` (if any) runs on the UI thread once the history is free."""

        def __init__(self, text: str, retry: Callable | None = None):
            super().__init__()
            self.text, self.retry = text, retry

    def __init__(self, config: Config, backend: ChatBackend, **kw):
        super().__init__(**kw)
        self.config = config
        self.backend = backend
        self.store: ChatStore | None = None
        self.chat: Chat | None = None
        self.model_loading = False     # set by the app while a model loads (for what `send` says)
        self.turns: list[TurnRecord] = []   # the open chat's finished replies, for the speed overlay
        self.generating = False
        self.gen_id = 0
        self.reply_box: MessageBox | None = None
        self._reply_msg_id: int | None = None
        self._cancel = threading.Event()
        self._last_save = 0.0
        self.pacer = BatchPacer()
        self._draft_timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Transcript(id="messages")
        yield Gauge(id="gauge")
        yield ChatInput(id="input", placeholder=newline_hint(shift_enter_reported()), history=self._earlier_prompts)

    def on_unmount(self):
        self._cancel.set()   # the app is closing: a reply stops at its next token

    @property
    def transcript(self) -> Transcript:
        return self.query_one("#messages", Transcript)

    @property
    def gauge(self) -> Gauge:
        return self.query_one(Gauge)

    @property
    def chat_input(self) -> ChatInput:
        return self.query_one(ChatInput)

    # -- which chat is shown ------------------------------------------------------------------
    async def open(self, chat: Chat | None, *, keep_draft: bool = True):
        """Show `chat` (None: a new, empty one) and give it the engine session."""
        if keep_draft:
            self.save_draft()
        self.chat = chat
        view = self.transcript
        await view.remove_children()
        if chat is not None and self.store:
            boxes = []
            for msg in self.store.messages(chat.id):
                status = "interrupted" if msg.status == "streaming" else msg.status
                boxes.append(MessageBox(msg.role, msg.content, thinking=msg.thinking, status=status, msg_id=msg.id,
                                        dropped=int((msg.stats or {}).get("dropped_messages", 0) or 0),
                                        model=(msg.stats or {}).get("model")))
            if boxes:
                await view.mount_all(boxes)
            view.follow_end()   # at the latest message (and there once the Markdown has its height)
        self.reset_figures()
        self.restore_draft()
        self.bind_session()

    def ensure_chat(self, first_text: str) -> Chat:
        """The open chat; a new one (titled after `first_text`) if none is open. Needs the store."""
        if self.chat is not None:
            return self.chat
        assert self.store is not None
        title = shorten(" ".join(first_text.split()), TITLE_CHARS) or "New chat"
        self.chat = self.store.new_chat(title=title, system_prompt=self.config.get("system_prompt") or "",
                                        model=self.backend.info.name if self.backend.info else None)
        self.store.set_meta("last_chat", str(self.chat.id))
        self.store.set_draft(None, "")   # the new chat's box now saves under its own id
        self.post_message(self.ChatStarted(self.chat))
        return self.chat

    def bind_session(self):
        """Give the engine session to the open chat now (in a worker), so its first reply need not wait."""
        if self.backend.info is not None:
            self._bind_worker(self.backend, self.chat.id if self.chat else None)

    def binding(self) -> tuple[int, Path] | None:
        """The open chat and its saved state, for a model load (the new session starts as this chat's)."""
        if self.chat is None:
            return None
        return self.chat.id, state_path(self.chat.id)

    @work(thread=True, group="session", exit_on_error=False)
    def _bind_worker(self, backend: ChatBackend, chat_id: int | None):
        outcome = bind_session(backend, chat_id)
        if outcome is not None:
            self.post_message(SessionBound(chat_id, outcome, self.session_stats()))

    def on_session_bound(self, m: SessionBound):
        if m.outcome != "kept":
            log.info("chat %s: session %s", m.chat_id, m.outcome)
        if not self.generating:
            self.gauge.show_context(m.stats)

    def session_stats(self) -> dict:
        try:
            return self.backend.session_stats()
        except Exception:  # noqa: BLE001  (figures for the gauge, never fatal)
            return {}

    def reset_figures(self):
        """A chat's figures are its own: the gauge and the speed overlay start empty for another chat."""
        self.turns = []
        self.gauge.reset()
        self.gauge.show_context(self.session_stats())
        self.post_message(self.FiguresChanged())

    # -- drafts: the prompt box's unsent text, kept per chat (also across quitting) ------------------
    def _earlier_prompts(self) -> list[str]:
        return self.store.earlier_prompts() if self.store else []

    def restore_draft(self):
        inp = self.chat_input
        inp.text = self.store.get_draft(self.chat.id if self.chat else None) if self.store else ""
        inp.move_cursor(inp.document.end)
        inp.forget_history()

    def save_draft(self):
        if self._draft_timer is not None:
            self._draft_timer.stop()
            self._draft_timer = None
        if self.store:
            try:
                self.store.set_draft(self.chat.id if self.chat else None, self.chat_input.text)
            except Exception as e:  # noqa: BLE001  (a draft is a convenience, never fatal)
                log_exception(e, "saving the draft")

    @on(ChatInput.Changed, "#input")
    def _input_changed(self):
        if self._draft_timer is not None:
            self._draft_timer.stop()
        self._draft_timer = self.set_timer(DRAFT_SAVE_SECONDS, self.save_draft)

    # -- sending ---------------------------------------------------------------------------------
    @on(ChatInput.Submitted, "#input")
    async def _submitted(self, event: ChatInput.Submitted):
        if not event.text.strip():
            return
        # as typed: only blank lines around it go (a first line's indent is kept)
        text = event.text.rstrip().lstrip("\r\n")
        if await self.send(text):
            self.chat_input.clear()
            self.chat_input.forget_history()
            self.save_draft()

    async def send(self, text: str) -> bool:
        if self.generating:
            self.notify("A reply is streaming: Esc stops it.", severity="warning")
            return False
        info = self.backend.info
        if info is None:
            what = "still loading" if self.model_loading else "loaded"
            self.notify(f"No model {what} yet (Ctrl+O chooses one).", severity="warning")
            return False
        if not self.store:
            self.notify("The chat history is not available.", severity="error")
            return False
        try:
            chat = self.ensure_chat(text)
            msg = self.store.add_message(chat.id, "user", text)
        except HistoryBusyError:
            # the text stays in the input; it is sent once the other program lets go
            self.post_message(self.HistoryLocked(
                "The chat history is locked by another program; your message stays in the input and is sent "
                "as soon as the history is free.", lambda: self._resend(text)))
            return False
        if chat.model != info.name:
            try:
                self.store.update_chat(chat.id, model=info.name)
            except HistoryBusyError:
                pass   # a label of the chat; the next send sets it
        await self.transcript.mount(MessageBox("user", text, msg_id=msg.id))
        await self.start_reply()
        return True

    async def _resend(self, text: str):
        """The history is free again: send the kept message if it is still what the input holds."""
        if self.chat_input.text.strip() == text and not self.generating and await self.send(text):
            self.chat_input.clear()

    def thinking_enabled(self) -> bool | None:
        info = self.backend.info
        if not info or not info.supports_thinking:
            return None
        return True if self.chat is None or self.chat.thinking is None else self.chat.thinking

    # -- a reply: start, stream, end ---------------------------------------------------------------
    async def start_reply(self):
        assert self.chat is not None and self.store is not None
        try:
            settings, max_tokens = sampling_for(self.config, self.chat)
        except (ValueError, TypeError) as e:
            notify_error(self, e, "sampling settings")
            return
        messages = conversation(self.chat, self.store.messages(self.chat.id))
        try:
            row = self.store.add_message(self.chat.id, "assistant", "", status="streaming")
        except HistoryBusyError:
            self.post_message(self.HistoryLocked("The chat history is locked by another program: no reply started "
                                                 "(Ctrl+R regenerates once it is free)."))
            return
        info = self.backend.info
        box = MessageBox("assistant", streaming=True, msg_id=row.id, model=info.name if info else None)
        self.reply_box, self._reply_msg_id = box, row.id
        view = self.transcript
        await view.mount(box)
        view.follow_end()   # scrolling up stops following until the user is back at the end
        self.gen_id += 1
        self._cancel = threading.Event()
        self.generating = True
        # a blinking cursor is a screen update twice a second: UI time the compute threads lose
        self.chat_input.cursor_blink = False
        self._last_save = time.monotonic()
        self.pacer.restart(ui_shares_cores(self.backend.stats()))
        self.gauge.start(info.n_ctx if info else 0)
        self._run_reply(self.backend, ReplyRequest(self.gen_id, self.chat.id, messages, settings, max_tokens,
                                                   self.thinking_enabled(), self._cancel))

    @work(thread=True, group="generate", exit_on_error=False)
    def _run_reply(self, backend: ChatBackend, req: ReplyRequest):
        stream_reply(backend, req, self.post_message, self.pacer)

    def on_prefill_progress(self, m: PrefillProgress):
        if m.gen_id == self.gen_id and self.generating:
            self.gauge.on_prefill(m.done, m.total, m.tps)

    async def on_reply_chunk(self, m: ReplyChunk):
        box = self.reply_box
        if m.gen_id != self.gen_id or box is None:
            return
        self.pacer.ui_tick()
        dropped = m.figures.get("dropped_messages", 0)
        if dropped and not box.dropped:
            box.set_dropped(dropped)
            self.notify(box.dropped_text(), severity="warning", title="Context full", timeout=8)
        if m.text:
            await box.append(m.text)
        self.gauge.on_tokens(**m.figures)
        now = time.monotonic()
        if now - self._last_save >= SAVE_PARTIAL_SECONDS and self.store and self._reply_msg_id is not None:
            self._last_save = now
            try:
                self.store.update_message(self._reply_msg_id, content=box.content, thinking=box.thinking)
            except HistoryBusyError:
                pass   # a partial save; the final one waits for the lock

    async def on_reply_done(self, m: ReplyDone):
        if m.gen_id == self.gen_id:
            await self._end_reply(FINISH_STATUS.get(m.finish, "done"), m.finish)

    async def on_reply_failed(self, m: ReplyFailed):
        if m.gen_id == self.gen_id:
            await self._end_reply("error", "error")
            notify_error(self, m.error, "", title="Reply failed")

    async def _end_reply(self, status: str, finish: str | None):
        box, msg_id = self.reply_box, self._reply_msg_id
        self.generating = False
        self.chat_input.cursor_blink = True
        self.reply_box = None
        self.gauge.stop(finish)
        turn = self.gauge.turn
        if box is not None and msg_id is not None:
            await box.finish(status)
            if self.store:
                stats = turn.stored_stats(finish, box.model, box.dropped)
                self._save_reply(msg_id, dict(content=box.content, thinking=box.thinking, status=status, stats=stats))
        self.turns.append(turn)   # last: a reply counts as finished once it is stored
        self.post_message(self.FiguresChanged())

    def _save_reply(self, msg_id: int, fields: dict, waited: bool = False):
        assert self.store is not None
        try:
            self.store.update_message(msg_id, **fields)
        except HistoryBusyError:
            what = "still waiting to save the reply." if waited else "the reply is saved as soon as it is free."
            self.post_message(self.HistoryLocked(f"The chat history is locked by another program; {what}",
                                                 lambda: self._save_reply(msg_id, fields, waited=True)))

    def stop(self):
        if self.generating:
            self._cancel.set()

    # -- regenerate / edit ---------------------------------------------------------------------------
    async def regenerate(self):
        if self.generating:
            return
        if not self.chat or not self.store:
            self.notify("Nothing to regenerate: this chat has no message yet.", severity="warning")
            return
        if self.backend.info is None:
            self.notify("No model loaded (Ctrl+O).", severity="warning")
            return
        msgs = self.store.messages(self.chat.id)
        last_user = last_user_message(msgs)
        if last_user is None:
            self.notify("Nothing to regenerate.", severity="warning")
            return
        after = [m for m in msgs if m.id > last_user.id]
        if after:
            self.store.delete_messages_from(self.chat.id, after[0].id)
            await self.transcript.remove_from(after[0].id)
        await self.start_reply()

    async def edit_last(self):
        if self.generating or not self.chat or not self.store:
            return
        last_user = last_user_message(self.store.messages(self.chat.id))
        if last_user is None:
            self.notify("No message to edit.", severity="warning")
            return
        self.store.delete_messages_from(self.chat.id, last_user.id)
        await self.transcript.remove_from(last_user.id)
        inp = self.chat_input
        inp.text = last_user.content
        inp.focus()
        inp.move_cursor(inp.document.end)

    # -- copy ----------------------------------------------------------------------------------------
    def code_blocks(self) -> list[str]:
        return code_blocks(self.transcript.last_reply() or "")
