import numpy as np
import pytest

from engine.sampling import SamplingSettings, make_repetition_penalty, make_sampler


def test_greedy_is_argmax_with_ties_to_lowest_id():
    s = make_sampler(temperature=0)
    assert s(np.array([0.1, 3.0, 3.0, -1.0])) == 1


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(0).normal(size=1000)
    s1, s2 = make_sampler(1.0, seed=7), make_sampler(1.0, seed=7)
    assert [s1(logits) for _ in range(20)] == [s2(logits) for _ in range(20)]


def test_top_k_1_is_greedy():
    logits = np.random.default_rng(1).normal(size=500)
    s = make_sampler(2.0, top_k=1, seed=0)
    assert all(s(logits) == int(np.argmax(logits)) for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = make_sampler(1.0, top_p=0.7, seed=0)
    drawn = {s(logits) for _ in range(300)}
    assert drawn == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.6, 0.3, 0.07, 0.03]))
    s = make_sampler(1.0, min_p=0.2, seed=0)
    drawn = {s(logits) for _ in range(300)}
    assert drawn == {0, 1}


def test_temperature_sharpens_distribution():
    logits = np.log(np.array([0.4, 0.35, 0.25]))
    cold = make_sampler(0.01, seed=0)  # runner-up weight e^-13
    assert all(cold(logits) == 0 for _ in range(50))


def test_repetition_penalty_follows_llama_cpp_rule():
    proc = make_repetition_penalty(2.0, last_n=3)
    logits = np.array([4.0, -4.0, 1.0, 1.0])
    out = proc([0, 1, 0], logits)
    np.testing.assert_array_equal(out, [2.0, -8.0, 1.0, 1.0])
    assert proc([3, 3, 3, 3, 2], logits)[0] == 4.0  # token 0 is outside the window


def test_settings_reject_nonsense():
    with pytest.raises(ValueError):
        SamplingSettings(top_p=0).validate()
    with pytest.raises(ValueError):
        SamplingSettings(top_k=-1).validate()


def test_non_finite_logits_are_masked_or_a_clear_error():
    from engine.errors import ModelOutputError

    nan_row = np.array([0.5, np.nan, 2.0, -np.inf, 1.0], np.float32)
    # numpy's argmax would pick the NaN; the sampler never draws NaN or -inf
    assert make_sampler(0.0)(nan_row) == 2
    drawn = {make_sampler(1.0, seed=s)(nan_row) for s in range(200)}
    assert drawn == {0, 2, 4}
    # +inf dominates every finite logit: only those are drawn (ties to the lowest id when greedy)
    inf_row = np.array([1.0, np.inf, 3.0, np.inf], np.float32)
    assert make_sampler(0.0)(inf_row) == 1
    assert {make_sampler(0.8, top_k=2, seed=s)(inf_row) for s in range(100)} == {1, 3}
    for row in (np.full(5, np.nan, np.float32), np.array([np.nan, -np.inf], np.float32)):
        for sampler in (make_sampler(0.0), make_sampler(0.7, top_k=40, top_p=0.9, min_p=0.05, seed=0)):
            with pytest.raises(ModelOutputError, match="no finite logits"):
                sampler(row)


def test_tiny_temperature_does_not_overflow():
    row = np.array([1.0, 2.0, 3.0], np.float32)
    assert make_sampler(1e-30, seed=0)(row) == 2


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("top_p", float("inf")),
                                         ("repeat_penalty", float("nan")), ("top_k", True), ("seed", -1),
                                         ("temperature", -0.1), ("repeat_last_n", -1)])
def test_settings_reject_non_finite_and_wrong_types(field, value):
    from engine.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match=field):
        SamplingSettings(**{field: value}).validate()
