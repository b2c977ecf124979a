"""The App's chat side (a base class of `chatapp.app.DeltatalkApp`): open, start, delete, rename
and export chats, and a chat's settings. The chat view shows the open chat and runs its replies;
here are the commands about which chat that is and what is stored for it.

`ChatList` renames and deletes in the history itself and tells this class with `ChatList.Renamed`
/ `ChatList.Deleted`; the chat view tells it about a chat it started with `ChatView.ChatStarted`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from chatapp.app_models import ModelsApp
from chatapp.chat_text import export_file_name, export_markdown
from chatapp.screens import ChatList, ChatSettings, Confirm, TextPrompt
from chatapp.screens.chat_settings import check_chat_sampling, form_values
from chatapp.store import Chat, delete_state


class ChatsApp(ModelsApp):
    @property
    def chat(self) -> Chat | None:
        return self.chat_view.chat

    @property
    def generating(self) -> bool:
        return self.chat_view.generating

    # -- chats ------------------------------------------------------------------------------
    async def _open_last_chat(self):
        if not self.store:
            return
        last = self.store.get_meta("last_chat")
        chat = self.store.get_chat(int(last)) if last and last.isdigit() else None
        if chat is not None:
            await self.open_chat(chat.id)

    async def open_chat(self, chat_id: int):
        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        chat = self.store.get_chat(chat_id) if self.store else None
        if chat is None or self.store is None:
            return
        self.store.set_meta("last_chat", str(chat.id))
        await self.chat_view.open(chat)
        self._update_title()

    async def action_new_chat(self):
        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        if self.store:
            self.store.set_meta("last_chat", "")
        await self.chat_view.open(None)
        self._update_title()
        self.chat_view.chat_input.focus()

    def save_to_history(self, what: str, apply: Callable[[], object], then: Callable[[], None] | None = None):
        """A rename, a deletion, new settings: saved now, or kept until another program frees the lock."""
        if self.history_writer is not None:
            self.history_writer.write(what, apply, then)

    def delete_chat(self, chat_id: int):
        if not self.store:
            return
        if self.chat and self.chat.id == chat_id and self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        store = self.store
        self.save_to_history("the deletion of the chat", lambda: store.delete_chat(chat_id),
                             lambda: self._chat_deleted(chat_id))

    def on_chat_list_deleted(self, m: ChatList.Deleted):
        self._chat_deleted(m.chat_id)

    def _chat_deleted(self, chat_id: int):
        """(Deleted from the history.) Its saved state goes; if it was open, a new chat is shown."""
        if self.chat and self.chat.id == chat_id:
            if self.store:
                self.store.set_meta("last_chat", "")
            self.chat_view.chat = None
            self._update_title()
            self.call_later(self.chat_view.open, None, keep_draft=False)
        delete_state(chat_id)

    def on_chat_list_renamed(self, m: ChatList.Renamed):
        self._chat_renamed(m.chat_id)

    def _chat_renamed(self, chat_id: int):
        if self.chat and self.chat.id == chat_id and self.store:
            self.chat_view.chat = self.store.get_chat(chat_id)
            self._update_title()

    def on_chat_view_chat_started(self):
        self._update_title()

    def _update_title(self):
        self.title = f"deltatalk — {self.chat.title}" if self.chat else "deltatalk"

    def action_chat_list(self):
        if not self.store:
            return

        async def chosen(result: tuple[str, int | None] | None):
            if not result:
                return
            what, cid = result
            if what == "open" and cid is not None:
                await self.open_chat(cid)
            elif what == "new":
                await self.action_new_chat()

        current = self.chat.id if self.chat else None
        self.push_screen(ChatList(self.store, current, busy_id=current if self.generating else None,
                                  writer=self.history_writer), chosen)

    def action_rename_chat(self):
        chat, store = self.chat, self.store
        if not chat or not store:
            self.notify("No chat to rename yet.", severity="warning")
            return

        def done(title: str | None):
            if title and title.strip():
                self.save_to_history("the new title", lambda: store.update_chat(chat.id, title=title.strip()),
                                     lambda: self._chat_renamed(chat.id))

        self.push_screen(TextPrompt("Rename chat", chat.title), done)

    def action_delete_current_chat(self):
        chat = self.chat
        if not chat:
            return

        def done(yes: bool | None):
            if yes:
                self.delete_chat(chat.id)

        self.push_screen(Confirm(f"Delete the chat “{chat.title}”?", "Delete"), done)

    def export_markdown(self) -> str:
        assert self.chat is not None and self.store is not None
        return export_markdown(self.chat, self.store.messages(self.chat.id))

    def action_export(self):
        if not self.chat or not self.store:
            self.notify("No chat to export yet.", severity="warning")
            return

        def chosen(path: str | None):
            if not path:
                return
            p = Path(path).expanduser()
            try:
                p.write_text(self.export_markdown(), encoding="utf-8")
            except OSError as e:
                self._error(e, "export")
                return
            self.notify(f"Exported to {p}", title="Export")

        default = Path.cwd() / export_file_name(self.chat.title)
        self.push_screen(TextPrompt("Export this chat to Markdown", str(default)), chosen)

    # -- a chat's settings -------------------------------------------------------------------
    def action_chat_settings(self):
        chat = self.chat
        values = form_values(self.config, chat)
        system = chat.system_prompt if chat else (self.config.get("system_prompt") or "")
        thinking = chat.thinking if chat else None
        supports = bool(self.backend.info and self.backend.info.supports_thinking)

        def saved(result: dict | None):
            if not result or not self.store:
                return
            try:
                check_chat_sampling(self.config, result["sampling"])
            except ValueError as e:
                self.notify(f"Not saved: {e}", severity="error", title="Chat settings")
                return
            fields = {"system_prompt": result["system_prompt"], "settings": result["sampling"]}
            if "thinking" in result:
                fields["thinking"] = result["thinking"]
            target = [self.chat.id] if self.chat else []   # the chat they were made for (or a new one)

            def apply():   # may run later, when another program frees the history's lock
                if not target:
                    target.append(self.chat_view.ensure_chat("New chat").id)
                if self.store:
                    self.store.update_chat(target[0], **fields)

            def applied():
                if self.store and self.chat and self.chat.id == target[0]:
                    self.chat_view.chat = self.store.get_chat(target[0])
                self.notify("Chat settings saved.", title="Chat settings")

            self.save_to_history("the chat settings", apply, applied)

        self.push_screen(ChatSettings(system, values, thinking, supports), saved)

    def action_toggle_thinking(self):
        info = self.backend.info
        if not info or not info.supports_thinking or not self.store:
            self.notify("This model has no thinking mode.", severity="warning")
            return
        chat = self.chat_view.ensure_chat("New chat")
        new = not (chat.thinking if chat.thinking is not None else True)
        self.store.update_chat(chat.id, thinking=new)
        self.chat_view.chat = self.store.get_chat(chat.id)
        self.notify(f"Thinking {'on' if new else 'off'} for this chat.")
