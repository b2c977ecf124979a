"""The numba kernels added for phi3/qwen2/qwen3/gemma3 against their numpy twins."""

import numpy as np
import pytest

from engine import ops
from engine.quants.common import F16_TO_F32


@pytest.mark.parametrize("window", [0, 1, 3, 100])
@pytest.mark.parametrize("p0,T", [(0, 5), (6, 1), (4, 3)])
def test_attention_nofa_matches_numpy(window, p0, T):
    rng = np.random.default_rng(p0 * 10 + T + window)
    Hq, Hkv, hd = 4, 2, 16
    k = ops.f16_bits_of(rng.normal(size=(16, Hkv, hd)))
    v = ops.f16_bits_of(rng.normal(size=(16, Hkv, hd)))
    q = ops.to_f16_precision(rng.normal(size=(T, Hq, hd)).astype(np.float32))
    out = np.empty((T, Hq, hd), np.float32)
    ops.attention_nofa(q, k, v, p0, np.float32(0.25), window, out, F16_TO_F32)
    np.testing.assert_allclose(out, ops.attention_nofa_ref(q, k, v, p0, 0.25, window), atol=2e-6)
    # close to exact attention (probabilities rounded to fp16 only)
    if window == 0:
        np.testing.assert_allclose(out, ops.attention_ref(q, k, v, p0, 0.25), atol=3e-3)


def test_attention_window_hides_old_keys():
    Hq, hd = 1, 4
    k = ops.f16_bits_of(np.zeros((8, 1, hd)))
    v = ops.f16_bits_of(np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 1, hd), np.float32))
    q = np.zeros((1, Hq, hd), np.float32)
    out = np.empty((1, Hq, hd), np.float32)
    ops.attention_nofa(q, k, v, 7, np.float32(1.0), 2, out, F16_TO_F32)  # sees positions 6, 7
    np.testing.assert_allclose(out[0, 0], 6.5)


def test_geglu_matches_numpy_and_gelu():
    rng = np.random.default_rng(0)
    g = (rng.normal(size=(3, 200)) * 5).astype(np.float32)
    g[0, :4] = [-12.0, 12.0, -10.0, 10.0]
    u = rng.normal(size=(3, 200)).astype(np.float32)
    out = np.empty_like(g)
    ops.geglu(g, u, out)
    np.testing.assert_array_equal(out, ops.geglu_ref(g, u))
    x = g.astype(np.float64)
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))) * u
    np.testing.assert_allclose(out, exact, atol=2e-2 * np.abs(u).max(), rtol=2e-3)
