"""Activation quantizers: what llama.cpp's CPU backend converts x to before a dot product.

    Q8_0 (for Q4_0, Q5_0, Q8_0, IQ4_NL weights), per 32 values:
        d = amax / 127 (stored fp16), q = round_half_even(x * 127 / amax)
    Q8_1 (for Q4_1, Q5_1), per 32: as Q8_0 plus s = fp16(d * sum(q))
    Q8_K (for the k-quants, IQ4_XS), per 256: max = the element of largest |x| (signed),
        iscale = -127 / max, q = min(127, round_half_even(iscale * x)), d = 1 / iscale (float32),
        plus bsums: sums of q per 16
    F16 / BF16 weights: x rounded to that type; F32: x as is.

Each quantizer takes X (T, K) float32 and returns a tuple of arrays the kernels take.
Every numba quantizer has a numpy twin (`*_ref`) with bit-identical integers. Tokens are
independent: one token (decode) runs serially, more (prefill) spread over the threads by the
same per-token code (a parallel region costs a few µs, more than one token's work).
"""

from __future__ import annotations

import numba
import numpy as np

from engine.jit import JIT_EXACT, JIT_EXACT_PAR
from engine.quants.common import F16_TO_F32, f32_to_f16_bits, f32_to_f16_ref


# The loops below vectorize without fast-math: |x| is found as the largest of the bit patterns
# with the sign cleared (for floats that are not NaN, the same order as the values; a float
# max reduction only vectorizes with fast-math), and codes are rounded to int32 (a float ->
# int64 conversion is scalar below AVX-512). 2-3x faster than a compare-and-branch loop.
# A block holding a value that is not finite (a model with broken weights) is quantized from a
# copy where that value is 0: the garbage stays in that value instead of turning the block's
# scale into NaN or infinity (the loop before, by its `>`, left a NaN out of the maximum).
_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)


@numba.njit(**JIT_EXACT)
def _finite_copy(x, o, n, scratch, scratch_u):
    """x[o:o+n] into scratch[:n] with every NaN / infinity as 0; the largest |x| bit pattern."""
    m = np.uint32(0)
    for j in range(n):
        v = x[o + j]
        scratch[j] = v if abs(v) <= np.float32(3.4028235e38) else np.float32(0.0)
        m = max(m, scratch_u[j] & _ABS)
    return m


@numba.njit(**JIT_EXACT)
def _q8_0_token(X, xq, xd, with_sums, xs, lut, t):
    K = X.shape[1]
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    fin = np.empty(32, np.float32)
    fin_u = fin.view(np.uint32)
    x = X[t]
    q8 = xq[t]
    for b in range(K // 32):
        o = b * 32
        m = np.uint32(0)
        for j in range(32):
            fin[j] = x[o + j]
            m = max(m, fin_u[j] & _ABS)
        if m >= _INF:
            m = _finite_copy(x, o, 32, fin, fin_u)
        su[0] = m
        amax = sf[0]
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        s = 0
        for j in range(32):
            q = np.int32(np.rint(fin[j] * inv))
            q8[o + j] = q
            s += q
        xd[t, b] = lut[f32_to_f16_bits(d, sf, su)]
        if with_sums:
            xs[t, b] = lut[f32_to_f16_bits(d * np.float32(s), sf, su)]


@numba.njit(**JIT_EXACT)
def _q8_0_kernel(X, xq, xd, with_sums, xs, lut):
    for t in range(X.shape[0]):
        _q8_0_token(X, xq, xd, with_sums, xs, lut, t)


@numba.njit(**JIT_EXACT_PAR)
def _q8_0_kernel_par(X, xq, xd, with_sums, xs, lut):
    for t in numba.prange(X.shape[0]):
        _q8_0_token(X, xq, xd, with_sums, xs, lut, t)


def quantize_q8_0(X):
    T, K = X.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // 32), np.float32)
    (_q8_0_kernel if T == 1 else _q8_0_kernel_par)(X, xq, xd, False, xd, F16_TO_F32)
    return xq, xd


def quantize_q8_1(X):
    T, K = X.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // 32), np.float32)
    xs = np.empty((T, K // 32), np.float32)
    (_q8_0_kernel if T == 1 else _q8_0_kernel_par)(X, xq, xd, True, xs, F16_TO_F32)
    return xq, xd, xs


def _finite_ref(X):
    """X with every NaN / infinity as 0, as the kernels quantize it."""
    return np.where(np.isfinite(X), X, np.float32(0.0)).astype(np.float32)


def _q8_blocks_ref(X):
    T, K = X.shape
    xb = _finite_ref(X).reshape(T, K // 32, 32)
    amax = np.abs(xb).max(axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint((xb * inv[..., None]).astype(np.float32)).astype(np.int8)
    return q, d


def quantize_q8_0_ref(X):
    q, d = _q8_blocks_ref(X)
    return q.reshape(X.shape), f32_to_f16_ref(d)


def quantize_q8_1_ref(X):
    q, d = _q8_blocks_ref(X)
    s = f32_to_f16_ref(d * q.astype(np.int64).sum(axis=-1).astype(np.float32))
    return q.reshape(X.shape), f32_to_f16_ref(d), s


@numba.njit(**JIT_EXACT)
def _q8_k_token(X, xq, xd, bsums, t):
    K = X.shape[1]
    fin = np.empty(256, np.float32)
    fin_u = fin.view(np.uint32)
    xu = X[t].view(np.uint32)
    x = X[t]
    q8 = xq[t]
    for b in range(K // 256):
        o = b * 256
        m = np.uint32(0)
        for j in range(o, o + 256):
            m = max(m, xu[j] & _ABS)
        src, srcu, so = x, xu, o
        if m >= _INF:
            m = _finite_copy(x, o, 256, fin, fin_u)
            src, srcu, so = fin, fin_u, 0
        if m == 0:
            xd[t, b] = 0
            for j in range(o, o + 256):
                q8[j] = 0
            for j in range(16):
                bsums[t, b * 16 + j] = 0
            continue
        mx = np.float32(0.0)
        for j in range(so, so + 256):   # the first element of largest |x|, with its sign
            if srcu[j] & _ABS == m:
                mx = src[j]
                break
        iscale = np.float32(-127.0) / mx
        for g in range(16):
            s = 0
            for j in range(16):
                q = min(np.int32(np.rint(iscale * src[so + g * 16 + j])), np.int32(127))
                q8[o + g * 16 + j] = q
                s += q
            bsums[t, b * 16 + g] = s
        xd[t, b] = np.float32(1.0) / iscale


@numba.njit(**JIT_EXACT)
def _q8_k_kernel(X, xq, xd, bsums):
    for t in range(X.shape[0]):
        _q8_k_token(X, xq, xd, bsums, t)


@numba.njit(**JIT_EXACT_PAR)
def _q8_k_kernel_par(X, xq, xd, bsums):
    for t in numba.prange(X.shape[0]):
        _q8_k_token(X, xq, xd, bsums, t)


def quantize_q8_k(X):
    T, K = X.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // 256), np.float32)
    bsums = np.empty((T, K // 16), np.int32)
    (_q8_k_kernel if T == 1 else _q8_k_kernel_par)(X, xq, xd, bsums)
    return xq, xd, bsums


def quantize_q8_k_ref(X):
    T, K = X.shape
    xb = _finite_ref(X).reshape(T, K // 256, 256)
    idx = np.abs(xb).argmax(axis=-1)
    mx = np.take_along_axis(xb, idx[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.rint((iscale[..., None] * xb).astype(np.float32)), 127).astype(np.int8)
    bsums = q.reshape(T, K // 16, 16).astype(np.int32).sum(axis=-1)
    return q.reshape(T, K), d, bsums.astype(np.int32)


# -- float activations: the kernels take a float32 array holding the rounded values
def quantize_f32(X):
    return (np.ascontiguousarray(X, dtype=np.float32),)


def quantize_f16(X):
    return (f32_to_f16_ref(X),)


def _bf16_round(X):
    u = np.ascontiguousarray(X, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000  # round half to even
    return u.astype(np.uint32).view(np.float32)


def quantize_bf16(X):
    return (_bf16_round(X),)


QUANTIZERS = {"q8_0": quantize_q8_0, "q8_1": quantize_q8_1, "q8_k": quantize_q8_k,
              "f32": quantize_f32, "f16": quantize_f16, "bf16": quantize_bf16}
QUANTIZERS_REF = {"q8_0": quantize_q8_0_ref, "q8_1": quantize_q8_1_ref, "q8_k": quantize_q8_k_ref,
                  "f32": quantize_f32, "f16": quantize_f16, "bf16": quantize_bf16}


def _deq_blocks(q, d, block):
    T, K = q.shape
    return (q.reshape(T, K // block, block).astype(np.float64) * d[..., None]).reshape(T, K)


DEQUANT_REF = {
    "q8_0": lambda a: _deq_blocks(a[0], a[1], 32),
    "q8_1": lambda a: _deq_blocks(a[0], a[1], 32),
    "q8_k": lambda a: _deq_blocks(a[0], a[1], 256),
    "f32": lambda a: a[0].astype(np.float64),
    "f16": lambda a: a[0].astype(np.float64),
    "bf16": lambda a: a[0].astype(np.float64),
}
