"""Unquantized weights: F32, F16, BF16.

llama.cpp rounds the activation to the weight's type (F16 / BF16) and accumulates in
float32; the kernels do the same, reading the 16-bit weights through a lookup table.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from engine.jit import JIT_PAR

BF16_TO_F32 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)


def dequantize_f32(raw):
    return np.ascontiguousarray(raw).view("<f4").astype(np.float32)


def dequantize_f16(raw):
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def dequantize_bf16(raw):
    return BF16_TO_F32[np.ascontiguousarray(raw).view("<u2")]


@numba.njit(**JIT_PAR)
def matmul_f32(w, x, lut, out):
    """w: (N, K) float32 view of the raw bytes."""
    T, N, K = x.shape[0], w.shape[0], x.shape[1]
    for n in prange(N):
        for t in range(T):
            acc = np.float32(0.0)
            for k in range(K):
                acc += w[n, k] * x[t, k]
            out[t, n] = acc


@numba.njit(**JIT_PAR)
def matmul_16bit(w, x, lut, out):
    """w: (N, K) uint16 view (F16 or BF16 bits); lut maps the bits to float32."""
    T, N, K = x.shape[0], w.shape[0], x.shape[1]
    for n in prange(N):
        for t in range(T):
            acc = np.float32(0.0)
            for k in range(K):
                acc += lut[w[n, k]] * x[t, k]
            out[t, n] = acc
