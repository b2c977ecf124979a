"""The default model (SmolLM2-135M-Instruct Q4_1) against llama.cpp's stored outputs.

Reference: tests/fixtures/llamacpp/smollm2_q4_1.json (llama.cpp 0c1e57098, CPU).
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
    """Feed llama.cpp's own tokens one at a time, as it ran them; compare each step's top-1."""
    case = reference["primary"]
    prompt, gen = case["prompt_token_ids"], case["generated_token_ids"]
    cache = loaded.model.make_cache()
    steps = [loaded.model.forward(prompt, cache, logits="last")[-1]]
    for tok in gen[:-1]:
        steps.append(loaded.model.forward([tok], cache, logits="last")[-1])
    checked = 0
    for step, (margin, top5) in enumerate(zip(case["top1_minus_top2_margin_per_step"], case["top5_logits_per_step"])):
        if margin >= 0.2:
            assert int(np.argmax(steps[step])) == top5[0][0], f"step {step} (llama.cpp margin {margin})"
            checked += 1
    assert checked >= 20


# Tolerances for whole logit vectors. Activations quantized to int8 make this model chaotic:
# perturbing its input embeddings by 1e-7 (relative) moves the final logits by ~0.6 on
# average, and llama.cpp itself lands 0.16-0.39 (mean) / 0.93-1.23 (max) from these stored
# vectors when built on an AVX-512 machine, flash attention on or off (it changes them by
# 0.4-0.56 by itself); KL(reference || llama.cpp) 0.007-0.009. See tools/llamacpp_spread.py.
# So the bounds below are llama.cpp's own spread plus a margin, and the distribution-level
# checks (KL, the top 5) carry most of the weight.
MEAN_ABS_TOL, MAX_ABS_TOL, KL_TOL = 0.5, 1.5, 0.03


def _softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("case_name", ["primary", "alt_builtin_chatml_no_system"])
def test_first_position_logits_within_llama_cpp_spread(loaded, reference, reference_dir, case_name):
    case = reference[case_name]
    expected = _first_logits(reference_dir, case)
    cache = loaded.model.make_cache()
    got = loaded.model.forward(case["prompt_token_ids"], cache, logits="last")[-1]
    diff = np.abs(got - expected)
    assert diff.mean() <= MEAN_ABS_TOL, diff.mean()
    assert diff.max() <= MAX_ABS_TOL, diff.max()
    p, q = _softmax(expected), _softmax(got)
    assert (p * (np.log(p) - np.log(q))).sum() <= KL_TOL
    # the top-k set for the largest k <= 5 whose boundary in the reference is a clear gap
    # (>= 0.1, below llama.cpp's own spread nothing is decided): primary's 5th and 6th are 0.03 apart
    ref_sorted = np.sort(expected)[::-1]
    k = max(k for k in range(1, 6) if k == 1 or ref_sorted[k - 1] - ref_sorted[k] >= 0.1)
    assert set(np.argsort(-got)[:k]) == set(np.argsort(-expected)[:k])
    assert {t["id"] for t in case["top5_logits_first_position"]} == set(np.argsort(-expected)[:5])
    assert np.corrcoef(got, expected)[0, 1] >= 0.998


def test_chunked_prefill_is_bit_identical_to_one_batch(loaded, reference):
    ids = reference["primary"]["prompt_token_ids"]
    c1, c2 = loaded.model.make_cache(), loaded.model.make_cache()
    batch = loaded.model.forward(ids, c1, logits="all")
    chunks = [loaded.model.forward(ids[i : i + 5], c2, logits="all") for i in range(0, len(ids), 5)]
    np.testing.assert_array_equal(batch, np.concatenate(chunks))
    np.testing.assert_array_equal(c1[7].keys[: len(ids)], c2[7].keys[: len(ids)])


def test_token_by_token_prefill_agrees_in_distribution(loaded, reference):
    """Single tokens take the decode attention path (fp16 accumulator), so logits differ a little."""
    ids = reference["alt_builtin_chatml_no_system"]["prompt_token_ids"]
    batch = loaded.model.forward(ids, loaded.model.make_cache(), logits="last")[-1]
    cache = loaded.model.make_cache()
    for tok in ids:
        single = loaded.model.forward([tok], cache, logits="last")[-1]
    p, q = _softmax(batch), _softmax(single)
    assert (p * (np.log(p) - np.log(q))).sum() <= KL_TOL
    assert int(np.argmax(batch)) == int(np.argmax(single))
