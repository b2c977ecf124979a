"""Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention) kernels, as llama.cpp's CPU backend runs them.

One DeltaNet layer, for T new tokens (shapes per token; docs/models.md, qwen35):

    qkv  = W_qkv h                          (conv_dim,)  = [q (Hk*dk) | k (Hk*dk) | v (Hv*dv)]
    u    = silu(causal_conv(qkv))           conv window: the last K-1 raw qkv rows (conv_state)
    q, k = l2norm(q per key head), l2norm(k per key head)
    per v-head h (key head kh = h % Hk "tiled" [qwen35], or h // (Hv/Hk) "grouped" [qwen3next]):
        S_h  = exp(g_h) * S_h                              g_h = ssm_a[h] * softplus(a_h + dt_bias[h])
        S_h += outer(beta_h * (v_h - S_h k), k)            beta_h = sigmoid(b_h)
        o_h  = (S_h q) / sqrt(dk)                          read-out after the update
    y_h  = RMSNorm(o_h) * ssm_norm * silu(z_h)

The state S is stored per v-head as (dv, dk): row j holds the dk coefficients of value
channel j, so decay, S k, the rank-1 update and S q all run along contiguous rows, one row
at a time. Prefill runs the exact token-by-token recurrence (what llama.cpp does on CPU),
with the heads in parallel; a T-token call equals T one-token calls.

Every kernel has a plain numpy twin (`*_ref`), compared in tests/engine/test_deltanet.py.
Numerics: float32 everywhere, the norm sums in float64 (as ggml).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange

from engine import jit

_JIT: dict[str, Any] = jit.JIT        # typed for numba.njit's keyword arguments
_JIT_PAR: dict[str, Any] = jit.JIT_PAR


# --------------------------------------------------------------------------- conv
@numba.njit(**_JIT_PAR)
def conv1d_silu(x, conv_state, w, out):
    """Causal depthwise conv over [conv_state, x] then SiLU; slides conv_state forward.

    x: (T, C) raw projections; conv_state: (K-1, C), oldest first; w: (K, C) taps-major (the
    transpose of the GGUF tensor's numpy view), tap 0 multiplies the oldest input; out: (T, C).
    Afterwards conv_state holds the last K-1 raw inputs. Threads take blocks of channels; the
    inner loops run along contiguous channels. Taps are summed oldest first, in float32.
    """
    T, C = x.shape
    K = w.shape[0]
    km1 = K - 1
    CB = 512
    for cb in prange((C + CB - 1) // CB):
        c0 = cb * CB
        c1 = min(C, c0 + CB)
        acc = np.empty(c1 - c0, dtype=np.float32)
        for t in range(T):
            acc[:] = 0.0
            for i in range(K):
                j = t + i  # row of the virtual window [conv_state (K-1 rows), x (T rows)]
                src = conv_state[j, c0:c1] if j < km1 else x[j - km1, c0:c1]
                wi = w[i, c0:c1]
                for c in range(c1 - c0):
                    acc[c] += src[c] * wi[c]
            o = out[t, c0:c1]
            for c in range(c1 - c0):
                s = acc[c]
                o[c] = s / (np.float32(1.0) + np.exp(-s))
        # slide the window: the new state is the last K-1 rows of [conv_state, x]
        if km1 <= T:
            for j in range(km1):
                conv_state[j, c0:c1] = x[T - km1 + j, c0:c1]
        else:
            for j in range(km1 - T):
                conv_state[j, c0:c1] = conv_state[j + T, c0:c1]
            for j in range(T):
                conv_state[km1 - T + j, c0:c1] = x[j, c0:c1]


def conv1d_silu_ref(x, conv_state, w):
    """w: (K, C). Returns (out, new_conv_state); does not modify its arguments."""
    km1 = conv_state.shape[0]
    T = x.shape[0]
    win = np.concatenate([conv_state, x], axis=0).astype(np.float64)  # (K-1+T, C)
    K = w.shape[0]
    c = np.zeros(x.shape, dtype=np.float64)
    for i in range(K):
        c += win[i : i + T] * w[i].astype(np.float64)[None, :]
    out = (c / (1.0 + np.exp(-c))).astype(np.float32)
    return out, win[T : T + km1].astype(np.float32)


# --------------------------------------------------------------------------- L2 norm
@numba.njit(**_JIT)
def l2norm_heads(x, n_heads, d, eps):
    """In place: x[t, h*d:(h+1)*d] /= max(||.||_2, eps) for h < n_heads (the first n_heads*d columns).

    x: (T, W) with W >= n_heads*d (the conv output: q and k heads are its first 2*Hk*dk columns).
    """
    T = x.shape[0]
    for t in range(T):
        for h in range(n_heads):
            o = h * d
            s = 0.0  # float64, as ggml_l2_norm
            for i in range(d):
                v = np.float64(x[t, o + i])
                s += v * v
            scale = np.float32(1.0 / max(np.sqrt(s), eps))
            for i in range(d):
                x[t, o + i] *= scale


def l2norm_heads_ref(x, n_heads, d, eps):
    y = x.copy()
    T = x.shape[0]
    v = x[:, : n_heads * d].reshape(T, n_heads, d).astype(np.float64)
    n = np.maximum(np.sqrt((v * v).sum(-1, keepdims=True)), eps)
    y[:, : n_heads * d] = (v / n).reshape(T, n_heads * d).astype(np.float32)
    return y


# --------------------------------------------------------------------------- gates
@numba.njit(**_JIT)
def ssm_gates(a, b, dt_bias, ssm_a, decay, beta):
    """decay = exp(ssm_a * softplus(a + dt_bias)), beta = sigmoid(b). All (T, Hv) but the (Hv,) params."""
    T, H = a.shape
    for t in range(T):
        for h in range(H):
            x = a[t, h] + dt_bias[h]
            sp = x if x > np.float32(20.0) else np.float32(np.log1p(np.exp(x)))
            decay[t, h] = np.exp(ssm_a[h] * sp)
            beta[t, h] = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[t, h]))


def ssm_gates_ref(a, b, dt_bias, ssm_a):
    x = (a + dt_bias).astype(np.float64)
    sp = np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))
    decay = np.exp(ssm_a.astype(np.float64) * sp).astype(np.float32)
    beta = (1.0 / (1.0 + np.exp(-b.astype(np.float64)))).astype(np.float32)
    return decay, beta


# --------------------------------------------------------------------------- delta rule
@numba.njit(**_JIT_PAR)
def gated_delta_rule(u, decay, beta, state, n_k_heads, tiled, out):
    """The gated delta rule over T tokens, token by token, v-heads in parallel.

    u:     (T, 2*Hk*dk + Hv*dv) conv output with q, k already L2-normalised
    decay: (T, Hv) exp(g);  beta: (T, Hv)
    state: (Hv, dv, dk) float32, updated in place
    tiled: v-head h reads key head h % Hk (qwen35); else h // (Hv/Hk) (qwen3next)
    out:   (T, Hv*dv) the read-outs o_h (before the gated norm)
    """
    T = u.shape[0]
    Hv, dv, dk = state.shape
    Hk = n_k_heads
    rep = Hv // Hk
    k_off = Hk * dk
    v_off = 2 * Hk * dk
    scale = np.float32(1.0 / np.sqrt(dk))
    for h in prange(Hv):
        kh = h % Hk if tiled else h // rep
        qo = kh * dk
        ko = k_off + kh * dk
        vo = v_off + h * dv
        S = state[h]
        for t in range(T):
            g = decay[t, h]
            bt = beta[t, h]
            ut = u[t]
            kv = ut[ko : ko + dk]  # 1-D views: contiguous inner loops that vectorize
            qv = ut[qo : qo + dk]
            vv = ut[vo : vo + dv]
            ot = out[t]
            for j in range(dv):
                row = S[j]
                m = np.float32(0.0)
                for i in range(dk):
                    r = row[i] * g
                    row[i] = r
                    m += r * kv[i]
                dlt = bt * (vv[j] - m)
                o = np.float32(0.0)
                for i in range(dk):
                    r = row[i] + kv[i] * dlt
                    row[i] = r
                    o += r * qv[i]
                ot[h * dv + j] = o * scale


def gated_delta_rule_ref(u, decay, beta, state, n_k_heads, tiled):
    """Returns (out, new_state); float64 inside. Does not modify its arguments."""
    T = u.shape[0]
    Hv, dv, dk = state.shape
    Hk = n_k_heads
    S = state.astype(np.float64).copy()
    out = np.zeros((T, Hv * dv), dtype=np.float64)
    q = u[:, : Hk * dk].reshape(T, Hk, dk).astype(np.float64)
    k = u[:, Hk * dk : 2 * Hk * dk].reshape(T, Hk, dk).astype(np.float64)
    v = u[:, 2 * Hk * dk :].reshape(T, Hv, dv).astype(np.float64)
    heads = np.arange(Hv)
    kh = heads % Hk if tiled else heads // (Hv // Hk)
    for t in range(T):
        S *= decay[t].astype(np.float64)[:, None, None]
        kt, qt = k[t, kh], q[t, kh]                          # (Hv, dk)
        mem = np.einsum("hji,hi->hj", S, kt)                 # (Hv, dv)
        dlt = beta[t].astype(np.float64)[:, None] * (v[t] - mem)
        S += dlt[:, :, None] * kt[:, None, :]
        out[t] = (np.einsum("hji,hi->hj", S, qt) / np.sqrt(dk)).reshape(-1)
    return out.astype(np.float32), S.astype(np.float32)


# --------------------------------------------------------------------------- gated RMSNorm
@numba.njit(**_JIT_PAR)
def gated_rmsnorm(o, z, w, eps, out):
    """out = RMSNorm(o per head of len(w)) * w * silu(z).   o, z, out: (T, H*d); w: (d,)"""
    T, W = o.shape
    d = w.shape[0]
    H = W // d
    for job in prange(T * H):
        t = job // H
        base = (job % H) * d
        ov = o[t, base : base + d]
        zv = z[t, base : base + d]
        dst = out[t, base : base + d]
        s = 0.0
        for i in range(d):
            v = np.float64(ov[i])
            s += v * v
        sc = np.float32(1.0 / np.sqrt(s / d + eps))
        for i in range(d):
            zz = zv[i]
            dst[i] = ov[i] * sc * w[i] * (zz / (np.float32(1.0) + np.exp(-zz)))


def gated_rmsnorm_ref(o, z, w, eps):
    T, W = o.shape
    d = w.shape[0]
    o3 = o.reshape(T, W // d, d).astype(np.float64)
    sc = (1.0 / np.sqrt((o3 * o3).mean(-1, keepdims=True) + eps)).astype(np.float32)
    z3 = z.reshape(T, W // d, d).astype(np.float64)
    silu = z3 / (1.0 + np.exp(-z3))
    return (o.reshape(T, W // d, d) * sc * w * silu).reshape(T, W).astype(np.float32)


# --------------------------------------------------------------------------- one layer's mixer
def deltanet_mix(qkv, z, a, b, conv_state, state, conv_w, dt_bias, ssm_a, norm_w, eps, n_k_heads, tiled=True):
    """The DeltaNet token mixer between the projections: returns y (T, Hv*dv) for W_ssm_out.

    conv_w: (K, conv_dim) taps-major float32.
    qkv (T, conv_dim), z (T, Hv*dv), a and b (T, Hv): the projections of the normed input.
    conv_state (K-1, conv_dim) and state (Hv, dv, dk) are updated in place.
    The caller has validated every shape against the file.
    """
    T = qkv.shape[0]
    Hv, dv, dk = state.shape
    u = np.empty_like(qkv)
    conv1d_silu(qkv, conv_state, conv_w, u)
    l2norm_heads(u, 2 * n_k_heads, dk, eps)
    decay = np.empty((T, Hv), dtype=np.float32)
    beta = np.empty((T, Hv), dtype=np.float32)
    ssm_gates(a, b, dt_bias, ssm_a, decay, beta)
    o = np.empty((T, Hv * dv), dtype=np.float32)
    gated_delta_rule(u, decay, beta, state, n_k_heads, tiled, o)
    y = np.empty_like(o)
    gated_rmsnorm(o, z, norm_w, eps, y)
    return y


def deltanet_mix_ref(qkv, z, a, b, conv_state, state, conv_w, dt_bias, ssm_a, norm_w, eps, n_k_heads, tiled=True):
    """numpy twin of deltanet_mix: returns (y, new_conv_state, new_state)."""
    dk = state.shape[2]
    u, cs = conv1d_silu_ref(qkv, conv_state, conv_w)
    u = l2norm_heads_ref(u, 2 * n_k_heads, dk, eps)
    decay, beta = ssm_gates_ref(a, b, dt_bias, ssm_a)
    o, S = gated_delta_rule_ref(u, decay, beta, state, n_k_heads, tiled)
    return gated_rmsnorm_ref(o, z, norm_w, eps), cs, S
