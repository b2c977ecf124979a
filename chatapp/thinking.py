"""Split a streamed reply into the model's thinking and its answer.

Reasoning models write `<think> … </think>` before the answer (some templates put the
opening tag in the prompt, so a reply may start inside the thinking). Tags can arrive
split across chunks, so a possible partial tag is held back until it is decided.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    def __init__(self, starts_thinking: bool = False):
        self.in_think = starts_thinking
        self.seen_text = starts_thinking   # once answer text has appeared, no new <think> opens
        self._hold = ""
        self.thinking = ""
        self.answer = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Add text; return (thinking delta, answer delta)."""
        buf = self._hold + text
        self._hold = ""
        think_out, ans_out = [], []
        while buf:
            tag = CLOSE if self.in_think else OPEN
            if not self.in_think and self.seen_text:
                ans_out.append(buf)
                buf = ""
                break
            i = buf.find(tag)
            if i >= 0:
                before, buf = buf[:i], buf[i + len(tag):]
                if self.in_think:
                    think_out.append(before)
                    self.in_think = False
                    buf = buf.lstrip("\n") if buf.strip() else buf
                else:
                    if before.strip():   # text before <think>: it's an answer, not thinking
                        ans_out.append(before + tag)
                        self.seen_text = True
                        continue
                    self.in_think = True
                    self.seen_text = True
                continue
            # keep a possible partial tag at the end
            keep = 0
            for k in range(min(len(tag) - 1, len(buf)), 0, -1):
                if tag.startswith(buf[-k:]):
                    keep = k
                    break
            body, self._hold = (buf[:-keep], buf[-keep:]) if keep else (buf, "")
            if self.in_think:
                think_out.append(body)
            else:
                if not self.seen_text and not body.strip():
                    # leading whitespace before a possible <think>: hold it
                    self._hold = body + self._hold
                    body = ""
                elif body:
                    self.seen_text = True
                ans_out.append(body)
            buf = ""
        t, a = "".join(think_out), "".join(ans_out)
        self.thinking += t
        self.answer += a
        return t, a

    def flush(self) -> tuple[str, str]:
        rest, self._hold = self._hold, ""
        if self.in_think:
            self.thinking += rest
            return rest, ""
        if self.answer or rest.strip():
            self.answer += rest
            return "", rest
        return "", ""


def split_thinking(text: str) -> tuple[str, str]:
    s = ThinkSplitter()
    s.feed(text)
    s.flush()
    return s.thinking.strip(), s.answer.lstrip()
