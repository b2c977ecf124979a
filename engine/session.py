"""ChatSession: one conversation's fed-token log, live cache, turns and checkpoints.

The log (`tokens`) is the source of truth: it always equals exactly what is in the cache.
`reply(messages)` works out how the new message list relates to what the session already
fed, and pays only for what is new:

- continuation (the recorded conversation + new user message): the new turn is rendered
  on its own and appended to the log ("append mode", below); nothing earlier is re-fed.
- regenerate (the recorded conversation minus its last reply): back to the checkpoint
  taken just before the last prompt token, and the same prompt tokens are reused.
- edit (the last user message replaced): back to the end of the previous turn, then
  append mode.
- anything else (another chat, a reloaded history): the whole conversation is rendered
  with the template and the longest common prefix with the log is kept.

Going back: attention (KV) layers are simply trimmed, since positions before a
checkpoint are never rewritten while it exists; recurrent (DeltaNet) layers cannot be
rewound, so they are restored from a checkpoint: a real copy of their state, taken
just before the last prompt token (regenerate) and at the end of every reply (edit).
Checkpoints past a restore point are dropped; they are bounded by count and bytes.

Append mode and templates that rewrite history: Qwen3.5's template drops the <think>
part of earlier replies when it renders the conversation again, so a full re-render
differs from the log inside the previous reply, and a recurrent model would have to
re-prefill it every turn. Instead the previous reply is replaced by a sentinel, the
conversation rendered with the new messages, and only the text after the sentinel (the
end of the previous turn, the new user turn, the generation prompt) is tokenized and
appended. The model therefore keeps seeing its own reasoning from earlier turns, exactly
as it generated it; the history it sees differs from a fresh render only by those blocks.

Stopping mid-reply: the partial reply stays the assistant message; its last sampled
token (not yet fed) is fed at the start of the next turn, so the cache matches the text.

Context full: a reply needs room. When the prompt plus a reserve for the reply
(min(max_tokens, n_ctx/4)) does not fit, the oldest turns are dropped (the system prompt
is kept), the rest rendered in full and prefilled again; `last_turn.dropped_messages` says
how many were dropped, so the UI can show it. If even the system prompt and the last
message do not fit, ContextOverflowError says so. Nothing is ever cut silently.

Saving: `save_state(path)` writes the log, the recorded conversation, the live cache and
the checkpoints beside a chat's history with the model file's fingerprint;
`load_state(path)` refuses a state made with another file (StateMismatchError).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.cache import CacheState, cache_bytes
from engine.errors import ContextOverflowError, PromptError, StateMismatchError
from engine.generate import PREFILL_CHUNK, GenerationResponse, stream_generate
from engine.loader import LoadedModel
from engine.sampling import SamplingSettings, from_settings

if TYPE_CHECKING:
    from engine.speculative import Speculator

SENTINEL = "\u27e6deltatalk:previous-reply\u27e7"


def reply_reserve(max_tokens: int, n_ctx: int) -> int:
    """Room kept free for the reply when the prompt is fitted into the context."""
    return max(1, min(max_tokens, n_ctx // 4))


def fit_messages(messages: list[dict], prompt_tokens: Callable[[list[dict]], int], n_ctx: int,
                 reserve: int) -> tuple[list[dict], int]:
    """The context-fitting policy, for a conversation that does not fit whole: drop the oldest turns
    (never a leading system prompt or the last message; the rest starts at a user message) until
    `prompt_tokens(kept) + reserve <= n_ctx`. Returns (kept messages, how many were dropped);
    raises ContextOverflowError when even the last message does not fit."""
    head = [m for m in messages[:1] if m.get("role") == "system"]
    body = messages[len(head):]
    for drop in range(1, len(body)):
        rest = body[drop:]
        if rest[0].get("role") != "user":
            continue  # start at a user message
        if prompt_tokens(head + rest) + reserve <= n_ctx:
            return head + rest, drop
    raise ContextOverflowError(
        f"the last message does not fit: {prompt_tokens(head + body[-1:])} prompt "
        f"tokens + {reserve} for the reply > context {n_ctx}; shorten it or raise --ctx")


@dataclass
class TurnStats:
    prompt_tokens: int = 0      # tokens of the whole prompt (the log up to the reply)
    reused_tokens: int = 0      # of those, already in the cache
    prefilled_tokens: int = 0   # fed for this turn
    restored_from: int | None = None  # checkpoint position restored, if any
    mode: str = "full"          # "append" | "regenerate" | "edit" | "full"
    dropped_messages: int = 0   # oldest messages left out because the context was full


@dataclass
class Checkpoint:
    pos: int                    # tokens in the cache when it was taken
    snaps: list[CacheState | None]   # per layer: a snapshot of layers that cannot be trimmed, else None
    nbytes: int
    label: str


@dataclass
class Turn:
    start: int                  # log length before this turn's new tokens
    prompt: list[int]           # the log up to the reply (what the reply was sampled after)
    reply_tokens: list[int] = field(default_factory=list)
    reply_text: str = ""
    finish: str | None = None

    @property
    def pending(self) -> list[int]:
        """The last sampled token, shown but not fed, unless it ended the turn."""
        if self.reply_tokens and self.finish in ("length", "cancelled"):
            return self.reply_tokens[-1:]
        return []


def common_prefix_len(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _same(a: dict, b: dict) -> bool:
    return a.get("role") == b.get("role") and str(a.get("content", "")).strip() == str(b.get("content", "")).strip()


def _same_list(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


class ChatSession:
    def __init__(self, loaded: LoadedModel, max_checkpoints: int = 16, max_checkpoint_bytes: int = 1 << 30):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.cache = self.model.make_cache()
        self.tokens: list[int] = []
        self.messages: list[dict] = []   # the conversation as fed, replies included
        self.turns: list[Turn] = []
        self.checkpoints: list[Checkpoint] = []
        self.max_checkpoints = max_checkpoints
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.last_turn = TurnStats()
        self.trimmable = all(c.trimmable for c in self.cache)
        # replies decoded speculatively (same tokens) when set
        self.speculator: Speculator | None = None

    # -- facts -------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def checkpoint_bytes(self) -> int:
        return sum(c.nbytes for c in self.checkpoints)

    def stats(self) -> dict:
        by_kind = cache_bytes(self.cache)
        return {"context_used": len(self.tokens), "n_ctx": self.n_ctx, "kv_bytes": by_kind.get("kv", 0),
                "state_bytes": by_kind.get("recurrent", 0), "checkpoint_bytes": self.checkpoint_bytes,
                "checkpoints": len(self.checkpoints)}

    # -- rendering ---------------------------------------------------------------------
    def render(self, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
        """The whole conversation through the model's template, tokenized."""
        text = self.loaded.template.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        return self.encode_prompt(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize rendered template text; BOS only if the template did not write it already."""
        tok = self.tokenizer
        bos_text = tok.decode([tok.bos_id]) if tok.bos_id is not None else None
        add_special = not (bos_text and text.startswith(bos_text))
        return tok.encode(text, add_special=add_special, parse_special=True)

    def _append_suffix(self, history: list[dict], new: list[dict], enable_thinking) -> list[int] | None:
        """Tokens that close the last reply in `history` and open a turn for `new`, or None."""
        msgs = history[:-1] + [{"role": "assistant", "content": SENTINEL}] + new
        text = self.loaded.template.render(msgs, add_generation_prompt=True, enable_thinking=enable_thinking)
        i = text.rfind(SENTINEL)
        if i < 0:
            return None
        return self.tokenizer.encode(text[i + len(SENTINEL):], add_special=False, parse_special=True)

    # -- checkpoints -------------------------------------------------------------------
    def _checkpoint(self, label: str):
        if self.trimmable:
            return  # trimming is free and exact: nothing to copy
        pos = len(self.tokens)
        self.checkpoints = [c for c in self.checkpoints if c.pos != pos]
        snaps = [None if c.trimmable else c.snapshot() for c in self.cache]
        nbytes = sum(s.nbytes for s in snaps if s is not None)
        self.checkpoints.append(Checkpoint(pos, snaps, nbytes, label))
        self.checkpoints.sort(key=lambda c: c.pos)
        while self.checkpoints and (len(self.checkpoints) > self.max_checkpoints
                                    or self.checkpoint_bytes > self.max_checkpoint_bytes):
            self.checkpoints.pop(0)  # the oldest first

    def _rewind(self, pos: int) -> int:
        """Make the cache hold the first `pos` log tokens, or fewer; return how many it holds."""
        if pos >= len(self.tokens):
            return len(self.tokens)
        if not self.trimmable:
            cp = max((c for c in self.checkpoints if c.pos <= pos), key=lambda c: c.pos, default=None)
            pos = cp.pos if cp is not None else 0
            for layer, snap in zip(self.cache, cp.snaps if cp else [None] * len(self.cache)):
                if layer.trimmable:
                    continue
                if snap is None:
                    layer.trim(layer.offset)  # back to empty
                else:
                    layer.restore(snap)
            self.checkpoints = [c for c in self.checkpoints if c.pos <= pos]
        for layer in self.cache:
            if layer.trimmable:
                layer.trim(layer.offset - pos)
        del self.tokens[pos:]
        self.turns = [t for t in self.turns if len(t.prompt) <= pos]
        return pos

    def reset(self):
        """Forget the conversation (a new chat)."""
        self._rewind(0)
        self.checkpoints.clear()
        self.messages = []
        self.turns = []

    # -- a turn ------------------------------------------------------------------------
    def plan(self, messages: list[dict], enable_thinking: bool | None = None) -> tuple[list[int], str]:
        """The prompt tokens for `messages` and how they relate to the log (may rewind)."""
        rec = self.messages
        last = self.turns[-1] if self.turns else None
        if last is not None and rec and rec[-1]["role"] == "assistant":
            if _same_list(messages, rec[:-1]):
                return list(last.prompt), "regenerate"
            if (len(messages) == len(rec) - 1 and messages[-1].get("role") == "user"
                    and _same_list(messages[:-1], rec[:-2])):
                # edit the last user message: back to where that turn started (drops the turn)
                self._rewind(last.start)
                self.messages = rec[:-2]
                if self.turns and self.messages and self.messages[-1]["role"] == "assistant":
                    prompt = self._continuation(messages, enable_thinking)
                    if prompt is not None:
                        return prompt, "edit"
                return self.render(messages, enable_thinking), "edit"
            if len(messages) > len(rec) and _same_list(messages[: len(rec)], rec):
                prompt = self._continuation(messages, enable_thinking)
                if prompt is not None:
                    return prompt, "append"
        return self.render(messages, enable_thinking), "full"

    def _fit(self, messages: list[dict], enable_thinking, reserve: int) -> tuple[list[dict], int]:
        return fit_messages(messages, lambda ms: len(self.render(ms, enable_thinking)), self.n_ctx, reserve)

    def _continuation(self, messages, enable_thinking) -> list[int] | None:
        rec, last = self.messages, self.turns[-1]
        if len(self.tokens) != len(last.prompt) + len(last.reply_tokens) - (1 if last.reply_tokens else 0):
            return None  # the log no longer ends at that reply
        suffix = self._append_suffix(rec, messages[len(rec):], enable_thinking)
        if suffix is None:
            return None
        return self.tokens + last.pending + suffix

    def reply(self, messages: list[dict], settings: SamplingSettings, max_tokens: int = 512,
              cancel: threading.Event | None = None, prefill_progress: Callable[[int, int], None] | None = None,
              enable_thinking: bool | None = None, keep_logits: bool = False,
              prefill_chunk: int = PREFILL_CHUNK) -> Iterator[GenerationResponse]:
        """Answer the last message of `messages`, reusing everything already fed."""
        prompt, mode = self.plan(messages, enable_thinking)
        dropped = 0
        reserve = reply_reserve(max_tokens, self.n_ctx)
        if len(prompt) + reserve > self.n_ctx:
            messages, dropped = self._fit(messages, enable_thinking, reserve)
            prompt, mode = self.render(messages, enable_thinking), "full"
        text = []
        turn = None
        for r in self.generate(prompt, settings, max_tokens, cancel, prefill_progress, keep_logits,
                               prefill_chunk, mode=mode):
            if turn is None:
                turn = self.turns[-1]
                self.last_turn.dropped_messages = dropped
            text.append(r.text)
            yield r
        if turn is not None:
            turn.reply_text = "".join(text)
            self.messages = [dict(m) for m in messages] + [{"role": "assistant", "content": turn.reply_text}]

    def generate(self, prompt: list[int], settings: SamplingSettings, max_tokens: int = 512,
                 cancel: threading.Event | None = None,
                 prefill_progress: Callable[[int, int], None] | None = None,
                 keep_logits: bool = False, prefill_chunk: int = PREFILL_CHUNK,
                 mode: str = "tokens") -> Iterator[GenerationResponse]:
        """Make the cache hold `prompt` (reusing the common prefix), then stream a reply."""
        if len(prompt) == 0:
            raise PromptError("the prompt is empty (the chat template rendered no tokens): nothing to answer")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx}")
        # where this turn's new messages begin in the log (a regenerated turn keeps its own)
        turn_start = self.turns[-1].start if mode == "regenerate" and self.turns else len(self.tokens)
        start = min(len(self.tokens), common_prefix_len(self.tokens, prompt))
        # re-feed >= 1 token so the next logits are fresh; >= 2 where the cache can be trimmed: the
        # last prompt token then goes through the prefill kernels as in an uncached run (alone it
        # would take the decode path, whose rounding differs), so a cached reply equals an uncached one
        want = min(start, len(prompt) - (2 if self.trimmable and len(prompt) >= 2 else 1))
        n_before = len(self.tokens)
        reuse = self._rewind(want)
        restored = reuse if reuse < n_before and not self.trimmable else None
        suffix = prompt[reuse:]
        self.last_turn = TurnStats(len(prompt), reuse, len(suffix), restored, mode)
        max_tokens = max(1, min(max_tokens, self.n_ctx - len(prompt)))
        sampler, procs = from_settings(settings)
        turn = Turn(start=min(turn_start, reuse), prompt=list(prompt))
        self.turns.append(turn)
        history = list(self.tokens)

        def before_last() -> None:
            # all but the last prompt token are in: checkpoint (regenerate restores here); the
            # last token is then fed alone
            self.tokens.extend(suffix[:-1])
            if len(suffix) > 1 or not any(c.pos == len(self.tokens) for c in self.checkpoints):
                self._checkpoint("prompt")

        for r in stream_generate(self.model, self.tokenizer, suffix, self.cache, sampler, procs, max_tokens,
                                 cancel=cancel, keep_logits=keep_logits, history=history,
                                 prefill_chunk=prefill_chunk, speculator=self.speculator,
                                 prefill_progress=prefill_progress,
                                 before_last=None if self.trimmable else before_last):
            if not turn.reply_tokens:
                self.tokens[reuse:] = suffix   # (before_last may have put in all but the last)
            turn.reply_tokens.append(r.token)
            turn.finish = r.finish_reason
            yield r
            if r.finish_reason is None:
                self.tokens.append(r.token)  # fed before the next step
        if not turn.reply_tokens:  # cancelled during prefill: the cache holds part of the prompt
            self._sync_after_cancel(suffix)
            self.turns.pop()
            return
        self._checkpoint("reply")

    def _sync_after_cancel(self, suffix: list[int]):
        fed = self.cache[0].offset - len(self.tokens)
        self.tokens.extend(suffix[:fed])

    # -- saving ------------------------------------------------------------------------
    def save_state(self, path: str | Path) -> int:
        """Write the log, conversation, cache and checkpoints to `path` (.npz); return bytes."""
        path = Path(path)
        arrays: dict[str, Any] = {"tokens": np.asarray(self.tokens, dtype=np.int32)}
        for i, c in enumerate(self.cache):
            for name, a in c.snapshot().arrays.items():
                arrays[f"l{i}.{name}"] = a
        for j, cp in enumerate(self.checkpoints):
            for i, snap in enumerate(cp.snaps):
                if snap is not None:
                    for name, a in snap.arrays.items():
                        arrays[f"cp{j}.l{i}.{name}"] = a
        meta = {
            "version": 1,
            "fingerprint": self.loaded.fingerprint(),
            "n_ctx": self.n_ctx,
            "kinds": [c.kind for c in self.cache],
            "offsets": [c.offset for c in self.cache],
            "messages": self.messages,
            "turns": [{"start": t.start, "prompt": len(t.prompt), "reply_tokens": t.reply_tokens,
                       "reply_text": t.reply_text, "finish": t.finish} for t in self.turns],
            "checkpoints": [{"pos": c.pos, "label": c.label, "nbytes": c.nbytes} for c in self.checkpoints],
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)  # never a half-written state
        return path.stat().st_size

    def load_state(self, path: str | Path) -> None:
        """Restore a state written by save_state for this same model file."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except (OSError, ValueError, KeyError) as e:
            raise StateMismatchError(f"{path}: not a readable chat state ({e})") from None
        if meta.get("fingerprint") != self.loaded.fingerprint():
            raise StateMismatchError(f"{path}: saved with another model file; it will be prefilled again")
        if meta.get("kinds") != [c.kind for c in self.cache] or max(meta["offsets"], default=0) > self.n_ctx:
            raise StateMismatchError(f"{path}: does not fit this model's cache (context {self.n_ctx})")
        self.reset()
        tokens = arrays["tokens"].astype(np.int64).tolist()
        def layer_state(c: Any, prefix: str, offset: int) -> CacheState:
            st = CacheState(int(offset), {name: arrays[prefix + name] for name in c.STATE_NAMES})
            c.check(st)   # ValueError before anything is written
            return st

        try:
            for i, (c, off) in enumerate(zip(self.cache, meta["offsets"])):
                c.restore(layer_state(c, f"l{i}.", off))
            if any(off != len(tokens) for off in meta["offsets"]):
                raise ValueError("layers disagree with the token log")
            self.checkpoints = []
            for j, cp in enumerate(meta["checkpoints"]):
                snaps = [None if c.trimmable else layer_state(c, f"cp{j}.l{i}.", cp["pos"])
                         for i, c in enumerate(self.cache)]
                self.checkpoints.append(Checkpoint(cp["pos"], snaps, cp["nbytes"], cp["label"]))
        except (KeyError, ValueError) as e:
            self.reset()
            raise StateMismatchError(f"{path}: damaged chat state ({e})") from None
        self.tokens = tokens
        self.messages = meta["messages"]
        self.turns = [Turn(t["start"], tokens[: t["prompt"]], t["reply_tokens"], t["reply_text"], t["finish"])
                      for t in meta["turns"]]
