"""The 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Block layouts (ggml-common.h), d/m fp16:
    Q4_0   18 B  {d, qs[16]}            y[j] = d*(lo_j - 8),  y[j+16] = d*(hi_j - 8)
    Q4_1   20 B  {d, m, qs[16]}         y[j] = d*lo_j + m,    y[j+16] = d*hi_j + m
    Q5_0   22 B  {d, qh[4], qs[16]}     5th bit of y[j] is qh bit j, of y[j+16] bit j+16; minus 16
    Q5_1   24 B  {d, m, qh[4], qs[16}}  as Q5_0 without the -16, plus m
    Q8_0   34 B  {d, qs[32] int8}       y[j] = d*q_j
    IQ4_NL 18 B  {d, qs[16]}            y[j] = d*KVALUES[lo_j], y[j+16] = d*KVALUES[hi_j]

Kernels take the activation quantized to Q8_0 (or Q8_1 for Q4_1/Q5_1), sum the integer
products of a block exactly in int32 and apply the scales per block, as llama.cpp does.
`dequantize_*` are the numpy references (tested against gguf.quants.dequantize).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from engine.jit import JIT, JIT_PAR
from engine.quants.common import f16

IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


# --------------------------------------------------------------------------- numpy references
def blocks(raw: np.ndarray, type_size: int) -> np.ndarray:
    R, rb = raw.shape
    return raw.reshape(R, rb // type_size, type_size)


def fp16_field(b: np.ndarray, o: int) -> np.ndarray:
    """The fp16 at byte offset o of every block, as float32 (..., 1)."""
    return np.ascontiguousarray(b[..., o : o + 2]).view(np.float16).astype(np.float32)


def u32_field(b: np.ndarray, o: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., o : o + 4]).view("<u4").astype(np.uint32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """qh (..., 1) uint32 -> (..., 32) 0 or 16: bit j of qh is the 5th bit of value j."""
    return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)


def _rows(y: np.ndarray) -> np.ndarray:
    return y.reshape(y.shape[0], -1).astype(np.float32)


def dequantize_q4_0(raw):
    b = blocks(raw, 18)
    return _rows(fp16_field(b, 0) * (_nibbles(b[..., 2:18]) - 8))


def dequantize_q4_1(raw):
    b = blocks(raw, 20)
    return _rows(fp16_field(b, 0) * _nibbles(b[..., 4:20]) + fp16_field(b, 2))


def dequantize_q5_0(raw):
    b = blocks(raw, 22)
    q = _nibbles(b[..., 6:22]) | _high_bits(u32_field(b, 2))
    return _rows(fp16_field(b, 0) * (q - 16))


def dequantize_q5_1(raw):
    b = blocks(raw, 24)
    q = _nibbles(b[..., 8:24]) | _high_bits(u32_field(b, 4))
    return _rows(fp16_field(b, 0) * q + fp16_field(b, 2))


def dequantize_q8_0(raw):
    b = blocks(raw, 34)
    return _rows(fp16_field(b, 0) * b[..., 2:34].view(np.int8).astype(np.float32))


def dequantize_iq4_nl(raw):
    b = blocks(raw, 18)
    return _rows(fp16_field(b, 0) * IQ4NL_VALUES[_nibbles(b[..., 2:18])].astype(np.float32))


# --------------------------------------------------------------------------- numba kernels
# out[t, n] = sum over blocks of W[n] . X[t]; prange over rows so each weight row is
# streamed once; the quantized activations stay in cache for all T columns.


@numba.njit(**JIT_PAR)
def matmul_q4_0(w, xq, xd, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 32
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 18 + 2, b * 32
                isum = np.int32(0)
                for j in range(16):
                    q = np.int32(row[o + j])
                    isum += np.int32((q & 15) - 8) * np.int32(x[xo + j]) + np.int32((q >> 4) - 8) * np.int32(x[xo + 16 + j])
                acc += f16(row, b * 18, lut) * xd[t, b] * np.float32(isum)
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_q4_1(w, xq, xd, xs, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 32
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 20 + 4, b * 32
                isum = np.int32(0)
                for j in range(16):
                    q = np.int32(row[o + j])
                    isum += np.int32(q & 15) * np.int32(x[xo + j]) + np.int32(q >> 4) * np.int32(x[xo + 16 + j])
                acc += f16(row, b * 20, lut) * xd[t, b] * np.float32(isum) + f16(row, b * 20 + 2, lut) * xs[t, b]
            out[t, n] = acc


@numba.njit(inline="always", **JIT)
def _u32(row, o):
    return (np.uint32(row[o]) | (np.uint32(row[o + 1]) << 8) | (np.uint32(row[o + 2]) << 16)
            | (np.uint32(row[o + 3]) << 24))


@numba.njit(**JIT_PAR)
def matmul_q5_0(w, xq, xd, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 32
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 22, b * 32
                qh = _u32(row, o + 2)
                isum = np.int32(0)
                for j in range(16):
                    q = np.int32(row[o + 6 + j])
                    lo = (q & 15) | np.int32(((qh >> j) & 1) << 4)
                    hi = (q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
                    isum += np.int32(lo - 16) * np.int32(x[xo + j]) + np.int32(hi - 16) * np.int32(x[xo + 16 + j])
                acc += f16(row, o, lut) * xd[t, b] * np.float32(isum)
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_q5_1(w, xq, xd, xs, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 32
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 24, b * 32
                qh = _u32(row, o + 4)
                isum = np.int32(0)
                for j in range(16):
                    q = np.int32(row[o + 8 + j])
                    lo = (q & 15) | np.int32(((qh >> j) & 1) << 4)
                    hi = (q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
                    isum += lo * np.int32(x[xo + j]) + hi * np.int32(x[xo + 16 + j])
                acc += f16(row, o, lut) * xd[t, b] * np.float32(isum) + f16(row, o + 2, lut) * xs[t, b]
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_q8_0(w, xq, xd, lut, out):
    """w: the raw blocks viewed as int8 (the scale bytes are masked back to unsigned)."""
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 32
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 34 + 2, b * 32
                isum = np.int32(0)
                for j in range(32):
                    isum += np.int32(row[o + j]) * np.int32(x[xo + j])
                acc += f16(row, b * 34, lut) * xd[t, b] * np.float32(isum)
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_iq4_nl(w, xq, xd, lut, out):
    T, N, nb = xq.shape[0], w.shape[0], xq.shape[1] // 32
    kv = IQ4NL_VALUES
    for n in prange(N):
        row = w[n]
        for t in range(T):
            x = xq[t]
            acc = np.float32(0.0)
            for b in range(nb):
                o, xo = b * 18 + 2, b * 32
                isum = np.int32(0)
                for j in range(16):
                    q = row[o + j]
                    isum += np.int32(kv[q & 15]) * np.int32(x[xo + j]) + np.int32(kv[q >> 4]) * np.int32(x[xo + 16 + j])
                acc += f16(row, b * 18, lut) * xd[t, b] * np.float32(isum)
            out[t, n] = acc
