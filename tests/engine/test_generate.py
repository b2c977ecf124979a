"""The streaming generation loop and the session's token log, on a tiny model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engine.errors import ContextOverflowError
from engine.generate import stream_generate
from engine.loader import load_model
from engine.sampling import SamplingSettings, make_sampler
from engine.session import ChatSession

GREEDY = SamplingSettings(temperature=0.0)


@pytest.fixture
def loaded(tiny_llama_path):
    return load_model(tiny_llama_path, n_ctx=128)


def test_one_response_per_token_until_max_tokens(loaded):
    m, tok = loaded.model, loaded.tokenizer
    cache = m.make_cache()
    out = list(stream_generate(m, tok, [1, 50, 60], cache, make_sampler(0), max_tokens=6, stop_ids=frozenset()))
    assert len(out) == 6
    assert [r.finish_reason for r in out] == [None] * 5 + ["length"]
    assert [r.generation_tokens for r in out] == list(range(1, 7))
    assert out[-1].prompt_tokens == 3 and out[-1].ttft_s > 0
    assert cache[0].offset == 3 + 5  # the last sampled token is never fed


def test_greedy_generation_is_the_argmax_chain(loaded):
    m, tok = loaded.model, loaded.tokenizer
    out = list(stream_generate(m, tok, [1, 50], m.make_cache(), make_sampler(0), max_tokens=4,
                               stop_ids=frozenset(), keep_logits=True))
    # the same schedule by hand: the prompt as one batch, then one token at a time
    cache = m.make_cache()
    logits = m.forward([1, 50], cache, logits="last")[-1]
    for r in out:
        np.testing.assert_array_equal(r.logits, logits)
        assert r.token == int(np.argmax(logits))
        logits = m.forward([r.token], cache, logits="last")[-1]


def test_stops_on_end_of_generation_token(loaded):
    m, tok = loaded.model, loaded.tokenizer
    first = list(stream_generate(m, tok, [1, 50], m.make_cache(), make_sampler(0), max_tokens=1,
                                 stop_ids=frozenset()))[0].token
    out = list(stream_generate(m, tok, [1, 50], m.make_cache(), make_sampler(0), max_tokens=5,
                               stop_ids=frozenset({first})))
    assert len(out) == 1 and out[0].finish_reason == "stop" and out[0].text == ""


def test_cancel_between_tokens_keeps_cache_consistent(loaded):
    m, tok = loaded.model, loaded.tokenizer
    cancel = threading.Event()
    cache = m.make_cache()
    out = []
    for r in stream_generate(m, tok, [1, 2, 3], cache, make_sampler(0), max_tokens=50, cancel=cancel,
                             stop_ids=frozenset()):
        out.append(r)
        if len(out) == 3:
            cancel.set()
    assert out[-1].finish_reason == "cancelled" and len(out) == 4
    assert cache[0].offset == 3 + len(out) - 1


def test_session_log_equals_cache_after_cancel_during_prefill(loaded):
    s = ChatSession(loaded)
    cancel = threading.Event()
    prompt = list(range(3, 3 + 100))
    out = list(s.generate(prompt, GREEDY, max_tokens=5, cancel=cancel, prefill_chunk=16,
                          prefill_progress=lambda done, total: cancel.set() if done >= 32 else None))
    assert out == []
    assert len(s.tokens) == s.cache[0].offset == 32
    assert s.tokens == prompt[:32]


def test_session_reuses_the_common_prefix(loaded):
    s = ChatSession(loaded)
    first = [1, 10, 11, 12, 13, 14]
    reply = [r.token for r in s.generate(first, GREEDY, max_tokens=3)]
    assert s.tokens == first + reply[:-1] and len(s.tokens) == s.cache[0].offset
    second = first + reply + [2, 20, 21]
    list(s.generate(second, GREEDY, max_tokens=2))
    st = s.last_turn
    assert st.reused_tokens == len(first) + len(reply) - 1 and st.prefilled_tokens == 4
    # a diverging prompt trims back to the common prefix (KV caches are trimmable)
    third = first[:3] + [99, 98]
    list(s.generate(third, GREEDY, max_tokens=1))
    assert s.last_turn.reused_tokens == 3 and s.tokens[:5] == third


def test_session_reuse_gives_the_same_logits_as_a_fresh_prefill(loaded):
    s = ChatSession(loaded)
    list(s.generate([1, 10, 11, 12], GREEDY, max_tokens=3))
    prompt = s.tokens + [40, 41]
    reused = list(s.generate(prompt, GREEDY, max_tokens=1, keep_logits=True))[0].logits
    fresh = list(ChatSession(loaded).generate(prompt, GREEDY, max_tokens=1, keep_logits=True))[0].logits
    # the reused part was fed token by token (decode attention keeps an fp16 accumulator),
    # the fresh one in one batch: equal up to that rounding
    np.testing.assert_allclose(reused, fresh, atol=2e-2 * np.abs(fresh).max())
    assert int(np.argmax(reused)) == int(np.argmax(fresh))


def test_prompt_longer_than_context_is_refused(loaded):
    s = ChatSession(loaded)
    with pytest.raises(ContextOverflowError, match="128"):
        list(s.generate(list(range(3, 200)), GREEDY))
    assert s.tokens == [] and s.cache[0].offset == 0


def test_before_last_sees_all_but_the_last_prompt_token_then_it_is_fed_alone(loaded):
    m, tok = loaded.model, loaded.tokenizer
    prompt = [1, 50, 60, 70, 80]
    cache = m.make_cache()
    seen = []
    out = list(stream_generate(m, tok, prompt, cache, make_sampler(0), max_tokens=2, stop_ids=frozenset(),
                               keep_logits=True, prefill_chunk=3,
                               before_last=lambda: seen.append(cache[0].offset)))
    assert seen == [len(prompt) - 1]
    # the same schedule by hand: chunks of 3 over the first four tokens, then the last alone
    ref = m.make_cache()
    m.forward(prompt[:3], ref, logits="none")
    m.forward(prompt[3:4], ref, logits="none")
    np.testing.assert_array_equal(out[0].logits, m.forward(prompt[4:], ref, logits="last")[-1])
    assert out[0].prompt_tokens == len(prompt)
