"""A stored chat as text: the messages a reply is asked for, the Markdown export, code blocks."""

from __future__ import annotations

import re
import time

from chatapp.store import Chat, Message

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def conversation(chat: Chat, messages: list[Message]) -> list[dict]:
    """What the model is sent: the system prompt and the turns the engine's log holds."""
    msgs = []
    if chat.system_prompt.strip():
        msgs.append({"role": "system", "content": chat.system_prompt})
    for m in messages:
        if m.role not in ("user", "assistant"):
            continue
        # a reply that failed, or was stopped before its first token, never reached the engine's log;
        # a finished one stays even if it is blank, so the history matches the engine's cache
        if m.role == "assistant" and (m.status in ("error", "streaming")
                                      or (m.status == "stopped" and not m.content.strip())):
            continue
        msgs.append({"role": m.role, "content": m.content})
    return msgs


def last_user_message(messages: list[Message]) -> Message | None:
    """The message that regenerate answers again and edit puts back in the box."""
    return next((m for m in reversed(messages) if m.role == "user"), None)


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a reply, without their fences."""
    return [b.rstrip("\n") for b in CODE_BLOCK.findall(text)]


def export_markdown(chat: Chat, messages: list[Message]) -> str:
    lines = [f"# {chat.title}", ""]
    meta = [f"Model: {chat.model}"] if chat.model else []
    meta.append("Exported " + time.strftime("%Y-%m-%d %H:%M"))
    lines += ["_" + " · ".join(meta) + "_", ""]
    if chat.system_prompt.strip():
        lines += ["**System prompt:**", "", chat.system_prompt.strip(), ""]
    for m in messages:
        who = {"user": "You", "assistant": "Assistant"}.get(m.role, m.role)
        lines += [f"## {who}", ""]
        if m.thinking:
            lines += ["<details><summary>Thinking</summary>", "", m.thinking.strip(), "", "</details>", ""]
        lines += [m.content.strip(), ""]
        if m.status in ("stopped", "streaming"):
            lines += ["_(stopped)_", ""]
    return "\n".join(lines)


def export_file_name(title: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", title).strip("-")[:40] or "chat"
    return f"{slug}.md"
