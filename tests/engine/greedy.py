"""Shared by the speculative-decoding tests: a greedy run with its logits and final cache, and
an exact comparison of two caches (the state after speculation must equal plain decoding's)."""

from __future__ import annotations

import numpy as np

from engine.generate import stream_generate
from engine.sampling import make_sampler


def greedy(model, tok, prompt, max_tokens, speculator=None, stop_ids=frozenset()):
    """(ids, logits (n, V), cache) of a greedy reply, plain or with `speculator`."""
    cache = model.make_cache()
    rs = list(stream_generate(model, tok, prompt, cache, make_sampler(0.0), max_tokens=max_tokens,
                              stop_ids=stop_ids, keep_logits=True, speculator=speculator))
    return [r.token for r in rs], np.stack([r.logits for r in rs]), cache


def assert_caches_equal(a, b):
    for x, y in zip(a, b):
        assert x.offset == y.offset
        if x.kind == "kv":
            assert np.array_equal(x.keys[: x.offset], y.keys[: y.offset])
            assert np.array_equal(x.values[: x.offset], y.values[: y.offset])
        else:
            assert np.array_equal(x.conv, y.conv) and np.array_equal(x.state, y.state)


def session_turns(session, first: str, edited: str, max_tokens: int, follow_up: str | None = None):
    """Greedy replies of a ChatSession to `first`, the same again (regenerate), `edited` in its
    place (edit) and, with follow_up, a next turn; with the session's tokens at the end."""
    from engine.sampling import SamplingSettings

    settings = SamplingSettings(temperature=0.0)
    msgs = [{"role": "user", "content": first}]
    out = [[r.token for r in session.reply(msgs, settings, max_tokens=max_tokens)],
           [r.token for r in session.reply(msgs, settings, max_tokens=max_tokens)]]      # regenerate
    msgs = [{"role": "user", "content": edited}]
    out.append([r.token for r in session.reply(msgs, settings, max_tokens=max_tokens)])  # edit
    if follow_up is not None:
        msgs = msgs + [{"role": "assistant", "content": session.messages[-1]["content"]},
                       {"role": "user", "content": follow_up}]
        out.append([r.token for r in session.reply(msgs, settings, max_tokens=max_tokens)])   # next turn
    return out + [list(session.tokens)]
