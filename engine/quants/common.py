"""Shared pieces of the block formats: fp16 conversion, kernel flags.

numba has no float16 type, so kernels read fp16 scales as uint16 bit patterns and look
them up in `F16_TO_F32` (65536 float32 values, 256 KiB, stays in L2).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
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


@intrinsic
def f16_bits(typingctx, x):
    """x (float32) rounded to the nearest fp16 (ties to even, overflow to inf): its bit pattern
    as uint16, what the KV cache stores (needs HAVE_F16C)."""
    if x != numba.types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return numba.types.uint16(numba.types.float32), codegen


@intrinsic
def f16_value(typingctx, bits):
    """The float32 value of the fp16 bit pattern `bits` (uint16): exact (needs HAVE_F16C)."""
    if bits != numba.types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return numba.types.float32(numba.types.uint16), codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (vfmadd where the CPU has FMA, else libm's fmaf:
    the same value either way)."""
    f32 = numba.types.float32
    if (a, b, c) != (f32, f32, f32):
        return None

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, f, f]), "llvm.fma.f32")
        return builder.call(fn, args)

    return f32(f32, f32, f32), codegen


def _kq_lanes(builder, qp, kp, n_steps):
    """IR of the 8 lanes of q · k before the horizontal sum, as ggml_vec_dot_f16 on AVX2: four
    <8 x float> accumulators over 32-wide steps by fused multiply-adds (q float32 at qp, k fp16
    bits at kp, widened 8 at a time), then (0 + 2) + (1 + 3)."""
    v8 = ir.VectorType(ir.FloatType(), 8)
    h8 = ir.VectorType(ir.HalfType(), 8)
    c64 = ir.IntType(64)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8] * 3), "llvm.fma.v8f32")
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v8, [0.0] * 8)) for _ in range(4)]
    with cgutils.for_range(builder, n_steps) as loop:
        base = builder.mul(loop.index, ir.Constant(c64, 32))
        for a in range(4):
            off = builder.add(base, ir.Constant(c64, 8 * a))
            qv = builder.load(builder.bitcast(builder.gep(qp, [off]), v8.as_pointer()), align=4)
            kv = builder.fpext(builder.load(builder.bitcast(builder.gep(kp, [off]), h8.as_pointer()), align=2), v8)
            builder.store(builder.call(fma, [qv, kv, builder.load(accs[a])]), accs[a])
    x0, x1, x2, x3 = (builder.load(a) for a in accs)
    return builder.fadd(builder.fadd(x0, x2), builder.fadd(x1, x3))


@intrinsic
def kq_dot(typingctx, q, h, k, j, kh):
    """q[0, h] · k[j, kh] summed as ggml_vec_dot_f16 does on AVX2: four <8 x float>
    accumulators over 32-wide steps by fused multiply-adds, added 0+2, 1+3, then 0+1; the 8
    lanes as ((0+4)+(1+5))+((2+6)+(3+7)); then the values past the last 32, one fused
    multiply-add each. q (1, Hq, hd): C-contiguous float32; k (n, Hkv, hd): C-contiguous
    uint16, fp16 bit patterns (the KV cache), widened 8 at a time (vcvtph2ps: needs
    HAVE_F16C). (One dependent chain, left to right, was 2x slower.)"""
    f32, i64 = numba.types.float32, numba.types.int64
    for a, dt in ((q, f32), (k, numba.types.uint16)):
        if not isinstance(a, numba.types.Array) or a.dtype != dt or a.ndim != 3 or a.layout != "C":
            return None

    def codegen(context, builder, sig, args):
        qa = context.make_array(sig.args[0])(context, builder, args[0])
        ka = context.make_array(sig.args[2])(context, builder, args[2])
        h_, j_, kh_ = (context.cast(builder, v, t, i64) for v, t in
                       ((args[1], sig.args[1]), (args[3], sig.args[3]), (args[4], sig.args[4])))
        shape_k = cgutils.unpack_tuple(builder, ka.shape, 3)
        hd = shape_k[2]
        f = ir.FloatType()
        qp = builder.gep(qa.data, [builder.mul(h_, hd)])
        kp = builder.gep(ka.data, [builder.mul(builder.add(builder.mul(j_, shape_k[1]), kh_), hd)])
        n_steps = builder.sdiv(hd, ir.Constant(ir.IntType(64), 32))
        x0 = _kq_lanes(builder, qp, kp, n_steps)
        i32 = ir.IntType(32)
        lo = builder.shuffle_vector(x0, x0, ir.Constant(ir.VectorType(i32, 4), [0, 1, 2, 3]))
        hi = builder.shuffle_vector(x0, x0, ir.Constant(ir.VectorType(i32, 4), [4, 5, 6, 7]))
        t = builder.fadd(lo, hi)
        e = [builder.extract_element(t, ir.Constant(i32, i)) for i in range(4)]
        s = cgutils.alloca_once_value(builder, builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3])))
        n32 = builder.mul(n_steps, ir.Constant(ir.IntType(64), 32))
        fma1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f] * 3), "llvm.fma.f32")
        with cgutils.for_range(builder, builder.sub(hd, n32)) as loop:   # the tail (none for hd = 64, 128)
            d = builder.add(n32, loop.index)
            qd = builder.load(builder.gep(qp, [d]))
            kd = builder.fpext(builder.bitcast(builder.load(builder.gep(kp, [d])), ir.HalfType()), f)
            builder.store(builder.call(fma1, [qd, kd, builder.load(s)]), s)
        return builder.load(s)

    return f32(q, h, k, j, kh), codegen


@intrinsic
def kq_dot8(typingctx, q, h, k, j, kh, scale, out, i, o):
    """out[i, o + p] = kq_dot(q, h, k, j + p, kh) * scale for the 8 positions p = 0..7, bit for
    bit: each position's four accumulators as kq_dot, then the eight horizontal sums done
    together (lanes of different positions side by side in the same order of additions: four
    shuffles-and-adds where kq_dot spends eight extracts and adds on each). hd a multiple of
    32 (no tail). q (1, Hq, hd) float32, k (n, Hkv, hd) uint16 fp16 bits, out (rows, cols)
    float32, all C-contiguous; needs HAVE_F16C."""
    f32, i64 = numba.types.float32, numba.types.int64
    for a, dt, nd in ((q, f32, 3), (k, numba.types.uint16, 3), (out, f32, 2)):
        if not isinstance(a, numba.types.Array) or a.dtype != dt or a.ndim != nd or a.layout != "C":
            return None
    if scale != f32:
        return None

    def codegen(context, builder, sig, args):
        qa = context.make_array(sig.args[0])(context, builder, args[0])
        ka = context.make_array(sig.args[2])(context, builder, args[2])
        oa = context.make_array(sig.args[6])(context, builder, args[6])
        h_, j_, kh_, i_, o_ = (context.cast(builder, args[n], sig.args[n], i64) for n in (1, 3, 4, 7, 8))
        shape_k = cgutils.unpack_tuple(builder, ka.shape, 3)
        hd = shape_k[2]
        i32 = ir.IntType(32)
        v8 = ir.VectorType(ir.FloatType(), 8)
        c64 = ir.IntType(64)
        qp = builder.gep(qa.data, [builder.mul(h_, hd)])
        n_steps = builder.sdiv(hd, ir.Constant(c64, 32))
        xs = []
        for p in range(8):
            row = builder.add(builder.mul(builder.add(j_, ir.Constant(c64, p)), shape_k[1]), kh_)
            xs.append(_kq_lanes(builder, qp, builder.gep(ka.data, [builder.mul(row, hd)]), n_steps))

        def shuf(a, b, idx):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 8), idx))

        # t_p = lanes 0..3 + lanes 4..7 of x_p, two positions a vector: [t_p | t_p+1]
        ts = [builder.fadd(shuf(xs[p], xs[p + 1], [0, 1, 2, 3, 8, 9, 10, 11]),
                           shuf(xs[p], xs[p + 1], [4, 5, 6, 7, 12, 13, 14, 15])) for p in (0, 2, 4, 6)]
        # pairwise: (t0 + t1), (t2 + t3) of each position (what vhaddps does)
        ev, od = [0, 2, 8, 10, 4, 6, 12, 14], [1, 3, 9, 11, 5, 7, 13, 15]
        w = [builder.fadd(shuf(ts[c], ts[c + 1], ev), shuf(ts[c], ts[c + 1], od)) for c in (0, 2)]
        y = builder.fadd(shuf(w[0], w[1], ev), shuf(w[0], w[1], od))   # positions 0 2 4 6 1 3 5 7
        y = shuf(y, y, [0, 4, 1, 5, 2, 6, 3, 7])
        sc = builder.insert_element(ir.Constant(v8, ir.Undefined), args[5], ir.Constant(i32, 0))
        y = builder.fmul(y, shuf(sc, sc, [0] * 8))   # as s * scale, lane by lane
        shape_o = cgutils.unpack_tuple(builder, oa.shape, 2)
        op = builder.gep(oa.data, [builder.add(builder.mul(i_, shape_o[1]), o_)])
        builder.store(y, builder.bitcast(op, v8.as_pointer()), align=4)
        return context.get_dummy_value()

    return numba.types.void(q, h, k, j, kh, scale, out, i, o), codegen


@numba.njit(**JIT_EXACT)
def kq_dot_lut(q, h, k, j, kh, lut, lanes):
    """kq_dot on CPUs without F16C: the same sums in the same order (lane 8a+i of `lanes`, a
    float32 scratch of 32, is accumulator a's lane i), k's fp16 bits looked up in `lut`."""
    hd = q.shape[2]
    n32 = hd - hd % 32
    lanes[:] = np.float32(0.0)
    for b in range(0, n32, 32):
        for i in range(32):
            lanes[i] = fma32(q[0, h, b + i], lut[k[j, kh, b + i]], lanes[i])
    for i in range(8):
        lanes[i] = (lanes[i] + lanes[16 + i]) + (lanes[8 + i] + lanes[24 + i])
    s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    for d in range(n32, hd):
        s = fma32(q[0, h, d], lut[k[j, kh, d]], s)
    return s


def fma32_ref(a, b, c) -> np.float32:
    """numpy twin of fma32: the product is exact in float64; one rounding of the sum to
    float32 after that (a double rounding: differs from fma32 only in rare last-bit ties)."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def f32_to_f16_ref(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
