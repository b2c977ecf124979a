"""The streaming generation loop shared by the CLI and the TUI.

`stream_generate` prefills a prompt in chunks, then decodes one token at a time and
yields one `GenerationResponse` per token, carrying its text and live speed figures.
It checks a cancel flag between prefill chunks and between tokens. `before_last`, when
given, is called once all but the last prompt token are in the cache, and the last token is
then fed on its own: ChatSession checkpoints a recurrent model's state there (regenerate
goes back to it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import PromptError
from engine import threads
from engine.sampling import LogitsProcessor, Sampler

# Prompt tokens per forward call. Each call's working buffers grow with it (~0.4 MB a token on
# a 4B model), and 128 is as fast as 512 (the GEMM works in 64-token tiles): a small chunk
# keeps the prefill's transient memory at ~50 MB instead of ~200 MB.
PREFILL_CHUNK = 128


@dataclass
class GenerationResponse:
    text: str                 # text completed by this token (may be "" while UTF-8 is partial)
    token: int
    prompt_tokens: int        # tokens prefilled for this reply
    prompt_tps: float
    ttft_s: float             # start of the call to the first sampled token
    generation_tokens: int    # tokens sampled so far
    decode_tps: float         # decode speed so far
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | None while running
    logits: np.ndarray | None = field(default=None, repr=False)   # when keep_logits
    speculation: dict | None = None   # with a speculator: drafted, accepted, acceptance, steps, tokens_per_step
    made_at: float = field(default_factory=time.monotonic, repr=False)   # when it was made (a consumer
    # that takes responses in batches times its own batches by this, not by when it got them)


def prefill(model: Any, cache: list, tokens: Sequence[int], chunk: int = PREFILL_CHUNK,
            progress: Callable[[int, int], None] | None = None,
            cancel: threading.Event | None = None,
            before_last: Callable[[], None] | None = None) -> np.ndarray | None:
    """Feed tokens in chunks; return the logits of the last position (None if cancelled).

    before_last: called after all but the last token are fed; the last is then fed alone."""
    toks = np.asarray(tokens, dtype=np.int64)
    n = len(toks)
    head = n - 1 if before_last is not None else n
    parts = [(s, min(s + chunk, head)) for s in range(0, head, chunk)] + ([(head, n)] if head < n else [])
    logits = None
    governor = threads.governor()
    for start, end in parts:
        if cancel is not None and cancel.is_set():
            return None
        governor.before_work()   # each chunk: the threads the machine leaves free now
        if end == n and before_last is not None:
            before_last()
        t0 = time.perf_counter()
        logits = model.forward(toks[start:end], cache, logits="last" if end == n else "none")
        governor.after_chunk(time.perf_counter() - t0)
        if progress is not None:
            progress(end, n)
    assert logits is not None
    return logits[-1]


def stream_generate(model: Any, tokenizer: Any, prompt_tokens: Sequence[int], cache: list, sampler: Sampler,
                    logits_processors: Sequence[LogitsProcessor] = (), max_tokens: int = 256,
                    cancel: threading.Event | None = None,
                    prefill_progress: Callable[[int, int], None] | None = None,
                    keep_logits: bool = False, history: Sequence[int] = (),
                    stop_ids: frozenset | None = None,
                    prefill_chunk: int = PREFILL_CHUNK,
                    speculator: Any = None,
                    before_last: Callable[[], None] | None = None) -> Iterator[GenerationResponse]:
    """Prefill `prompt_tokens` on top of `cache`, then sample up to `max_tokens` tokens.

    The last sampled token is not fed to the cache (its logits are never needed), so
    after the loop the cache holds the prompt plus every yielded token but the last.
    `history`: tokens already in the cache, for the repetition penalty.
    `speculator` (engine.speculative.Speculator): draft and verify several tokens per forward
    pass; the tokens (and the cache after the loop) are exactly those of plain decoding.
    A cancel is seen after the tokens of the current pass.
    `before_last`: called once all but the last prompt token are in the cache (see prefill).
    """
    if len(prompt_tokens) == 0:
        raise PromptError("the prompt is empty: nothing to answer")
    stop_ids = tokenizer.eog_ids if stop_ids is None else stop_ids
    governor = threads.governor()   # the thread count: fewer threads while the CPU is busy
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt_tokens, chunk=prefill_chunk, progress=prefill_progress, cancel=cancel,
                     before_last=before_last)
    t_prompt = time.perf_counter() - t0
    n_prompt = len(prompt_tokens)
    prompt_tps = n_prompt / t_prompt if t_prompt > 0 else float("inf")
    if logits is None:  # cancelled during prefill
        return
    seen = list(history) + list(prompt_tokens)
    decoder = tokenizer.stream_decoder()
    ttft = 0.0
    t_first = 0.0
    pending: list = []   # (token, logits) sampled by the speculator's last pass, not yet yielded
    for i in range(max_tokens):
        if pending:
            token, logits = pending.pop(0)
        else:
            row = logits
            for proc in logits_processors:
                row = proc(seen, row)
            token = sampler(row)
        now = time.perf_counter()
        if i == 0:
            ttft = now - t0
            t_first = now
        n_gen = i + 1
        decode_tps = (n_gen - 1) / (now - t_first) if n_gen > 1 and now > t_first else 0.0
        finish = None
        if token in stop_ids:
            finish = "stop"
        elif n_gen >= max_tokens:
            finish = "length"
        elif cancel is not None and cancel.is_set() and not pending:
            finish = "cancelled"
        text = decoder.feed(token) if token not in stop_ids else ""
        if finish is not None:
            text += decoder.flush()
        yield GenerationResponse(text, token, n_prompt, prompt_tps, ttft, n_gen, decode_tps, finish,
                                 logits if keep_logits else None,
                                 speculator.stats.to_dict() if speculator is not None else None)
        if finish is not None:
            return
        seen.append(token)
        if pending:
            continue   # already in the cache (the speculator's pass fed it)
        if speculator is None:
            t_step = time.perf_counter()
            logits = model.forward([token], cache, logits="last")[-1]
            governor.after_step(time.perf_counter() - t_step)
        else:
            t_step = time.perf_counter()
            pending = speculator.step(model, cache, token, seen[:-1], sampler, logits_processors,
                                      limit=max_tokens - n_gen, stop_ids=stop_ids)
            if speculator.last_fed == 1:   # a plain step: the governor's yardstick holds
                governor.after_step(time.perf_counter() - t_step)
