"""The transcript: one MessageBox per message in a scroll view that follows the newest text.

Your own messages are shown exactly as typed (plain text, line breaks kept, no Markdown).
Replies are Markdown, but every single line break the model wrote is kept (a Markdown
"hard break"): models write addresses, poems and lists without blank lines between them.

The view is anchored to its end (Textual's anchor): new text keeps it at the bottom until
the user scrolls up; scrolling back to the end follows again.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Collapsible, Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from chatapp.thinking import ThinkSplitter

STATUS_NOTES = {
    "stopped": "⏹ stopped",
    "length": "… cut at the token limit",
    "error": "⚠ failed",
    "interrupted": "⚠ interrupted (the app closed while this reply was streaming)",
}


def _soft_to_hard_breaks(state) -> None:
    for token in state.tokens:
        if token.type == "inline" and token.children:
            for child in token.children:
                if child.type == "softbreak":
                    child.type = "hardbreak"


def reply_parser() -> MarkdownIt:
    """Textual's default parser ("gfm-like"), with each single newline kept as a line break."""
    md = MarkdownIt("gfm-like")
    md.core.ruler.push("keep_line_breaks", _soft_to_hard_breaks)
    return md


PENDING = "…"   # a streaming reply's body until its answer begins


def warm_reply_parser() -> None:
    """Parse a sample once: the parser's link finder compiles its large regular expressions on
    first use (10-20 ms), which would otherwise land on the first reply's first batch of text,
    taken from the compute threads on a machine where they use every core."""
    reply_parser().parse("Warm **up**: see https://example.com or www.example.org.\n\n- item `code`\n")


def model_label(name: str | None) -> str:
    """A reply's model as shown above it: the file name without `.gguf`."""
    if not name:
        return ""
    return name[:-5] if name.lower().endswith(".gguf") else name


class MessageBox(Vertical):
    """One message. Assistant messages stream: thinking into a collapsible, the answer as Markdown."""

    DEFAULT_CSS = """
    MessageBox { height: auto; margin: 0 1 1 1; padding: 0 1; }
    MessageBox.user { border-left: thick $primary; background: $boost; }
    MessageBox.assistant { border-left: thick $accent; }
    MessageBox.system-note { border-left: thick $warning; color: $text-muted; }
    MessageBox .role { color: $text-muted; text-style: bold; }
    MessageBox .status { color: $warning; }
    MessageBox .status.error { color: $error; }
    MessageBox .notice { color: $warning; text-style: italic; }
    MessageBox Collapsible { background: transparent; border-top: none; padding-bottom: 0; }
    MessageBox Collapsible Markdown { color: $text-muted; }
    MessageBox Markdown { margin: 0; padding: 0; background: transparent; }
    MessageBox .plain { width: 1fr; }
    """

    def __init__(self, role: str, content: str = "", *, thinking: str = "", status: str = "done",
                 msg_id: int | None = None, streaming: bool = False, starts_thinking: bool = False,
                 dropped: int = 0, model: str | None = None):
        super().__init__(classes=role)
        self.dropped = dropped   # oldest messages the engine left out of this reply's context
        self.role = role
        self.msg_id = msg_id
        self.content = content
        self.thinking = thinking
        self.status = status
        self.streaming = streaming
        self.model = model       # the model that wrote this reply (None: not recorded)
        self._splitter = ThinkSplitter(starts_thinking) if streaming else None
        self._stream: MarkdownStream | None = None
        self._think_stream: MarkdownStream | None = None

    def role_text(self) -> str:
        label = {"user": "You", "assistant": "Assistant", "system-note": "Note"}.get(self.role, self.role)
        if self.role == "assistant" and self.model:
            label += f" · {model_label(self.model)}"
        return label

    def compose(self) -> ComposeResult:
        yield Label(self.role_text(), classes="role", markup=False)
        self._notice = Label(self.dropped_text(), classes="notice")
        self._notice.display = bool(self.dropped)
        yield self._notice
        if self.role != "assistant":
            # exactly as typed: no Markdown, no markup, line breaks kept
            yield Static(self.content, markup=False, classes="body plain")
            return
        self._think_md = Markdown(self.thinking or "", classes="thinking", parser_factory=reply_parser)
        self._think_box = Collapsible(self._think_md, title="Thinking", collapsed=not self.streaming)
        self._think_box.display = bool(self.thinking)
        yield self._think_box
        # a streaming reply shows PENDING until its answer begins; that paragraph widget then takes
        # the answer's first paragraph (see _write)
        self._md = Markdown(PENDING if self.streaming and not self.content else self.content, classes="body",
                            parser_factory=reply_parser)
        yield self._md
        self._status = Label(STATUS_NOTES.get(self.status, ""), classes="status")
        self._status.display = self.status in STATUS_NOTES
        if self.status == "error":
            self._status.add_class("error")
        yield self._status

    # streaming ------------------------------------------------------------------------
    async def append(self, text: str):
        if self._splitter is None:
            self._splitter = ThinkSplitter()
        think, answer = self._splitter.feed(text)
        await self._write(think, answer)

    async def _write(self, think: str, answer: str):
        if think:
            self.thinking += think
            if not self._think_box.display:
                self._think_box.display = True
            if self._think_stream is None:
                self._think_stream = Markdown.get_stream(self._think_md)
            await self._think_stream.write(think)
        if answer:
            if not self.content:
                answer = answer.lstrip()
                if not answer:
                    return
                if self._think_box.display and self.streaming:
                    self._think_box.collapsed = True   # the answer began: fold the thinking
                await self._clear_pending()
            self.content += answer
            if self._stream is None:
                self._stream = Markdown.get_stream(self._md)
            await self._stream.write(answer)

    async def _clear_pending(self):
        """The answer begins: empty the body's source but keep the PENDING paragraph widget, which
        the first text then updates in place (Markdown.append updates its last block). Mounting a
        new block costs the UI ~10 ms more, taken from the compute threads on a machine whose
        cores they all use. Private attributes of Textual's Markdown: where they differ, the body
        is cleared the public way."""
        md = self._md
        if getattr(md, "_markdown", None) == PENDING and isinstance(getattr(md, "_last_parsed_line", None), int):
            md._markdown = ""
            md._last_parsed_line = 0
        elif md.source:
            await md.update("")

    async def finish(self, status: str = "done"):
        """Flush, stop the streams, and render the whole text once (fixes partial fences)."""
        if self._splitter is not None:
            await self._write(*self._splitter.flush())
        for s in (self._stream, self._think_stream):
            if s is not None:
                try:
                    await s.stop()
                except Exception:  # noqa: BLE001
                    pass
        self._stream = self._think_stream = None
        self.streaming = False
        self.content = self.content.strip()
        await self._md.update(self.content)
        if self.thinking:
            self.thinking = self.thinking.strip()
            await self._think_md.update(self.thinking)
            self._think_box.collapsed = True
        self.set_status(status)

    def dropped_text(self) -> str:
        n = self.dropped
        if not n:
            return ""
        what = "the oldest message" if n == 1 else f"the {n} oldest messages"
        return f"context full: dropped {what}"

    def set_dropped(self, n: int):
        self.dropped = n
        self._notice.update(self.dropped_text())
        self._notice.display = bool(n)

    def set_status(self, status: str):
        self.status = status
        self._status.update(STATUS_NOTES.get(status, ""))
        self._status.display = status in STATUS_NOTES
        self._status.set_class(status == "error", "error")


class Transcript(VerticalScroll):
    """The messages. Scrolled from the prompt box by page keys; follows the end unless scrolled up."""

    def on_mount(self):
        self.anchor()

    def follow_end(self):
        """Back to the newest message, and keep following it as text arrives."""
        self.anchor()

    @property
    def following(self) -> bool:
        """True while new text keeps the view at its end (False once the user scrolled up)."""
        return self.is_anchored and not self._anchor_released

    async def add_note(self, text: str):
        """A line from the app (not stored, not sent to the model)."""
        await self.mount(MessageBox("system-note", text))

    async def add_notice(self, text: str):
        """A warning in the chat (the history's lock, the backend's notices)."""
        await self.mount(Static(f"⚠ {text}", classes="chat-notice", markup=False))

    async def remove_from(self, msg_id: int):
        """Remove the boxes of stored message `msg_id` and every later one."""
        for box in list(self.query(MessageBox)):
            if box.msg_id is not None and box.msg_id >= msg_id:
                await box.remove()

    def last_reply(self) -> str | None:
        boxes = [b for b in self.query(MessageBox) if b.role == "assistant" and b.content]
        return boxes[-1].content if boxes else None

    def page(self, where: str):
        """'up' | 'down' | 'home' | 'end' (keys pressed in the prompt box)."""
        if where == "up":
            self.scroll_page_up(animate=False)
        elif where == "down":
            self.scroll_page_down(animate=False)
        elif where == "home":
            self.scroll_home(animate=False)
        elif where == "end":
            self.follow_end()
