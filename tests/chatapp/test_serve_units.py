"""The server's parts in-process: request validation, stop strings, the session pool, exposure rules."""

from __future__ import annotations


import pytest

from engine.sampling import SamplingSettings

from chatapp.server.cli import exposure_warning, is_loopback
from chatapp.server.pool import same_conversation
from chatapp.server.protocol import RequestError, parse_chat_request
from chatapp.server.worker import CancelFlag, Finished, Piece, ServeEngine, Started, StopMatcher
from chatapp.server.protocol import ChatRequest

GREEDY = SamplingSettings(temperature=0, repeat_penalty=3.0)


def _body(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


def test_request_fields_are_read_and_checked():
    r = parse_chat_request(_body(temperature=0.2, top_p=0.5, top_k=7, min_p=0.1, repeat_penalty=1.3, seed=5,
                                 max_completion_tokens=9, max_tokens=99, stop="END", stream=True,
                                 stream_options={"include_usage": True},
                                 chat_template_kwargs={"enable_thinking": False}), SamplingSettings())
    s = r.settings
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.seed) == (0.2, 0.5, 7, 0.1, 1.3, 5)
    assert r.max_tokens == 9 and r.stop == ["END"] and r.stream and r.include_usage and r.enable_thinking is False
    parts = parse_chat_request({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                           {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                        {"type": "text", "text": "b"}]}]},
                               SamplingSettings())
    assert parts.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    bad = [({"messages": []}, "messages"), (_body(temperature="hot"), "temperature"), (_body(top_k=1.5), "top_k"),
           (_body(max_tokens=0), "max_tokens"), (_body(stop=[""]), "stop"), (_body(stop=["a"] * 5), "stop"),
           (_body(stream="yes"), "stream"), (_body(n=2), "n"), ({"messages": [{"role": "user", "content": "x"}]}, "model"),
           (_body(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
           (_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content")]
    for body, param in bad:
        with pytest.raises(RequestError) as e:
            parse_chat_request({"model": "m", **body} if "model" not in body and param != "model" else body,
                               SamplingSettings())
        assert e.value.status == 400 and e.value.param == param, (body, e.value.message)
    with pytest.raises(RequestError):
        parse_chat_request([1, 2], SamplingSettings())


def test_stop_matcher_holds_back_a_possible_start_and_cuts_at_the_first_stop():
    m = StopMatcher(["STOP", "##"])
    out = [m.feed(t) for t in ["Hello S", "T", "x #", "y ST", "OP and more"]]
    assert "".join(out) == "Hello STx #y " and m.matched
    assert out[0] == "Hello " and out[1] == ""           # "S", "ST" may begin STOP: held
    m = StopMatcher(["STOP"])
    assert m.feed("all S") == "all " and not m.matched and m.flush() == "S"
    assert StopMatcher([]).feed("as is") == "as is"


def test_loopback_and_the_exposure_warning():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    assert "WITHOUT an API key" in exposure_warning("0.0.0.0", None)


def test_same_conversation_is_told_by_its_first_user_message():
    sys_ = {"role": "system", "content": "S"}
    a = [sys_, {"role": "user", "content": "one"}, {"role": "assistant", "content": "x"}]
    assert same_conversation(a, [sys_, {"role": "user", "content": " one "}])
    assert not same_conversation(a, [sys_, {"role": "user", "content": "two"}])
    assert not same_conversation([], a)


@pytest.fixture(scope="module")
def loaded(tiny_llama_path):
    from engine.loader import load_model

    return load_model(tiny_llama_path, n_ctx=256)


def _ask(engine, messages, max_tokens=8, settings=GREEDY):
    cancel = CancelFlag()
    events = list(engine.generate(ChatRequest("m", messages, settings, max_tokens), cancel))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    text = "".join(e.text for e in events if isinstance(e, Piece))
    return text, events[0], events[-1]


def test_pool_continues_a_conversation_and_keeps_another_apart(loaded):
    engine = ServeEngine(loaded, "m", budget_bytes=64 << 20)
    a = [{"role": "system", "content": "S"}, {"role": "user", "content": "first conversation"}]
    text_a, start, fin = _ask(engine, a)
    assert start.cached_tokens == 0 and fin.completion_tokens == 8
    b = [{"role": "system", "content": "S"}, {"role": "user", "content": "another one entirely"}]
    _, start_b, _ = _ask(engine, b)
    assert engine.pool.stats()["sessions"] == 2 and start_b.cached_tokens == 0   # A's session is not rewound
    a2 = a + [{"role": "assistant", "content": text_a}, {"role": "user", "content": "and next"}]
    _, start_a2, _ = _ask(engine, a2)
    assert start_a2.cached_tokens == fin.prompt_tokens + fin.completion_tokens - 1   # all but the unfed last token
    # the reply equals a fresh engine's: the cache changes nothing (plain greedy here: this random
    # model's varied text is partly invalid UTF-8, which does not tokenize back to the same tokens)
    plain = SamplingSettings(temperature=0)
    c = [{"role": "user", "content": "third"}]
    c += [{"role": "assistant", "content": _ask(engine, c, 12, plain)[0]}, {"role": "user", "content": "more"}]
    cached, start_c, _ = _ask(engine, c, 12, plain)
    assert start_c.cached_tokens > 0
    assert cached == _ask(ServeEngine(loaded, "m", budget_bytes=64 << 20), c, 12, plain)[0]


def test_pool_drops_the_least_recently_used_beyond_its_budget(loaded):
    engine = ServeEngine(loaded, "m", budget_bytes=64 << 20)
    a = [{"role": "user", "content": "alpha"}]
    text_a, _, _ = _ask(engine, a)
    engine.pool.budget_bytes = int(2.5 * engine.pool.total_bytes())   # room for two such sessions
    _ask(engine, [{"role": "user", "content": "bravo"}])
    assert engine.pool.stats()["sessions"] == 2
    # A grows well past the budget: B, the least recently used, is dropped; A is never dropped
    a += [{"role": "assistant", "content": text_a}, {"role": "user", "content": "a much longer turn " * 4}]
    _, start, _ = _ask(engine, a)
    assert start.cached_tokens > 0
    assert engine.pool.stats()["sessions"] == 1 and engine.pool.dropped == 1
    assert next(iter(engine.pool.kept.values())).session.messages[0]["content"] == "alpha"


def test_a_cancelled_request_frees_at_once_and_a_queued_one_never_starts(loaded):
    engine = ServeEngine(loaded, "m", budget_bytes=64 << 20)
    cancel = CancelFlag()
    # plain greedy: this model then repeats one whole-character token, so a piece is a token
    gen = engine.generate(ChatRequest("m", [{"role": "user", "content": "long"}], SamplingSettings(temperature=0),
                                      200), cancel)
    n = 0
    for ev in gen:
        n += isinstance(ev, Piece)
        if n == 3:
            cancel.set()
    assert engine.last["finish"] == "cancelled" and engine.last["completion_tokens"] <= 4 and not engine.busy
    queued = CancelFlag()
    queued.set()
    assert list(engine.generate(ChatRequest("m", [{"role": "user", "content": "x"}], GREEDY, 5), queued)) == []


def test_a_prompt_over_the_context_is_refused_before_any_work(loaded):
    from engine.errors import ContextOverflowError

    engine = ServeEngine(loaded, "m", budget_bytes=64 << 20)
    with pytest.raises(ContextOverflowError):
        list(engine.generate(ChatRequest("m", [{"role": "user", "content": "y" * 400}], GREEDY, 5), CancelFlag()))
    assert not engine.busy and engine.pool.stats()["sessions"] == 0
