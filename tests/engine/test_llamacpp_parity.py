"""The default model (SmolLM2-135M-Instruct Q4_1) against llama.cpp's stored outputs.

Reference: ../shared/reference/llamacpp/smollm2_q4_1.json (llama.cpp 0c1e57098, CPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.loader import load_model
from engine.sampling import SamplingSettings
from engine.session import ChatSession

pytestmark = pytest.mark.slow

GREEDY = SamplingSettings(temperature=0.0)


@pytest.fixture(scope="module")
def reference(reference_dir):
    return json.loads((reference_dir / "smollm2_q4_1.json").read_text())


@pytest.fixture(scope="module")
def loaded(default_model_path):
    return load_model(default_model_path, n_ctx=512)


def _first_logits(reference_dir, case) -> np.ndarray:
    name = case["first_position_full_logits_file"].split()[0]
    return np.fromfile(reference_dir / name, dtype="<f4")


def test_builtin_chatml_prompt_ids_and_greedy_reply_are_exact(loaded, reference):
    case = reference["alt_builtin_chatml_no_system"]
    ids = loaded.tokenizer.encode(case["prompt_text"], add_special=True, parse_special=True)
    assert ids == case["prompt_token_ids"]
    session = ChatSession(loaded)
    out = list(session.generate(ids, GREEDY, max_tokens=32))
    assert [r.token for r in out] == case["generated_token_ids"]
    assert out[-1].finish_reason == "stop"
    assert "".join(r.text for r in out) == case["generated_text"]


def test_primary_prompt_from_the_gguf_template_is_exact(loaded, reference):
    case = reference["primary"]
    session = ChatSession(loaded)
    ids = session.render([{"role": "user", "content": reference["user_message"]}])
    assert ids == case["prompt_token_ids"]


def test_primary_teacher_forced_top1_matches_where_llama_cpp_is_sure(loaded, reference):
    case = reference["primary"]
    prompt, gen = case["prompt_token_ids"], case["generated_token_ids"]
    cache = loaded.model.make_cache()
    logits = loaded.model.forward(prompt + gen[:-1], cache, logits="all")[len(prompt) - 1 :]
    assert logits.shape == (len(gen), loaded.model.n_vocab)
    checked = 0
    for step, (margin, top5) in enumerate(zip(case["top1_minus_top2_margin_per_step"], case["top5_logits_per_step"])):
        if margin >= 0.2:
            assert int(np.argmax(logits[step])) == top5[0][0], f"step {step}"
            checked += 1
        # llama.cpp's top-5 logits themselves, within the first-position tolerance
        for tok, value in top5:
            assert abs(logits[step, tok] - value) <= 0.25, (step, tok)
    assert checked >= 20


@pytest.mark.parametrize("case_name", ["primary", "alt_builtin_chatml_no_system"])
def test_first_position_logits_within_tolerance(loaded, reference, reference_dir, case_name):
    case = reference[case_name]
    expected = _first_logits(reference_dir, case)
    cache = loaded.model.make_cache()
    got = loaded.model.forward(case["prompt_token_ids"], cache, logits="last")[-1]
    diff = np.abs(got - expected)
    assert diff.mean() <= 0.05, diff.mean()
    assert diff.max() <= 0.25, diff.max()


def test_prefill_in_one_batch_equals_token_by_token(loaded, reference):
    ids = reference["alt_builtin_chatml_no_system"]["prompt_token_ids"]
    c1, c2 = loaded.model.make_cache(), loaded.model.make_cache()
    batch = loaded.model.forward(ids, c1, logits="all")
    single = np.concatenate([loaded.model.forward([t], c2, logits="last") for t in ids])
    np.testing.assert_allclose(batch, single, atol=2e-3, rtol=0)
