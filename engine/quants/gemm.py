"""Prefill GEMM: tokens in the vector lanes (a VNNI form and a plain AVX2 form).

The row kernels (simd.py) put a weight row's bytes in the lanes, so every (row, token,
super-block) ends in a chain of lane folds, conversions and scale products: most of their
instructions are that bookkeeping, not multiplies. Here the activation is reordered once
per call so that one vector holds the same 4 values of 16 (or 8) tokens (`interleave_q8_k`):

    xil[tile, k/4, lane, 4]   int8, lane = token - 16·tile     (16 tokens x 4 bytes = 64 B)

and a weight's 4 codes, broadcast to every lane, meet all those tokens in one `vpdpbusd`:

    acc[lane] += Σ_{i<4} w[k+i] · x[16·tile + lane, k+i]       (u8 codes x s8 activations)

Every lane is one token's own dot product, so per super-block there is one integer scale
product per group and one float FMA per vector of tokens: no folds, no horizontal sums.
Weights stay in their GGUF blocks; each row's block is unpacked to code bytes on the stack
(never to float) and used for several tiles at a time.

    Q4_K: Σ_g sc_g·Σ_{i∈g} q·x  (8 groups of 32)  ·d·dx  - dmin·dx·Σ_g m_g·bsum32_g
    Q6_K: Σ_g sc_g·(Σ_{i∈g} q·x - 32·bsum16_g)  (16 groups of 16)  ·d·dx
    32-value formats: d_w·dx·(Σ code·x - o·Σx) [+ m_w·s_x for Q4_1/Q5_1]

The per-group sums of x (bsum) come in as int16 pairs, so the min / offset term is a
`vpdpwssd` of (m_{2p}, m_{2p+1}) against (bsum_{2p}, bsum_{2p+1}) per lane.

ISAs (`ISAS`): "avxvnni" 8 lanes with vpdpbusd / vpdpwssd on ymm (AVX-VNNI, or AVX-512 VNNI
with VL); "avx2" 8 lanes with vpmaddubsw + vpmaddwd (weights whose codes could saturate its
int16 pair sums, Q8_0 and IQ4_NL, go signed through the vpsignb trick there). A zmm form
with 16 lanes measured no faster than ymm on Zen 5 (Q4_1 0.74x, Q6_K 0.9x; the kernels are
bound by loading the activations, not by the dot products), so it was dropped.
The float sums run per token over super-blocks, not per byte lane as in the row kernels, so
results agree with those to rounding, not bit for bit; decode (one token) keeps the row
kernels. The drivers that call these intrinsics are generated into simd_kernels.py (numba
cannot take an intrinsic as an argument). Numpy twins: the formats' `matmul_ref`, and
`interleave_*_ref`. Callers validate shapes (nothing here bounds-checks).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.jit import JIT_PAR
from engine.quants.legacy import IQ4NL_VALUES
from engine.quants.simd import (BYTES, FLOAT, F32, I8, I16, I32, I64, INT32, V8I16, _bits32, _data, _f16, _fn,
                                _load, _nibbles32, _pshufb, _q4k_unpack, _require, _splat)

INT16 = (types.int16,)
ISAS = ("avxvnni", "avx2")
# 16-token tiles per weight-block decode: 2 (32 tokens, 4 vectors of accumulators in 16 ymm)
TILES = {"avxvnni": 2, "avx2": 2}


class _Lanes:
    """The vector ops of one ISA: `lanes` tokens per vector, a 16-token tile is 16 // lanes
    vectors ("halves"), dot4 = u8 x s8 4-byte dot product accumulate, madd = i16 pair dot
    product accumulate."""

    def __init__(self, b, isa):
        self.b, self.isa = b, isa
        self.lanes = 8
        self.halves = 16 // self.lanes
        L = self.lanes
        self.vi, self.vf = ir.VectorType(I32, L), ir.VectorType(F32, L)
        self.zero = ir.Constant(self.vi, [0] * L)
        self.fma_fn = _fn(b, f"llvm.fma.v{L}f32", self.vf, [self.vf] * 3)
        bits = 32 * L
        if isa == "avx2":
            vb, vh = ir.VectorType(I8, 4 * L), ir.VectorType(I16, 2 * L)
            self._maddubs = _fn(b, "llvm.x86.avx2.pmadd.ub.sw", vh, [vb, vb])
            self._maddwd = _fn(b, "llvm.x86.avx2.pmadd.wd", self.vi, [vh, vh])
            self._psign = _fn(b, "llvm.x86.avx2.psign.b", vb, [vb, vb])
            self._vb, self._vh = vb, vh
            self._ones = ir.Constant(vh, [1] * (2 * L))
        else:
            self._dpbusd = _fn(b, f"llvm.x86.avx512.vpdpbusd.{bits}", self.vi, [self.vi] * 3)
            self._dpwssd = _fn(b, f"llvm.x86.avx512.vpdpwssd.{bits}", self.vi, [self.vi] * 3)

    def dot4(self, acc, w, x):
        """acc + Σ_{4 bytes} w·x per lane: w unsigned codes (< 128 on avx2), x signed."""
        b = self.b
        if self.isa != "avx2":
            return b.call(self._dpbusd, [acc, w, x])
        p16 = b.call(self._maddubs, [b.bitcast(w, self._vb), b.bitcast(x, self._vb)])
        return b.add(acc, b.call(self._maddwd, [p16, self._ones]))

    def dot_run16(self, accs, ks, codes_and_x, scale=None):
        """avx2: accs[v] + scale·Σ_{k in ks} Σ_4 w·xs[v] per lane, (w, xs) = codes_and_x(k) (called
        in turn, so each dword's loads sit next to their use). The vpmaddubsw pair sums
        of the whole run add up in int16 first, then one vpmaddwd with the scale (an i32 value
        put in every int16 lane; 1 when None): half the multiply-pipe work of dot4 per dword.
        Exact while every int16 sum stays below 2^15: the caller keeps the run that short
        (|pair| <= 2·63·127; 8 dwords of 4-bit codes, 4 of 5-bit, 2 of 6-bit)."""
        b = self.b
        hs: list = []
        for k in ks:
            w, xs = codes_and_x(k)
            ps = [b.call(self._maddubs, [b.bitcast(w, self._vb), b.bitcast(x, self._vb)]) for x in xs]
            hs = ps if not hs else [b.add(h, q) for h, q in zip(hs, ps)]
        s16 = self._ones if scale is None else _splat(b, b.trunc(scale, I16), self._vh)
        return [b.add(a, b.call(self._maddwd, [h, s16])) for a, h in zip(accs, hs)]

    def dot4_signed(self, acc, w, x):
        """acc + Σ w·x with w signed (avx2: |w| times x with w's sign, so no pair sum saturates)."""
        b = self.b
        wb, xb = b.bitcast(w, self._vb), b.bitcast(x, self._vb)
        p16 = b.call(self._maddubs, [b.call(self._psign, [wb, wb]), b.call(self._psign, [xb, wb])])
        return b.add(acc, b.call(self._maddwd, [p16, self._ones]))

    def madd(self, acc, a, x):
        """acc + a[2j]·x[2j] + a[2j+1]·x[2j+1] per lane (int16 pairs)."""
        b = self.b
        if self.isa != "avx2":
            return b.call(self._dpwssd, [acc, a, x])
        return b.add(acc, b.call(self._maddwd, [b.bitcast(a, self._vh), b.bitcast(x, self._vh)]))

    def fma(self, a, m, c):
        return self.b.call(self.fma_fn, [a, m, c])

    def splat_i(self, v):
        return _splat(self.b, v, self.vi)

    def splat_f(self, v):
        return _splat(self.b, v, self.vf)


def _scatter(b, faccs, outp, N, n, t0, T, lanes):
    """Lane l of vector v -> out[t0 + lanes·v + l, n] for the tokens < T (column n of a row-major out)."""
    for v, facc in enumerate(faccs):
        fa = b.load(facc)
        for lane in range(lanes):
            t = b.add(t0, ir.Constant(I64, lanes * v + lane))
            with b.if_then(b.icmp_signed("<", t, T), likely=True):
                b.store(b.extract_element(fa, ir.Constant(I32, lane)), b.gep(outp, [b.add(b.mul(t, N), n)]))


class _Args:
    """The intrinsics' shared arguments (w, woff, xil, xoff, xtile, xd, xdoff, T16, bs, <bsoff or
    xs>, lut, nb, out, n, t0, T) as LLVM values: data pointers for the arrays."""

    def __init__(self, context, b, sig, args):
        (w, self.woff, xil, self.xoff, self.xtile, xd, self.xdoff, self.T16, bs, self.extra,
         lut, self.nb, out, self.n, self.t0, self.T) = args
        def ptr(i, v):
            return _data(context, b, sig.args[i], v)
        self.wp = b.gep(ptr(0, w), [self.woff])
        self.x0, self.xd0, self.bs0, self.lutp, self.outp = ptr(2, xil), ptr(5, xd), ptr(8, bs), ptr(10, lut), ptr(12, out)
        self.extra_p = ptr(9, self.extra) if isinstance(sig.args[9], types.Array) else None
        self.N = b.extract_value(context.make_array(sig.args[12])(context, b, value=out).shape, 1)

    def tiles(self, b, ntiles):
        """Pointers to the first byte of each 16-token tile of the run."""
        return [b.gep(self.x0, [b.add(self.xoff, b.mul(self.xtile, ir.Constant(I64, i)))]) for i in range(ntiles)]


def _vectors(L, xps):
    """(x pointer, token offset in the run of tiles) for each vector: halves per 16-token tile."""
    out = []
    for i in range(len(xps)):
        for h in range(L.halves):
            out.append((L.b.gep(xps[i], [ir.Constant(I64, 32 * h)]) if h else xps[i], 16 * i + L.lanes * h))
    return out


def _gemm_row(kind, ntiles, isa):
    """Intrinsic gemm(w, woff, xil, xoff, xtile, xd, xdoff, T16, bs, bsoff, lut, nb, out, n, t0, T):
    one weight row (nb super-blocks from byte woff) times ntiles 16-token tiles of the
    interleaved activation (tile i at element xoff + i·xtile); stores out[t, n] for the
    tokens t0 .. t0 + 16·ntiles - 1 that are < T (out: C-contiguous (≥T, N) float32)."""
    ts, groups = {"q4_k": (144, 8), "q6_k": (210, 16)}[kind]
    per_group = 256 // groups // 4   # dwords per group
    run16 = {"q4_k": 8, "q6_k": 2}[kind]   # avx2: dwords per int16 run (_Lanes.dot_run16)
    npairs = groups // 2

    @intrinsic
    def gemm(typingctx, w, woff, xil, xoff, xtile, xd, xdoff, T16, bs, bsoff, lut, nb, out, n, t0, T):
        _require(w=(w, BYTES), xil=(xil, BYTES), xd=(xd, FLOAT), bs=(bs, INT16), lut=(lut, FLOAT), out=(out, FLOAT))
        sig = types.void(w, woff, xil, xoff, xtile, xd, xdoff, T16, bs, bsoff, lut, nb, out, n, t0, T)

        def codegen(context, builder, sig, args):
            b = builder
            A, L = _Args(context, b, sig, args), _Lanes(b, isa)
            wp, xd0, bs0, lutp, nb_, T16_, bsoff_, xdoff_ = A.wp, A.xd0, A.bs0, A.lutp, A.nb, A.T16, A.extra, A.xdoff
            scratch = cgutils.alloca_once(b, ir.ArrayType(I8, 256))
            scratch.align = 64
            sp = b.bitcast(scratch, I8.as_pointer())
            vecs = _vectors(L, A.tiles(b, ntiles))
            faccs = [cgutils.alloca_once_value(b, ir.Constant(L.vf, [0.0] * L.lanes)) for _ in vecs]

            def c8(v, k=32):
                return ir.Constant(ir.VectorType(I8, k), [v & 0xFF] * k)

            def ldv(p, o, ty):
                return _load(b, b.gep(p, [o if isinstance(o, ir.Value) else ir.Constant(I64, o)]), ty)

            def store_codes(o, v):
                q = b.bitcast(b.gep(sp, [ir.Constant(I64, o)]), v.type.as_pointer())
                b.store(v, q).align = 32

            with cgutils.for_range(b, nb_) as loop:
                blk_i = loop.index
                blk = b.gep(wp, [b.mul(blk_i, ir.Constant(I64, ts))])
                # 1. the block's 256 codes, in value order, as unsigned bytes on the stack
                if kind == "q4_k":
                    for p in range(4):
                        v = ldv(blk, 16 + 32 * p, ir.VectorType(I8, 32))
                        store_codes(64 * p, b.and_(v, c8(15)))
                        store_codes(64 * p + 32, b.lshr(v, c8(4)))
                    d = _f16(b, blk, lutp)
                    dmin = _f16(b, b.gep(blk, [ir.Constant(I64, 2)]), lutp)
                    sc, mins = _q4k_unpack(b, blk)
                    scales = [b.sext(b.extract_element(sc, ir.Constant(I32, g)), I32) for g in range(8)]
                    pairs16 = b.bitcast(b.trunc(mins, V8I16), ir.VectorType(I32, 4))  # (m_2p, m_2p+1) per dword
                else:  # q6_k
                    for h in range(2):
                        lo = ldv(blk, 64 * h, ir.VectorType(I8, 32))
                        hi = ldv(blk, 64 * h + 32, ir.VectorType(I8, 32))
                        qh = ldv(blk, 128 + 32 * h, ir.VectorType(I8, 32))
                        parts = ((lo, 0, False), (hi, 2, False), (lo, 4, True), (hi, 6, True))
                        for p, (src, sh, high) in enumerate(parts):
                            low4 = b.lshr(src, c8(4)) if high else b.and_(src, c8(15))
                            top = b.and_(b.lshr(qh, c8(sh)) if sh else qh, c8(3))
                            store_codes(128 * h + 32 * p, b.or_(low4, b.shl(top, c8(4))))
                    d = _f16(b, b.gep(blk, [ir.Constant(I64, 208)]), lutp)
                    sc8 = ldv(blk, 192, ir.VectorType(I8, 16))
                    sc16 = b.sext(sc8, ir.VectorType(I16, 16))
                    scales = [b.sext(b.extract_element(sc8, ir.Constant(I32, g)), I32) for g in range(16)]
                    pairs16 = b.bitcast(sc16, ir.VectorType(I32, 8))  # (sc_2p, sc_2p+1) per dword
                # 2. integer sums: per vector of tokens, Σ_g sc_g · Σ_{i∈g} q·x, one dot4 per 4 codes
                kbase = b.mul(blk_i, ir.Constant(I64, 64 * 64))  # 64 dwords x 64 bytes per block

                def codes_and_x(k4):   # 4 codes in every lane, and the tokens' 4 values per vector
                    wv = L.splat_i(_load(b, b.gep(sp, [ir.Constant(I64, 4 * k4)]), I32, align=4))
                    return wv, [ldv(xp, b.add(kbase, ir.Constant(I64, 64 * k4)), L.vi) for xp, _ in vecs]

                iaccs = [L.zero] * len(vecs)
                for g in range(groups):
                    if isa == "avx2":   # int16 runs, one vpmaddwd with the group scale (~12% faster)
                        for j0 in range(0, per_group, run16):
                            k0 = g * per_group + j0
                            iaccs = L.dot_run16(iaccs, range(k0, k0 + run16), codes_and_x, scales[g])
                        continue
                    gaccs = [L.zero] * len(vecs)
                    for j in range(per_group):
                        k4 = g * per_group + j
                        wv = L.splat_i(_load(b, b.gep(sp, [ir.Constant(I64, 4 * k4)]), I32, align=4))
                        for v, (xp, _) in enumerate(vecs):
                            gaccs[v] = L.dot4(gaccs[v], wv, ldv(xp, b.add(kbase, ir.Constant(I64, 64 * k4)), L.vi))
                    s = L.splat_i(scales[g])
                    iaccs = [b.add(iaccs[v], b.mul(gaccs[v], s)) for v in range(len(vecs))]
                # 3. the group-sum term: Σ_p pair_p · (bsum_2p, bsum_2p+1) per token
                bsb = b.add(bsoff_, b.mul(blk_i, b.mul(T16_, ir.Constant(I64, 2 * npairs))))
                maccs = [L.zero] * len(vecs)
                for p in range(npairs):
                    pv = L.splat_i(b.extract_element(pairs16, ir.Constant(I32, p)))
                    for v, (_, tok) in enumerate(vecs):
                        o = b.add(bsb, b.add(b.mul(T16_, ir.Constant(I64, 2 * p)), ir.Constant(I64, 2 * tok)))
                        maccs[v] = L.madd(maccs[v], pv, ldv(bs0, o, L.vi))
                # 4. float: one FMA (two for Q4_K's min term) per vector of tokens
                xdb = b.add(xdoff_, b.mul(blk_i, T16_))
                for v, (_, tok) in enumerate(vecs):
                    dx = ldv(xd0, b.add(xdb, ir.Constant(I64, tok)), L.vf)
                    fa = b.load(faccs[v])
                    if kind == "q4_k":
                        fa = L.fma(b.sitofp(iaccs[v], L.vf), b.fmul(L.splat_f(d), dx), fa)
                        fa = L.fma(b.sitofp(maccs[v], L.vf), b.fmul(L.splat_f(b.fneg(dmin)), dx), fa)
                    else:
                        isum = b.sub(iaccs[v], b.shl(maccs[v], ir.Constant(L.vi, [5] * L.lanes)))
                        fa = L.fma(b.sitofp(isum, L.vf), b.fmul(L.splat_f(d), dx), fa)
                    b.store(fa, faccs[v])
            _scatter(b, faccs, A.outp, A.N, A.n, A.t0, A.T, L.lanes)
            return context.get_dummy_value()

        return sig, codegen

    return gemm


# 32-value formats: codes as unsigned bytes (an offset o makes signed ones unsigned), so a
# block is d_w·dx·(Σ code·x - o·Σx)  [+ m_w·s_x for the _1 formats, whose codes are unsigned].
_LEGACY = {  # kind: (block bytes, code offset o as a shift (o = 1 << shift) or None, has min)
    "q8_0": (34, 7, False), "q4_0": (18, 3, False), "q5_0": (22, 4, False), "iq4_nl": (18, 7, False),
    "q4_1": (20, None, True), "q5_1": (24, None, True),
}


def _legacy_codes(b, kind, blk, signed=False):
    """The block's 32 codes, in value order, as <32 x i8>: unsigned (the offset o added to
    signed formats), or for Q8_0 / IQ4_NL with signed=True their plain signed values."""
    def at(o):
        return b.gep(blk, [ir.Constant(I64, o)])

    if kind == "q8_0":
        q = _load(b, at(2), ir.VectorType(I8, 32))
        return q if signed else b.xor(q, ir.Constant(ir.VectorType(I8, 32), [0x80] * 32))
    if kind == "q4_0":
        return _nibbles32(b, at(2))
    if kind == "iq4_nl":  # the non-linear values (+ 128 when unsigned)
        off = 0 if signed else 128
        table = ir.Constant(ir.VectorType(I8, 32), [(int(v) + off) & 0xFF for v in IQ4NL_VALUES] * 2)
        return _pshufb(b, table, _nibbles32(b, at(2)))
    if kind == "q5_0":
        return b.or_(_nibbles32(b, at(6)), _bits32(b, at(2)))
    if kind == "q4_1":
        return _nibbles32(b, at(4))
    return b.or_(_nibbles32(b, at(8)), _bits32(b, at(4)))  # q5_1


def _gemm_row_legacy(kind, ntiles, isa):
    """Intrinsic gemm(w, woff, xil, xoff, xtile, xd, xdoff, T16, bs, xs, lut, nb, out, n, t0, T) for a
    32-value format: as _gemm_row, with bs the int32 block sums of x (nb, T16) and xs the Q8_1
    s = d·Σq (nb, T16) float32 (read by the _1 formats only)."""
    ts, shift, has_min = _LEGACY[kind]
    signed = isa == "avx2" and kind in ("q8_0", "iq4_nl")   # u8 codes up to 255 would saturate vpmaddubsw
    if signed:
        shift = None
    # avx2, unsigned codes: dwords per int16 run (_Lanes.dot_run16)
    run16 = 1 if isa != "avx2" or signed else (4 if kind in ("q5_0", "q5_1") else 8)

    @intrinsic
    def gemm(typingctx, w, woff, xil, xoff, xtile, xd, xdoff, T16, bs, xs, lut, nb, out, n, t0, T):
        _require(w=(w, BYTES), xil=(xil, BYTES), xd=(xd, FLOAT), bs=(bs, INT32), xs=(xs, FLOAT), lut=(lut, FLOAT),
                 out=(out, FLOAT))
        sig = types.void(w, woff, xil, xoff, xtile, xd, xdoff, T16, bs, xs, lut, nb, out, n, t0, T)

        def codegen(context, builder, sig, args):
            b = builder
            A, L = _Args(context, b, sig, args), _Lanes(b, isa)
            wp, xd0, bs0, xs0, lutp, nb_, T16_, xdoff_ = A.wp, A.xd0, A.bs0, A.extra_p, A.lutp, A.nb, A.T16, A.xdoff
            scratch = cgutils.alloca_once(b, ir.ArrayType(I8, 32))
            scratch.align = 32
            sp = b.bitcast(scratch, ir.VectorType(I8, 32).as_pointer())
            sp32 = b.bitcast(scratch, I32.as_pointer())
            vecs = _vectors(L, A.tiles(b, ntiles))
            faccs = [cgutils.alloca_once_value(b, ir.Constant(L.vf, [0.0] * L.lanes)) for _ in vecs]
            dot = L.dot4_signed if signed else L.dot4

            def ldv(p, o, ty):
                return _load(b, b.gep(p, [o]), ty)

            with cgutils.for_range(b, nb_) as loop:
                blk_i = loop.index
                blk = b.gep(wp, [b.mul(blk_i, ir.Constant(I64, ts))])
                b.store(_legacy_codes(b, kind, blk, signed), sp).align = 32
                dw = L.splat_f(_f16(b, blk, lutp))
                kbase = b.mul(blk_i, ir.Constant(I64, 8 * 64))  # 8 dwords x 64 bytes per block
                iaccs = [L.zero] * len(vecs)
                def codes_and_x(j):
                    wv = L.splat_i(_load(b, b.gep(sp32, [ir.Constant(I64, j)]), I32, align=4))
                    return wv, [ldv(xp, b.add(kbase, ir.Constant(I64, 64 * j)), L.vi) for xp, _ in vecs]

                for j0 in range(0, 8, run16):
                    if run16 > 1:
                        iaccs = L.dot_run16(iaccs, range(j0, j0 + run16), codes_and_x)
                        continue
                    wv, xs = codes_and_x(j0)
                    iaccs = [dot(acc, wv, x) for acc, x in zip(iaccs, xs)]
                row = b.add(xdoff_, b.mul(blk_i, T16_))
                if has_min:
                    mw = L.splat_f(_f16(b, b.gep(blk, [ir.Constant(I64, 2)]), lutp))
                for v, (_, tok) in enumerate(vecs):
                    o = b.add(row, ir.Constant(I64, tok))
                    isum = iaccs[v]
                    if shift is not None:
                        isum = b.sub(isum, b.shl(ldv(bs0, o, L.vi), ir.Constant(L.vi, [shift] * L.lanes)))
                    fa = L.fma(b.sitofp(isum, L.vf), b.fmul(dw, ldv(xd0, o, L.vf)), b.load(faccs[v]))
                    if has_min:
                        fa = L.fma(mw, ldv(xs0, o, L.vf), fa)
                    b.store(fa, faccs[v])
            _scatter(b, faccs, A.outp, A.N, A.n, A.t0, A.T, L.lanes)
            return context.get_dummy_value()

        return sig, codegen

    return gemm


# The intrinsics by name, gemm{tiles}_{kind}_{isa}: TILES[isa] tiles and a single tile; the
# drivers in simd_kernels.py bind them to those names (numba cannot take an intrinsic as an
# argument, and a compiled driver must name each one it calls).
KQ_KINDS = ("q4_k", "q6_k")
LEGACY_KINDS = ("q8_0", "q4_0", "q5_0", "iq4_nl", "q4_1", "q5_1")
INTRINSICS: dict[str, Any] = {}
for _isa in ISAS:
    for _kind in KQ_KINDS + LEGACY_KINDS:
        _make = _gemm_row if _kind in KQ_KINDS else _gemm_row_legacy
        INTRINSICS[f"gemm{TILES[_isa]}_{_kind}_{_isa}"] = _make(_kind, TILES[_isa], _isa)
        INTRINSICS[f"gemm1_{_kind}_{_isa}"] = _make(_kind, 1, _isa)


# --------------------------------------------------------------------------- activations
@numba.njit(**JIT_PAR)
def interleave_q8_k(xq, xd, bsums, groups, xil, xdil, bsil):
    """Q8_K activation (xq (T, K) int8, xd (T, nb), bsums (T, K/16) per-16 sums) -> the GEMM's
    layout, zero-padded to T16 = 16·ntiles tokens:
        xil  (ntiles, K/4, 16, 4) int8   the same 4 values of 16 tokens side by side
        xdil (nb, T16) float32           block-major scales
        bsil (nb, groups/2, T16, 2) int16  per-group sums of x (groups 8: per 32, 16: per 16)"""
    T, K = xq.shape
    nb = K // 256
    ntiles = xil.shape[0]
    T16 = ntiles * 16
    x32 = xq.view(np.int32)            # (T, K/4): 4 activation bytes as one int32
    il32 = xil.reshape(ntiles, K // 4, 64).view(np.int32)   # (ntiles, K/4, 16)
    per = 16 // groups                 # per-16 sums per group (2 for Q4_K's groups of 32)
    for tile in prange(ntiles):
        for lane in range(16):
            t = tile * 16 + lane
            if t < T:
                for k4 in range(K // 4):
                    il32[tile, k4, lane] = x32[t, k4]
                for b in range(nb):
                    xdil[b, t] = xd[t, b]
                    for g in range(groups):
                        s = 0
                        for j in range(per):
                            s += bsums[t, b * 16 + g * per + j]
                        bsil[b, g // 2, t, g % 2] = s
            else:
                for k4 in range(K // 4):
                    il32[tile, k4, lane] = 0
                for b in range(nb):
                    xdil[b, t] = 0
                    for g in range(groups):
                        bsil[b, g // 2, t, g % 2] = 0
    return T16


def interleave_q8_k_ref(xq, xd, bsums, groups):
    """Numpy twin of interleave_q8_k: (xil, xdil, bsil)."""
    T, K = xq.shape
    nb, T16 = K // 256, -(-T // 16) * 16
    xp = np.zeros((T16, K), np.int8)
    xp[:T] = xq
    xil = xp.reshape(T16 // 16, 16, K // 4, 4).transpose(0, 2, 1, 3).copy()
    xdil = np.zeros((nb, T16), np.float32)
    xdil[:, :T] = xd.T
    sums = bsums.reshape(T, nb, groups, 16 // groups).sum(-1)           # (T, nb, groups)
    bsil = np.zeros((nb, groups // 2, T16, 2), np.int16)
    bsil[:, :, :T, :] = sums.reshape(T, nb, groups // 2, 2).transpose(1, 2, 0, 3)
    return xil, xdil, bsil


def interleaved(xq, xd, bsums, groups):
    T, K = xq.shape
    ntiles = -(-T // 16)
    xil = np.empty((ntiles, K // 4, 16, 4), np.int8)
    xdil = np.empty((K // 256, ntiles * 16), np.float32)
    bsil = np.empty((K // 256, groups // 2, ntiles * 16, 2), np.int16)
    interleave_q8_k(xq, xd, bsums, groups, xil, xdil, bsil)
    return xil, xdil, bsil


@numba.njit(**JIT_PAR)
def interleave_q8_32(xq, xd, xs, xil, xdil, bsil, xsil):
    """Q8_0 / Q8_1 activation (xq (T, K) int8, xd (T, K/32), xs: Q8_1's s = d·Σq, or xd again)
    -> xil as interleave_q8_k, xdil and xsil (nb, T16) float32, bsil (nb, T16) int32 block
    sums of xq; zero-padded to T16 tokens."""
    T, K = xq.shape
    nb = K // 32
    ntiles = xil.shape[0]
    x32 = xq.view(np.int32)
    il32 = xil.reshape(ntiles, K // 4, 64).view(np.int32)
    for tile in prange(ntiles):
        for lane in range(16):
            t = tile * 16 + lane
            if t < T:
                for k4 in range(K // 4):
                    il32[tile, k4, lane] = x32[t, k4]
                for b in range(nb):
                    s = 0
                    for j in range(32):
                        s += xq[t, 32 * b + j]
                    bsil[b, t] = s
                    xdil[b, t] = xd[t, b]
                    xsil[b, t] = xs[t, b]
            else:
                for k4 in range(K // 4):
                    il32[tile, k4, lane] = 0
                for b in range(nb):
                    bsil[b, t] = 0
                    xdil[b, t] = 0
                    xsil[b, t] = 0


def interleave_q8_32_ref(xq, xd, xs):
    """Numpy twin of interleave_q8_32: (xil, xdil, bsil, xsil)."""
    T, K = xq.shape
    nb, T16 = K // 32, -(-T // 16) * 16
    xp = np.zeros((T16, K), np.int8)
    xp[:T] = xq
    xil = xp.reshape(T16 // 16, 16, K // 4, 4).transpose(0, 2, 1, 3).copy()
    def pad(a, dt):
        return np.concatenate([a.T.astype(dt), np.zeros((nb, T16 - T), dt)], axis=1)
    bs = xq.reshape(T, nb, 32).astype(np.int32).sum(-1)
    return xil, pad(xd, np.float32), pad(bs, np.int32), pad(xs, np.float32)


def interleaved_32(xq, xd, xs):
    T, K = xq.shape
    ntiles = -(-T // 16)
    xil = np.empty((ntiles, K // 4, 16, 4), np.int8)
    xdil = np.empty((K // 32, ntiles * 16), np.float32)
    bsil = np.empty((K // 32, ntiles * 16), np.int32)
    xsil = np.empty((K // 32, ntiles * 16), np.float32)
    interleave_q8_32(xq, xd, xs, xil, xdil, bsil, xsil)
    return xil, xdil, bsil, xsil
