"""DeltaNet kernels: numba vs numpy twins, chunked prefill == token-by-token, fixed-size state."""

from __future__ import annotations

import numpy as np
import pytest

from engine import deltanet as dn

Hk, Hv, dk, dv, K = 2, 4, 16, 16, 4
CONV = 2 * Hk * dk + Hv * dv
EPS = 1e-6


def _inputs(T, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s, sc=1.0: (r.standard_normal(s) * sc).astype(np.float32)  # noqa: E731
    return dict(
        qkv=f(T, CONV), z=f(T, Hv * dv), a=f(T, Hv), b=f(T, Hv),
        conv_w=f(K, CONV, sc=0.5), dt_bias=f(Hv, sc=0.5), ssm_a=-np.exp(f(Hv, sc=0.5)),
        norm_w=(1 + f(dv, sc=0.1)).astype(np.float32),
    )


def _state(seed=1, zero=False):
    r = np.random.default_rng(seed)
    if zero:
        return np.zeros((K - 1, CONV), np.float32), np.zeros((Hv, dv, dk), np.float32)
    return (r.standard_normal((K - 1, CONV)).astype(np.float32),
            (0.1 * r.standard_normal((Hv, dv, dk))).astype(np.float32))


@pytest.mark.parametrize("T", [1, 2, 3, 7])
def test_conv1d_silu_matches_ref(T):
    x = _inputs(T)
    cs, _ = _state()
    want, want_cs = dn.conv1d_silu_ref(x["qkv"], cs, x["conv_w"])
    out = np.empty_like(x["qkv"])
    dn.conv1d_silu(x["qkv"], cs, x["conv_w"], out)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cs, want_cs)


def test_conv_window_keeps_last_raw_inputs():
    x = _inputs(6)
    cs, _ = _state(zero=True)
    out = np.empty_like(x["qkv"])
    dn.conv1d_silu(x["qkv"], cs, x["conv_w"], out)
    np.testing.assert_array_equal(cs, x["qkv"][-(K - 1):])
    # first token sees zeros before it: only the newest tap contributes
    c0 = x["qkv"][0] * x["conv_w"][K - 1]
    np.testing.assert_allclose(out[0], c0 / (1 + np.exp(-c0)), rtol=1e-5, atol=1e-6)


def test_l2norm_and_gates_match_ref():
    x = _inputs(5)
    u = x["qkv"].copy()
    u[1, :dk] = 0.0  # a zero head: divided by eps, stays zero
    want = dn.l2norm_heads_ref(u, 2 * Hk, dk, EPS)
    dn.l2norm_heads(u, 2 * Hk, dk, EPS)
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-7)
    assert np.all(u[1, :dk] == 0)
    np.testing.assert_allclose(np.linalg.norm(u[:, dk : 2 * dk], axis=1)[[0, 2]], 1.0, rtol=1e-5)
    a = np.concatenate([x["a"], np.full((1, Hv), 30.0, np.float32)])  # softplus threshold branch
    b = np.concatenate([x["b"], np.zeros((1, Hv), np.float32)])
    dec, beta = np.empty_like(a), np.empty_like(a)
    dn.ssm_gates(a, b, x["dt_bias"], x["ssm_a"], dec, beta)
    wd, wb = dn.ssm_gates_ref(a, b, x["dt_bias"], x["ssm_a"])
    np.testing.assert_allclose(dec, wd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(beta, wb, rtol=1e-6)
    assert np.all((dec > 0) & (dec <= 1)) and np.all(beta[-1] == 0.5)


@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("T", [1, 5])
def test_gated_delta_rule_matches_ref(T, tiled):
    x = _inputs(T)
    u = dn.l2norm_heads_ref(x["qkv"], 2 * Hk, dk, EPS)
    dec, beta = dn.ssm_gates_ref(x["a"], x["b"], x["dt_bias"], x["ssm_a"])
    _, S = _state()
    want, want_S = dn.gated_delta_rule_ref(u, dec, beta, S, Hk, tiled)
    out = np.empty((T, Hv * dv), np.float32)
    dn.gated_delta_rule(u, dec, beta, S, Hk, tiled, out)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(S, want_S, rtol=1e-4, atol=1e-5)


def test_head_order_matters():
    """Tiled (qwen35) and grouped (qwen3next) V-head orders give different results when Hk != Hv."""
    x = _inputs(3)
    u = dn.l2norm_heads_ref(x["qkv"], 2 * Hk, dk, EPS)
    dec, beta = dn.ssm_gates_ref(x["a"], x["b"], x["dt_bias"], x["ssm_a"])
    _, S = _state(zero=True)
    a, _ = dn.gated_delta_rule_ref(u, dec, beta, S, Hk, True)
    b, _ = dn.gated_delta_rule_ref(u, dec, beta, S, Hk, False)
    # head 0 reads key head 0 both ways; head 1 reads key head 1 (tiled) vs 0 (grouped)
    np.testing.assert_allclose(a[:, :dv], b[:, :dv], rtol=1e-6)
    assert not np.allclose(a[:, dv : 2 * dv], b[:, dv : 2 * dv])


def test_gated_rmsnorm_matches_ref():
    x = _inputs(4)
    o = x["z"][::-1].copy()
    out = np.empty_like(o)
    dn.gated_rmsnorm(o, x["z"], x["norm_w"], EPS, out)
    np.testing.assert_allclose(out, dn.gated_rmsnorm_ref(o, x["z"], x["norm_w"], EPS), rtol=1e-5, atol=1e-6)


def _mix_args(x):
    return (x["conv_w"], x["dt_bias"], x["ssm_a"], x["norm_w"], EPS, Hk)


def test_mixer_matches_ref():
    T = 6
    x = _inputs(T)
    cs, S = _state()
    want, want_cs, want_S = dn.deltanet_mix_ref(x["qkv"], x["z"], x["a"], x["b"], cs, S, *_mix_args(x))
    y = dn.deltanet_mix(x["qkv"], x["z"], x["a"], x["b"], cs, S, *_mix_args(x))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cs, want_cs)
    np.testing.assert_allclose(S, want_S, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", [[1] * 9, [4, 5], [2, 2, 5], [9]])
def test_chunked_prefill_equals_token_by_token(split):
    """Feeding T tokens in any chunking gives the same outputs and the same final state."""
    T = sum(split)
    x = _inputs(T, seed=3)
    cs0, S0 = _state(zero=True)
    ref_y = dn.deltanet_mix(x["qkv"], x["z"], x["a"], x["b"], cs0.copy(), S0.copy(), *_mix_args(x))
    cs, S = cs0.copy(), S0.copy()
    ys, p = [], 0
    nbytes = (cs.nbytes, S.nbytes)
    for n in split:
        sl = slice(p, p + n)
        ys.append(dn.deltanet_mix(x["qkv"][sl], x["z"][sl], x["a"][sl], x["b"][sl], cs, S, *_mix_args(x)))
        assert (cs.nbytes, S.nbytes) == nbytes  # the state never grows
        p += n
    np.testing.assert_allclose(np.concatenate(ys), ref_y, rtol=1e-5, atol=1e-6)
    cs_full, S_full = cs0.copy(), S0.copy()
    dn.deltanet_mix(x["qkv"], x["z"], x["a"], x["b"], cs_full, S_full, *_mix_args(x))
    np.testing.assert_allclose(S, S_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cs, cs_full)


def test_sigmoid_gate_matches_ref():
    from engine import ops

    x = _inputs(3)["z"].reshape(3, Hv, dv) * 4
    np.testing.assert_allclose(ops.sigmoid(x), ops.sigmoid_ref(x), rtol=1e-6, atol=1e-7)
    assert ops.sigmoid(x).shape == x.shape and ops.sigmoid(x).dtype == np.float32
