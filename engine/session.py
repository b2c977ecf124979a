"""ChatSession: a conversation's fed-token log and live cache.

The log is the source of truth: it always equals exactly the tokens in the cache. A new
turn renders the whole conversation with the model's template, finds the longest common
prefix with the log, trims the cache back to it and prefills only the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from engine.errors import ContextOverflowError
from engine.generate import GenerationResponse, stream_generate
from engine.loader import LoadedModel
from engine.sampling import SamplingSettings, from_settings


@dataclass
class TurnStats:
    prompt_tokens: int = 0      # tokens of the whole rendered prompt
    reused_tokens: int = 0      # of those, already in the cache
    prefilled_tokens: int = 0   # fed for this turn


def common_prefix_len(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.cache = self.model.make_cache()
        self.tokens: list[int] = []
        self.last_turn = TurnStats()

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def render(self, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
        text = self.loaded.template.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        return self.encode_prompt(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize rendered template text; BOS only if the template did not write it already."""
        tok = self.tokenizer
        bos_text = tok.decode([tok.bos_id]) if tok.bos_id is not None else None
        add_special = not (bos_text and text.startswith(bos_text))
        return tok.encode(text, add_special=add_special, parse_special=True)

    def _rewind(self, n: int):
        for c in self.cache:
            c.trim(c.offset - n)
        del self.tokens[n:]

    def generate(self, prompt: list[int], settings: SamplingSettings, max_tokens: int = 512,
                 cancel: threading.Event | None = None,
                 prefill_progress: Callable[[int, int], None] | None = None,
                 keep_logits: bool = False) -> Iterator[GenerationResponse]:
        """Make the cache hold `prompt` (reusing the common prefix), then stream a reply."""
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx}")
        reuse = min(common_prefix_len(self.tokens, prompt), len(prompt) - 1)  # re-feed >= 1 token
        self._rewind(reuse)
        suffix = prompt[reuse:]
        self.last_turn = TurnStats(len(prompt), reuse, len(suffix))
        max_tokens = max(1, min(max_tokens, self.n_ctx - len(prompt)))
        sampler, procs = from_settings(settings)
        fed_prompt = False
        for r in stream_generate(self.model, self.tokenizer, suffix, self.cache, sampler, procs, max_tokens,
                                 cancel=cancel, prefill_progress=prefill_progress, keep_logits=keep_logits,
                                 history=self.tokens):
            if not fed_prompt:
                self.tokens.extend(suffix)
                fed_prompt = True
            yield r
            if r.finish_reason is None:
                self.tokens.append(r.token)  # fed before the next step
        if not fed_prompt:  # cancelled during prefill: the cache holds part of it
            self._sync_after_cancel(suffix)

    def _sync_after_cancel(self, suffix: list[int]):
        fed = self.cache[0].offset - len(self.tokens)
        self.tokens.extend(suffix[:fed])
