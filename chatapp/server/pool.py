"""Kept conversations: ChatSessions matched to a request by their token prefix.

A request carries the whole conversation. Each kept session holds a live cache for the
tokens it has fed; the session whose log shares the longest usable prefix with the
request's prompt answers it, so a follow-up turn prefills only what is new. "Usable":
attention layers can be trimmed to any position, recurrent (DeltaNet) layers only
restored to a checkpoint, so for a hybrid model the reusable part is the newest
checkpoint at or before the divergence (or the whole log, when the request extends it).

A request that extends a session's recorded conversation (history + the reply it gave +
a new message) goes through `ChatSession.reply`'s append mode: only the new turn is
tokenized and fed, which also keeps templates that rewrite history (Qwen3.5 drops earlier
<think> blocks) from invalidating the cache.

Several sessions are kept within a byte budget (KV high-water mark + recurrent state +
checkpoints); the least recently used is dropped first. A request from another conversation
(another first user message) that would rewind a session by more than it reuses gets a
fresh session instead while the budget allows, so two clients that share only a system
prompt do not keep destroying each other's cache; the same conversation (edited,
regenerated, its history rewritten by the client) rewinds its own session.

Everything here runs on the kernel thread (one request at a time): no locking.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields

from engine.loader import LoadedModel
from engine.session import ChatSession, _same_list, common_prefix_len
from engine.speculative import SpeculationStats, Speculator


@dataclass
class Kept:
    session: ChatSession
    kv_high: int = 0          # KV bytes at the deepest point reached (trimmed pages stay resident)
    last_used: float = 0.0

    @property
    def nbytes(self) -> int:
        st = self.session.stats()
        self.kv_high = max(self.kv_high, st["kv_bytes"])
        return self.kv_high + st["state_bytes"] + st["checkpoint_bytes"]


@dataclass
class Match:
    kept: Kept | None         # None: a new session
    prompt: list[int] | None  # the prompt tokens as the matched session will feed them (estimate); None: not rendered
    reusable: int             # tokens expected from the live cache


def extends(recorded: list[dict], messages: list[dict]) -> bool:
    """Is `messages` the recorded conversation (ending with a reply) plus new messages?"""
    return (bool(recorded) and recorded[-1]["role"] == "assistant" and len(messages) > len(recorded)
            and _same_list(messages[: len(recorded)], recorded))


def same_conversation(recorded: list[dict], messages: list[dict]) -> bool:
    """Do both start with the same first user message? (A client that edits, regenerates or
    rewrites its history keeps it; another client that shares only the system prompt does not.)"""
    def first(ms):
        return next(({"role": "user", "content": str(m.get("content", "")).strip()} for m in ms
                     if m.get("role") == "user"), None)
    a, b = first(recorded), first(messages)
    return a is not None and a == b


class SessionPool:
    def __init__(self, loaded: LoadedModel, budget_bytes: int, max_sessions: int = 64,
                 make_speculator: Callable[[], Speculator | None] | None = None):
        self.loaded = loaded
        self.make_speculator = make_speculator   # serve --speculate: one Speculator per kept session
        self.budget_bytes = budget_bytes
        self.max_sessions = max_sessions
        self.kept: OrderedDict[int, Kept] = OrderedDict()   # least recently used first
        self._next_id = 0
        self.dropped = 0    # sessions dropped for the budget (reported by /health)

    # -- matching ----------------------------------------------------------------------
    def _usable(self, s: ChatSession, prompt: list[int]) -> int:
        m = min(common_prefix_len(s.tokens, prompt), len(prompt) - 1)   # >= 1 token is fed again
        if m >= len(s.tokens) or s.trimmable:
            return max(m, 0)
        return max((c.pos for c in s.checkpoints if c.pos <= m), default=0)

    def match(self, messages: list[dict], enable_thinking: bool | None) -> Match:
        """The kept session to answer `messages` with, and its prompt; kept=None: a new session."""
        rendered: list[int] | None = None
        best: Match | None = None
        for kept in reversed(self.kept.values()):   # most recent first: ties go to it
            s = kept.session
            if extends(s.messages, messages) and s.turns:
                # pure in this case (no rewind): append mode, or the full render when it cannot append
                prompt, mode = s.plan(messages, enable_thinking)
                cand = Match(kept, prompt, len(s.tokens) if mode == "append" else self._usable(s, prompt))
            else:
                if rendered is None:
                    rendered = s.render(messages, enable_thinking)
                cand = Match(kept, rendered, self._usable(s, rendered))
            if best is None or cand.reusable > best.reusable:
                best = cand
        if best is None or best.reusable == 0 or best.kept is None:
            return Match(None, rendered, 0)
        s = best.kept.session
        lost = len(s.tokens) - best.reusable
        if lost > best.reusable and not same_conversation(s.messages, messages) and self._room_for_another():
            return Match(None, rendered, 0)
        return best

    def _room_for_another(self) -> bool:
        if len(self.kept) >= self.max_sessions:
            return False
        per = max((k.nbytes for k in self.kept.values()), default=0)
        return self.total_bytes() + per <= self.budget_bytes

    # -- keeping -----------------------------------------------------------------------
    def new_session(self) -> Kept:
        s = ChatSession(self.loaded, max_checkpoints=8, max_checkpoint_bytes=max(self.budget_bytes // 4, 1))
        if self.make_speculator is not None:
            s.speculator = self.make_speculator()
        kept = Kept(s, last_used=time.monotonic())
        self.kept[self._next_id] = kept
        self._next_id += 1
        return kept

    def touch(self, kept: Kept):
        kept.last_used = time.monotonic()
        for key, k in self.kept.items():
            if k is kept:
                self.kept.move_to_end(key)
                break

    def discard(self, kept: Kept):
        """Forget a session (one made for a request that was then refused)."""
        for key, k in list(self.kept.items()):
            if k is kept:
                del self.kept[key]

    def total_bytes(self) -> int:
        return sum(k.nbytes for k in self.kept.values())

    def evict(self, keep: Kept | None = None):
        """Drop least recently used sessions until the rest fit the budget (never `keep`)."""
        while len(self.kept) > 1 and self.total_bytes() > self.budget_bytes:
            key = next((k for k, v in self.kept.items() if v is not keep), None)
            if key is None:
                break
            del self.kept[key]   # its cache mapping is released with it
            self.dropped += 1
        while len(self.kept) > self.max_sessions:
            key = next(k for k, v in self.kept.items() if v is not keep)
            del self.kept[key]
            self.dropped += 1

    def stats(self) -> dict:
        out: dict[str, object] = {"sessions": len(self.kept), "cache_bytes": self.total_bytes(),
                                  "budget_bytes": self.budget_bytes, "dropped_sessions": self.dropped}
        specs = [k.session.speculator for k in self.kept.values() if k.session.speculator is not None]
        if specs:   # serve --speculate: totals over the kept sessions
            tot = SpeculationStats(*(sum(getattr(sp.stats, f.name) for sp in specs) for f in fields(SpeculationStats)))
            out["speculation"] = {"mode": specs[0].mode, **tot.to_dict(), "tokens": tot.tokens}
        return out

