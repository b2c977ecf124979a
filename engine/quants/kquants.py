"""The 256-value super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS.

Block layouts (ggml-common.h), d/dmin fp16:
    Q2_K   84 B  {scales[16], qs[64], d, dmin}          16 groups of 16: sc = s&15, m = s>>4, q 2-bit
    Q3_K  110 B  {hmask[32], qs[64], scales[12], d}     16 groups of 16: 6-bit sc - 32, q 3-bit - 4
    Q4_K  144 B  {d, dmin, scales[12], qs[128]}         8 groups of 32: 6-bit (sc, m), q 4-bit
    Q5_K  176 B  {d, dmin, scales[12], qh[32], qs[128]} as Q4_K with a 5th bit from qh
    Q6_K  210 B  {ql[128], qh[64], scales[16] int8, d}  16 groups of 16: q 6-bit - 32
    IQ4_XS 136 B {d, scales_h u16, scales_l[4], qs[128]} 8 groups of 32: 6-bit sc - 32, non-linear q

All use Q8_K activations (per 256: int8 q, float d, per-16 sums). A kernel sums integer
products per group exactly, weights them with the integer group scales, and applies
d·d_x (and dmin·d_x times the group sums of x for the min term) once per super-block.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from engine.jit import JIT, JIT_PAR
from engine.quants.common import f16
from engine.quants.legacy import IQ4NL_VALUES, blocks, fp16_field


# --------------------------------------------------------------------------- scale unpacking
def _scale_min_k4_ref(s: np.ndarray):
    """12 packed bytes (..., 12) -> 8 six-bit scales and 8 mins, each (..., 8)."""
    s = s.astype(np.int32)
    sc = np.empty(s.shape[:-1] + (8,), np.int32)
    mn = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j] = s[..., j] & 63
            mn[..., j] = s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 15) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    return sc, mn


@numba.njit(inline="always", **JIT)
def _scale_min_k4(row, o, j):
    """(scale, min) of group j from the 12 bytes at row[o:]."""
    if j < 4:
        return np.int32(row[o + j]) & 63, np.int32(row[o + j + 4]) & 63
    a = np.int32(row[o + j + 4])
    return ((a & 15) | ((np.int32(row[o + j - 4]) >> 6) << 4),
            (a >> 4) | ((np.int32(row[o + j]) >> 6) << 4))


def _q3_scales_ref(s: np.ndarray) -> np.ndarray:
    """12 packed bytes -> 16 six-bit scales (unsigned; the format subtracts 32)."""
    s = s.astype(np.int32)
    out = np.empty(s.shape[:-1] + (16,), np.int32)
    for k in range(16):
        lo = s[..., k % 8] & 15 if k < 8 else s[..., k - 8] >> 4
        hi = (s[..., 8 + k % 4] >> (2 * (k // 4))) & 3
        out[..., k] = lo | (hi << 4)
    return out


@numba.njit(inline="always", **JIT)
def _q3_scale(row, o, k):
    if k < 8:
        lo = np.int32(row[o + k % 8]) & 15
    else:
        lo = np.int32(row[o + k - 8]) >> 4
    hi = (np.int32(row[o + 8 + k % 4]) >> (2 * (k // 4))) & 3
    return (lo | (hi << 4)) - 32


# --------------------------------------------------------------------------- numpy references
def _rows(y):
    return y.reshape(y.shape[0], -1).astype(np.float32)


def dequantize_q2_k(raw):
    b = blocks(raw, 84)
    sc = b[..., 0:16].astype(np.int32)
    qs = b[..., 16:80].astype(np.int32)
    d, dmin = fp16_field(b, 80), fp16_field(b, 82)
    y = np.empty(b.shape[:-1] + (256,), np.float32)
    for n in range(2):
        for j in range(4):
            for k in range(2):
                g = 8 * n + 2 * j + k
                q = (qs[..., 32 * n + 16 * k : 32 * n + 16 * k + 16] >> (2 * j)) & 3
                y[..., 16 * g : 16 * g + 16] = d * (sc[..., g : g + 1] & 15) * q - dmin * (sc[..., g : g + 1] >> 4)
    return _rows(y)


def dequantize_q3_k(raw):
    b = blocks(raw, 110)
    hm = b[..., 0:32].astype(np.int32)
    qs = b[..., 32:96].astype(np.int32)
    sc = _q3_scales_ref(b[..., 96:108]) - 32
    d = fp16_field(b, 108)
    y = np.empty(b.shape[:-1] + (256,), np.float32)
    for n in range(2):
        for j in range(4):
            bit = 1 << (4 * n + j)
            for k in range(2):
                g = 8 * n + 2 * j + k
                lo = slice(16 * k, 16 * k + 16)
                q = ((qs[..., 32 * n + 16 * k : 32 * n + 16 * k + 16] >> (2 * j)) & 3) - np.where(hm[..., lo] & bit, 0, 4)
                y[..., 16 * g : 16 * g + 16] = d * sc[..., g : g + 1] * q
    return _rows(y)


def dequantize_q4_k(raw):
    b = blocks(raw, 144)
    d, dmin = fp16_field(b, 0), fp16_field(b, 2)
    sc, mn = _scale_min_k4_ref(b[..., 4:16])
    qs = b[..., 16:144].astype(np.int32)
    y = np.empty(b.shape[:-1] + (256,), np.float32)
    for j in range(4):
        q = qs[..., 32 * j : 32 * j + 32]
        for k, codes in enumerate((q & 15, q >> 4)):
            g = 2 * j + k
            y[..., 32 * g : 32 * g + 32] = d * sc[..., g : g + 1] * codes - dmin * mn[..., g : g + 1]
    return _rows(y)


def dequantize_q5_k(raw):
    b = blocks(raw, 176)
    d, dmin = fp16_field(b, 0), fp16_field(b, 2)
    sc, mn = _scale_min_k4_ref(b[..., 4:16])
    qh = b[..., 16:48].astype(np.int32)
    qs = b[..., 48:176].astype(np.int32)
    y = np.empty(b.shape[:-1] + (256,), np.float32)
    for j in range(4):
        q = qs[..., 32 * j : 32 * j + 32]
        for k, codes in enumerate((q & 15, q >> 4)):
            g = 2 * j + k
            codes = codes + (((qh >> g) & 1) << 4)
            y[..., 32 * g : 32 * g + 32] = d * sc[..., g : g + 1] * codes - dmin * mn[..., g : g + 1]
    return _rows(y)


def dequantize_q6_k(raw):
    b = blocks(raw, 210)
    ql = b[..., 0:128].astype(np.int32)
    qh = b[..., 128:192].astype(np.int32)
    sc = b[..., 192:208].view(np.int8).astype(np.int32)
    d = fp16_field(b, 208)
    y = np.empty(b.shape[:-1] + (256,), np.float32)
    for n in range(2):
        L, H = ql[..., 64 * n : 64 * n + 64], qh[..., 32 * n : 32 * n + 32]
        parts = (
            (L[..., 0:32] & 15) | (((H >> 0) & 3) << 4),
            (L[..., 32:64] & 15) | (((H >> 2) & 3) << 4),
            (L[..., 0:32] >> 4) | (((H >> 4) & 3) << 4),
            (L[..., 32:64] >> 4) | (((H >> 6) & 3) << 4),
        )
        for p, q in enumerate(parts):
            for half in range(2):
                g = 8 * n + 2 * p + half
                seg = slice(128 * n + 32 * p + 16 * half, 128 * n + 32 * p + 16 * half + 16)
                y[..., seg] = d * sc[..., g : g + 1] * (q[..., 16 * half : 16 * half + 16] - 32)
    return _rows(y)


def dequantize_iq4_xs(raw):
    b = blocks(raw, 136)
    d = fp16_field(b, 0)
    sh = np.ascontiguousarray(b[..., 2:4]).view("<u2").astype(np.int32)
    sl = b[..., 4:8].astype(np.int32)
    qs = b[..., 8:136].astype(np.int32)
    y = np.empty(b.shape[:-1] + (256,), np.float32)
    for ib in range(8):
        ls = ((sl[..., ib // 2 : ib // 2 + 1] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
        q = qs[..., 16 * ib : 16 * ib + 16]
        codes = np.concatenate([q & 15, q >> 4], axis=-1)
        y[..., 32 * ib : 32 * ib + 32] = d * (ls - 32) * IQ4NL_VALUES[codes]
    return _rows(y)


# --------------------------------------------------------------------------- numba kernels
@numba.njit(**JIT_PAR)
def matmul_q2_k(w, xq, xd, bsums, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 256
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 84, b * 256
                sumi = np.int32(0)
                summ = np.int32(0)
                for h in range(2):
                    for j in range(4):
                        for k in range(2):
                            g = 8 * h + 2 * j + k
                            sc = np.int32(row[o + g])
                            qo, go = o + 16 + 32 * h + 16 * k, xo + 16 * g
                            isum = np.int32(0)
                            for l in range(16):
                                isum += np.int32((row[qo + l] >> (2 * j)) & 3) * np.int32(x[go + l])
                            sumi += (sc & 15) * isum
                            summ += (sc >> 4) * bsums[t, b * 16 + g]
                acc += xd[t, b] * (f16(row, o + 80, lut) * np.float32(sumi) - f16(row, o + 82, lut) * np.float32(summ))
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_q3_k(w, xq, xd, bsums, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 256
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 110, b * 256
                sumi = np.int32(0)
                for h in range(2):
                    for j in range(4):
                        bit = 1 << (4 * h + j)
                        for k in range(2):
                            g = 8 * h + 2 * j + k
                            qo, go, ho = o + 32 + 32 * h + 16 * k, xo + 16 * g, o + 16 * k
                            isum = np.int32(0)
                            for l in range(16):
                                q = np.int32((row[qo + l] >> (2 * j)) & 3) - np.int32(0 if row[ho + l] & bit else 4)
                                isum += q * np.int32(x[go + l])
                            sumi += _q3_scale(row, o + 96, g) * isum
                acc += xd[t, b] * f16(row, o + 108, lut) * np.float32(sumi)
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_q4_k(w, xq, xd, bsums, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 256
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 144, b * 256
                sumi = np.int32(0)
                summ = np.int32(0)
                for j in range(4):
                    sc0, m0 = _scale_min_k4(row, o + 4, 2 * j)
                    sc1, m1 = _scale_min_k4(row, o + 4, 2 * j + 1)
                    qo, go = o + 16 + 32 * j, xo + 64 * j
                    i0 = np.int32(0)
                    i1 = np.int32(0)
                    for l in range(32):
                        q = np.int32(row[qo + l])
                        i0 += (q & 15) * np.int32(x[go + l])
                        i1 += (q >> 4) * np.int32(x[go + 32 + l])
                    sumi += sc0 * i0 + sc1 * i1
                    bs = b * 16 + 4 * j
                    summ += m0 * (bsums[t, bs] + bsums[t, bs + 1]) + m1 * (bsums[t, bs + 2] + bsums[t, bs + 3])
                acc += xd[t, b] * (f16(row, o, lut) * np.float32(sumi) - f16(row, o + 2, lut) * np.float32(summ))
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_q5_k(w, xq, xd, bsums, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 256
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 176, b * 256
                sumi = np.int32(0)
                summ = np.int32(0)
                for j in range(4):
                    sc0, m0 = _scale_min_k4(row, o + 4, 2 * j)
                    sc1, m1 = _scale_min_k4(row, o + 4, 2 * j + 1)
                    qo, ho, go = o + 48 + 32 * j, o + 16, xo + 64 * j
                    i0 = np.int32(0)
                    i1 = np.int32(0)
                    for l in range(32):
                        q = np.int32(row[qo + l])
                        hb = np.int32(row[ho + l])
                        i0 += ((q & 15) | (((hb >> (2 * j)) & 1) << 4)) * np.int32(x[go + l])
                        i1 += ((q >> 4) | (((hb >> (2 * j + 1)) & 1) << 4)) * np.int32(x[go + 32 + l])
                    sumi += sc0 * i0 + sc1 * i1
                    bs = b * 16 + 4 * j
                    summ += m0 * (bsums[t, bs] + bsums[t, bs + 1]) + m1 * (bsums[t, bs + 2] + bsums[t, bs + 3])
                acc += xd[t, b] * (f16(row, o, lut) * np.float32(sumi) - f16(row, o + 2, lut) * np.float32(summ))
            out[t, n] = acc


@numba.njit(inline="always", **JIT)
def _i8(v):
    v = np.int32(v)
    return v - 256 if v > 127 else v


@numba.njit(**JIT_PAR)
def matmul_q6_k(w, xq, xd, bsums, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 256
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 210, b * 256
                sumi = np.int32(0)
                for h in range(2):
                    lo, ho, so, yo = o + 64 * h, o + 128 + 32 * h, o + 192 + 8 * h, xo + 128 * h
                    for half in range(2):
                        i1 = np.int32(0)
                        i2 = np.int32(0)
                        i3 = np.int32(0)
                        i4 = np.int32(0)
                        for l in range(16 * half, 16 * half + 16):
                            a = np.int32(row[lo + l])
                            c = np.int32(row[lo + 32 + l])
                            hb = np.int32(row[ho + l])
                            i1 += (((a & 15) | ((hb & 3) << 4)) - 32) * np.int32(x[yo + l])
                            i2 += (((c & 15) | (((hb >> 2) & 3) << 4)) - 32) * np.int32(x[yo + 32 + l])
                            i3 += (((a >> 4) | (((hb >> 4) & 3) << 4)) - 32) * np.int32(x[yo + 64 + l])
                            i4 += (((c >> 4) | (((hb >> 6) & 3) << 4)) - 32) * np.int32(x[yo + 96 + l])
                        sumi += (_i8(row[so + half]) * i1 + _i8(row[so + 2 + half]) * i2
                                 + _i8(row[so + 4 + half]) * i3 + _i8(row[so + 6 + half]) * i4)
                acc += xd[t, b] * f16(row, o + 208, lut) * np.float32(sumi)
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_iq4_xs(w, xq, xd, bsums, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 256
    kv = IQ4NL_VALUES
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 136, b * 256
                sh = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8)
                sumi = np.int32(0)
                for ib in range(8):
                    ls = ((np.int32(row[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
                    qo, go = o + 8 + 16 * ib, xo + 32 * ib
                    isum = np.int32(0)
                    for l in range(16):
                        q = row[qo + l]
                        isum += np.int32(kv[q & 15]) * np.int32(x[go + l]) + np.int32(kv[q >> 4]) * np.int32(x[go + 16 + l])
                    sumi += (ls - 32) * isum
                acc += xd[t, b] * f16(row, o, lut) * np.float32(sumi)
            out[t, n] = acc
