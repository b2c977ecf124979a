"""Shared pieces of the block formats: fp16 conversion, kernel flags.

numba has no float16 type, so kernels read fp16 scales as uint16 bit patterns and look
them up in `F16_TO_F32` (65536 float32 values, 256 KiB, stays in L2).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

from engine.jit import JIT, JIT_EXACT, jit_disabled

F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@numba.njit(inline="always", **JIT)
def f16(row, o, lut):
    """The fp16 value stored little-endian at row[o], row[o+1] (row: uint8 or int8 bytes)."""
    return lut[(np.int64(row[o]) & 0xFF) | ((np.int64(row[o + 1]) & 0xFF) << 8)]


@numba.njit(**JIT_EXACT)
def f32_to_f16_bits(f, scratch_f, scratch_u):
    """Round a float32 to the nearest fp16 (ties to even); return its bit pattern.

    scratch_f / scratch_u: a 1-element float32 array and its uint32 view.
    """
    scratch_f[0] = f
    x = np.int64(scratch_u[0])
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf / nan
        return sign | 0x7C00 | (0x200 if a > 0x7F800000 else 0)
    if a >= 0x477FF000:  # rounds past the largest fp16
        return sign | 0x7C00
    if a < 0x38800000:  # fp16 subnormal: value / 2^-24, rounded half to even
        scratch_u[0] = np.uint32(a)
        v = np.float64(scratch_f[0]) * 16777216.0
        return sign | np.int64(np.rint(v))
    r = a - 0x38000000  # rebias the exponent (127 - 15) << 23
    r = r + 0xFFF + ((r >> 13) & 1)
    return sign | (r >> 13)


def _host_has_f16c() -> bool:
    import os

    from llvmlite import binding as llvm

    if os.environ.get("NUMBA_CPU_NAME", "host") not in ("", "host"):
        return "+f16c" in os.environ.get("NUMBA_CPU_FEATURES", "")
    try:
        return bool(llvm.get_host_cpu_features().get("f16c", False)) and not jit_disabled()
    except Exception:  # pragma: no cover - feature query unsupported
        return False


# With F16C the round trip float32 -> fp16 -> float32 is one instruction pair (vcvtps2ph /
# vcvtph2ps, round to nearest even, overflow to inf), and LLVM vectorizes loops around it.
HAVE_F16C = _host_has_f16c()


@intrinsic
def f16_round(typingctx, x):
    """x (float32) rounded to the nearest fp16 value, as float32 (needs HAVE_F16C)."""
    if x != numba.types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return numba.types.float32(numba.types.float32), codegen


def f32_to_f16_ref(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
