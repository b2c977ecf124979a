"""ChatSession: conversations that never pay twice, on llama and qwen35 (hybrid) fixtures."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from engine.chat_template import ChatTemplate
from engine.loader import load_model
from engine.sampling import SamplingSettings
from engine.session import ChatSession

GREEDY = SamplingSettings(temperature=0.0)
QWEN35_Q8 = Path(__file__).parents[1] / "fixtures" / "qwen35" / "tiny-q8_0.gguf"

# Qwen3-style: earlier assistant turns lose their <think> block when re-rendered.
REWRITING_TEMPLATE = """{%- set ns = namespace(last_user=0) -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in m.content -%}
<|im_start|>assistant
{{ m.content.split('</think>')[-1].lstrip('\\n') }}<|im_end|>
{% else -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""


@pytest.fixture(params=["llama", "qwen35"])
def loaded(request, tiny_llama_path):
    path = tiny_llama_path if request.param == "llama" else QWEN35_Q8
    return load_model(path, n_ctx=1024)


def fresh_logits(model, tokens):
    return model.forward(tokens, model.make_cache(), logits="last")[-1]


def check_reply_against_fresh(session, out, frac=0.03):
    """Every generated position's logits equal a fresh prefill of the same tokens.

    Not bit-equal: the session fed earlier turns token by token, whose attention keeps an
    fp16 accumulator (as llama.cpp's), while the fresh run prefills them in one batch. A
    wrong token anywhere in the cache moves the logits by a large part of their range.
    """
    turn = session.turns[-1]
    for i, r in enumerate(out):
        seq = turn.prompt + turn.reply_tokens[:i]
        want = fresh_logits(session.model, seq)
        tol = frac * max(1.0, np.abs(want).max())
        np.testing.assert_allclose(r.logits, want, atol=tol, err_msg=f"position {i}")
        assert int(np.argmax(r.logits)) == int(np.argmax(want)) or np.sort(want)[-1] - np.sort(want)[-2] < tol


def run(session, messages, max_tokens=6, cancel_after=None, **kw):
    cancel = threading.Event()
    out = []
    for r in session.reply(messages, GREEDY, max_tokens=max_tokens, cancel=cancel, keep_logits=True, **kw):
        out.append(r)
        if cancel_after is not None and len(out) == cancel_after:
            cancel.set()
    assert len(session.tokens) == session.cache[0].offset  # the log is what the cache holds
    return out, "".join(r.text for r in out)


def test_four_turns_with_stop_regenerate_and_edit_equal_fresh_prefill(loaded):
    s = ChatSession(loaded)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    out, text = run(s, msgs)
    check_reply_against_fresh(s, out)
    assert s.last_turn.mode == "full"

    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "and then?"}]
    out, text = run(s, msgs, max_tokens=12, cancel_after=3)  # stopped mid-reply
    assert out[-1].finish_reason == "cancelled"
    assert s.last_turn.mode == "append"
    check_reply_against_fresh(s, out)

    prompt_before = list(s.turns[-1].prompt)
    out, text = run(s, msgs)  # regenerate: same messages without the reply
    # a trimmable cache re-feeds two tokens (the last one then takes the prefill kernels, as uncached)
    assert s.last_turn.mode == "regenerate" and s.last_turn.prefilled_tokens == (2 if s.trimmable else 1)
    assert s.turns[-1].prompt == prompt_before
    check_reply_against_fresh(s, out)

    msgs[-1] = {"role": "user", "content": "tell me more, please"}  # edit the last user message
    out, text = run(s, msgs)
    assert s.last_turn.mode == "edit"
    check_reply_against_fresh(s, out)

    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "thanks"}]
    out, _ = run(s, msgs)
    assert s.last_turn.mode == "append"
    check_reply_against_fresh(s, out)


def test_a_stopped_reply_is_kept_and_its_last_token_fed_next_turn(loaded):
    s = ChatSession(loaded)
    msgs = [{"role": "user", "content": "count"}]
    out, text = run(s, msgs, max_tokens=20, cancel_after=2)
    last = out[-1].token
    assert s.tokens[-1] != last or len(out) == 1 or s.tokens[-1] == out[-2].token
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "go on"}]
    run(s, msgs, max_tokens=2)
    turn = s.turns[-1]
    n_prev = len(s.turns[-2].prompt) + len(s.turns[-2].reply_tokens) - 1
    assert turn.prompt[n_prev] == last  # fed first thing in the next turn
    assert s.last_turn.reused_tokens == n_prev


def test_regenerate_and_edit_restore_checkpoints_on_a_hybrid_model():
    s = ChatSession(load_model(QWEN35_Q8, n_ctx=1024))
    assert not s.trimmable
    msgs = [{"role": "user", "content": "one"}]
    _, text = run(s, msgs)
    end_of_turn1 = len(s.tokens)
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "two"}]
    run(s, msgs)
    n_prompt = len(s.turns[-1].prompt)
    run(s, msgs)  # regenerate
    assert s.last_turn.restored_from == n_prompt - 1 and s.last_turn.prefilled_tokens == 1
    msgs[-1] = {"role": "user", "content": "two, edited"}
    run(s, msgs)
    assert s.last_turn.mode == "edit" and s.last_turn.reused_tokens == end_of_turn1


def test_turn_n_prefills_only_its_new_tokens_with_constant_state():
    loaded = load_model(QWEN35_Q8, n_ctx=2048)
    loaded.template = ChatTemplate(REWRITING_TEMPLATE, bos_token="", eos_token="<|im_end|>")
    s = ChatSession(loaded)
    msgs = [{"role": "system", "content": "You are terse."}]
    state_bytes, kv_bytes = [], []
    for n in range(1, 11):
        msgs.append({"role": "user", "content": f"question number {n}"})
        before = len(s.tokens)
        out, text = run(s, msgs, max_tokens=5, enable_thinking=True)
        # as if the model had reasoned first: the template drops this block from the history
        # when it renders the conversation again (the log keeps what was actually fed)
        text = "<think>\nok\n</think>\n\n" + text
        s.messages[-1]["content"] = s.turns[-1].reply_text = text
        msgs.append({"role": "assistant", "content": text})
        st = s.last_turn
        if n >= 2:
            assert st.mode == "append", n
            assert st.reused_tokens == before  # the whole log, every turn
            new = st.prompt_tokens - before
            assert st.prefilled_tokens == new and new < 40  # the user turn + template glue only
        stats = s.stats()
        state_bytes.append(stats["state_bytes"])
        kv_bytes.append(stats["kv_bytes"])
    # a full re-render would have diverged inside the first reply
    from engine.session import common_prefix_len

    full = s.render(msgs[:-1], enable_thinking=True)
    assert common_prefix_len(full, s.tokens) < len(s.turns[0].prompt) + 3
    assert len(set(state_bytes)) == 1 and state_bytes[0] > 0
    assert all(b > a for a, b in zip(kv_bytes, kv_bytes[1:]))
    kv_layers = [c for c in s.cache if c.kind == "kv"]
    assert kv_bytes[-1] == sum(c.nbytes for c in kv_layers)


def test_rewritten_history_differs_from_the_log_only_inside_old_replies():
    """The log keeps the model's own reasoning; a fresh render would drop it."""
    loaded = load_model(QWEN35_Q8, n_ctx=2048)
    loaded.template = ChatTemplate(REWRITING_TEMPLATE, bos_token="", eos_token="<|im_end|>")
    s = ChatSession(loaded)
    msgs = [{"role": "user", "content": "hi"}]
    run(s, msgs, max_tokens=3)
    msgs += [{"role": "assistant", "content": "<think>\nx\n</think>\n\nhey"}, {"role": "user", "content": "bye"}]
    # the recorded reply differs from this hand-written one: not a continuation
    run(s, msgs, max_tokens=2)
    assert s.last_turn.mode == "full"


def test_checkpoints_are_bounded_by_count_and_bytes():
    s = ChatSession(load_model(QWEN35_Q8, n_ctx=2048), max_checkpoints=3)
    msgs = []
    for n in range(6):
        msgs.append({"role": "user", "content": f"q{n}"})
        _, text = run(s, msgs, max_tokens=3)
        msgs.append({"role": "assistant", "content": text})
        assert len(s.checkpoints) <= 3
    per = s.checkpoints[-1].nbytes
    assert per == s.stats()["state_bytes"]  # a checkpoint copies the recurrent state only
    s2 = ChatSession(load_model(QWEN35_Q8, n_ctx=2048), max_checkpoint_bytes=int(per * 1.5))
    run(s2, [{"role": "user", "content": "a"}], max_tokens=3)
    assert s2.checkpoint_bytes <= int(per * 1.5)


def test_reset_forgets_everything(loaded):
    s = ChatSession(loaded)
    run(s, [{"role": "user", "content": "x"}], max_tokens=2)
    s.reset()
    assert s.tokens == [] and s.messages == [] and s.cache[0].offset == 0
    out, _ = run(s, [{"role": "user", "content": "x"}], max_tokens=2)
    check_reply_against_fresh(s, out)


def test_full_context_drops_the_oldest_turns_and_keeps_the_system_prompt(tiny_llama_path):
    s = ChatSession(load_model(tiny_llama_path, n_ctx=160))
    msgs = [{"role": "system", "content": "sys"}]
    dropped_seen = 0
    for n in range(12):
        msgs.append({"role": "user", "content": f"message number {n} with some words"})
        _, text = run(s, msgs, max_tokens=8)
        msgs.append({"role": "assistant", "content": text})
        dropped_seen = max(dropped_seen, s.last_turn.dropped_messages)
        assert len(s.tokens) <= s.n_ctx
        assert s.messages[0] == {"role": "system", "content": "sys"}  # kept
        assert s.messages[-2]["content"] == f"message number {n} with some words"
    assert dropped_seen > 0


def test_a_single_message_longer_than_the_context_is_a_clear_error(tiny_llama_path):
    from engine.errors import ContextOverflowError

    s = ChatSession(load_model(tiny_llama_path, n_ctx=64))
    with pytest.raises(ContextOverflowError, match="does not fit"):
        run(s, [{"role": "user", "content": "word " * 200}])
    assert s.tokens == [] and s.cache[0].offset == 0


def test_saved_state_reopens_without_prefill_and_continues_identically(loaded, tmp_path):
    s = ChatSession(loaded)
    msgs = [{"role": "user", "content": "first"}]
    _, text = run(s, msgs)
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "second"}]
    _, text = run(s, msgs)
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "third"}]
    path = tmp_path / "chat.state.npz"
    assert s.save_state(path) > 0

    reopened = ChatSession(loaded)
    reopened.load_state(path)
    assert reopened.tokens == s.tokens and reopened.messages == s.messages
    a, _ = run(s, msgs)
    b, _ = run(reopened, msgs)
    assert reopened.last_turn.mode == "append" and reopened.last_turn.reused_tokens == len(s.turns[-2].prompt) + len(
        s.turns[-2].reply_tokens) - 1
    assert [r.token for r in a] == [r.token for r in b]
    np.testing.assert_array_equal(a[0].logits, b[0].logits)
    # regenerate works after reopening too (the checkpoints came along)
    run(reopened, msgs)
    assert reopened.last_turn.mode == "regenerate"


def test_state_of_another_model_is_refused(loaded, tmp_path):
    from engine.errors import StateMismatchError
    from tests.tiny_models import write_tiny_llama

    s = ChatSession(loaded)
    run(s, [{"role": "user", "content": "x"}], max_tokens=2)
    path = tmp_path / "chat.state.npz"
    s.save_state(path)
    other = ChatSession(load_model(write_tiny_llama(tmp_path / "other.gguf", seed=5), n_ctx=256))
    with pytest.raises(StateMismatchError, match="another model file"):
        other.load_state(path)
    path.write_bytes(b"not a state")
    with pytest.raises(StateMismatchError):
        ChatSession(loaded).load_state(path)


def test_every_response_reports_the_whole_prompt():
    """On a hybrid model the prompt is fed in two parts (checkpoint before the last token)."""
    s = ChatSession(load_model(QWEN35_Q8, n_ctx=512))
    out, _ = run(s, [{"role": "user", "content": "a question of several words"}], max_tokens=4)
    n = s.last_turn.prompt_tokens
    assert {r.prompt_tokens for r in out} == {n}
    assert len({r.ttft_s for r in out}) == 1 and len({r.prompt_tps for r in out}) == 1


def test_cache_state_round_trips_and_is_checked_before_writing():
    from engine.cache import CacheState, KVCache, RecurrentCache

    model = load_model(QWEN35_Q8, n_ctx=256).model
    cache = model.make_cache()
    logits = model.forward([1, 2, 3, 4], cache, logits="last")
    kinds = {type(c) for c in cache}
    assert kinds == {KVCache, RecurrentCache}
    rebuilt = [KVCache.from_state(c.snapshot(), model.n_ctx) if isinstance(c, KVCache)
               else RecurrentCache.from_state(c.snapshot()) for c in cache]
    assert [c.offset for c in rebuilt] == [4] * len(cache)
    np.testing.assert_array_equal(model.forward([5], rebuilt, logits="last"),
                                  model.forward([5], cache, logits="last"))
    assert logits.shape == (1, model.n_vocab)
    kv = next(c for c in cache if isinstance(c, KVCache))
    st = kv.snapshot()
    with pytest.raises(ValueError, match="does not fit"):
        kv.restore(CacheState(st.offset + 1, st.arrays))   # offset disagrees with the arrays
    with pytest.raises(ValueError, match="holds 'k' and 'v'"):
        kv.restore(CacheState(st.offset, {"k": st.arrays["k"]}))
    assert kv.offset == 5   # nothing written
    rec = next(c for c in cache if isinstance(c, RecurrentCache))
    bad = rec.snapshot()
    bad.arrays["state"] = bad.arrays["state"][:1]
    with pytest.raises(ValueError, match="does not fit"):
        rec.restore(bad)
