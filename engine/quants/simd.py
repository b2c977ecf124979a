"""AVX2 block dot products emitted as LLVM IR through numba intrinsics.

LLVM never forms `vpmaddubsw` (u8 x i8 -> pairwise i16 sums) from plain numba loops, and
that instruction is where llama.cpp's x86 speed comes from. These intrinsics emit it
(`llvm.x86.avx2.pmadd.ub.sw`, then `pmadd.wd` to i32) on <32 x i8> loads straight from the
raw GGUF blocks (unaligned loads, no repacking):

- legacy 32-value formats (`dot_*_row`, `dot4_*_row`): the whole loop over one weight
  row's blocks is generated in IR; each block's int32 lanes are converted to float and
  FMA'd with d_w*d_x into a <8 x float> accumulator per token (llama.cpp's AVX2 scheme),
  one horizontal sum per row. Q4_1/Q5_1 add m_w*s_x per block.
- k-quants and IQ4_XS (`row_*`, `row4_*`): the whole row in IR too: packed scales unpacked
  with byte masks, group sums weighted by `pmaddwd` with the scales, min / offset terms
  from the activation's per-16 sums as int32 vectors, float FMA accumulation per token.
- F16 / BF16 (`row_f16`, `row_bf16`): 8 weights at a time widened to float (vcvtph2ps /
  shift), FMA with the float activation.
The `*4_*` variants take 4 activation rows (stride xstride) and decode each weight block
once for the 4 of them (prefill); `*2_*` / `*3_*` do the same for a tile's 2- or 3-token tail.

Signed x signed products use the usual sign trick: |w| (unsigned) times sign(x, w). |w| is
taken of the weight, so Q8_0's -128 is exact (|−128| = 128 as u8); activations from the
Q8 quantizers are within ±127. No pair sum can saturate int16 (max 128·127·2 = 32512).

Only valid when the CPU has AVX2: `HAVE_AVX2` says so; callers keep portable kernels.

Caching: numba's on-disk cache of simd_kernels.py is keyed on that file's contents and does
not notice edits here. After changing this file run `DELTATALK_NO_SIMD=1 python -m engine.quants.gen_simd_kernels`
(it records this file's sha256 in simd_kernels.py; a test checks it).

Decode (one token) and each token of a 4-token prefill tile are summed in the same order,
so `lin(x)` is bit-identical to the matching row of `lin.matmul(X)`.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

def _target_has(*features: str) -> bool:
    """All of these LLVM CPU features on the CPU numba compiles for (the host, unless
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override it)."""
    import os

    cpu = os.environ.get("NUMBA_CPU_NAME", "host")
    if cpu not in ("", "host"):
        given = os.environ.get("NUMBA_CPU_FEATURES", "")
        return all(f"+{f}" in given for f in features)
    try:
        have = llvm.get_host_cpu_features()
        return all(have.get(f, False) for f in features)
    except Exception:  # pragma: no cover - feature query unsupported
        return False


def _jit_enabled() -> bool:
    from engine.jit import jit_disabled

    return not jit_disabled()  # intrinsics only exist in compiled code


HAVE_AVX2 = _target_has("avx2") and _jit_enabled()
# the ymm vpdpbusd / vpdpwssd: AVX-VNNI (VEX), or AVX-512 VNNI with VL (EVEX)
HAVE_AVX_VNNI = HAVE_AVX2 and (_target_has("avxvnni") or _target_has("avx512vnni", "avx512vl"))

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
V32I8, V16I8 = ir.VectorType(I8, 32), ir.VectorType(I8, 16)
V16I16, V8I32, V8F32 = ir.VectorType(I16, 16), ir.VectorType(I32, 8), ir.VectorType(F32, 8)


def _require(**arrays):
    """Typing-time guard: each array argument must have the given dtype(s) (the IR reads raw memory)."""
    from numba.core.errors import TypingError

    for name, (ty, dtypes) in arrays.items():
        if not isinstance(ty, types.Array) or ty.dtype not in dtypes or ty.layout != "C":
            raise TypingError(f"simd intrinsic: {name} must be a C-contiguous array of {dtypes}, got {ty}")


BYTES = (types.uint8, types.int8)
FLOAT = (types.float32,)
INT32 = (types.int32,)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _data(context, builder, aty, val):
    return context.make_array(aty)(context, builder, value=val).data


def _load(builder, ptr, ty, align=1):
    p = builder.bitcast(ptr, ty.as_pointer())
    v = builder.load(p)
    v.align = align
    return v


def _splat(builder, s, vty):
    v = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(v, s, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count))


def _maddubs(builder, u, s):
    """u (unsigned bytes) x s (signed bytes) -> <8 x i32> sums of 4 neighbouring products."""
    p16 = builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [V32I8, V32I8]), [u, s])
    ones = ir.Constant(V16I16, [1] * 16)
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16]), [p16, ones])


def _psign(builder, a, b):
    return builder.call(_fn(builder, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8]), [a, b])


def _hsum8(builder, v):
    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 4), [0, 1, 2, 3]))
    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 4), [4, 5, 6, 7]))
    s = builder.fadd(lo, hi)
    a = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(I32, 2), [0, 1]))
    b = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(I32, 2), [2, 3]))
    s2 = builder.fadd(a, b)
    return builder.fadd(builder.extract_element(s2, ir.Constant(I32, 0)),
                        builder.extract_element(s2, ir.Constant(I32, 1)))


def _f16(builder, blk, lut):
    bits = _load(builder, blk, I16)
    return builder.load(builder.gep(lut, [builder.zext(bits, I64)]))


def _nibbles32(builder, p):
    """16 bytes at p -> <32 x i8>: low nibbles then high nibbles."""
    v = _load(builder, p, V16I8)
    lo = builder.and_(v, ir.Constant(V16I8, [15] * 16))
    hi = builder.lshr(v, ir.Constant(V16I8, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))


def _bits32(builder, p):
    """The 32 bits of the little-endian u32 at p -> <32 x i8>: 16 where bit j is set, else 0."""
    v = _load(builder, p, ir.VectorType(I8, 4))
    spread = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 32), [j // 8 for j in range(32)]))
    m = builder.and_(spread, ir.Constant(V32I8, [(1 << (j % 8)) for j in range(32)]))
    nz = builder.icmp_unsigned("!=", m, ir.Constant(V32I8, [0] * 32))
    return builder.select(nz, ir.Constant(V32I8, [16] * 32), ir.Constant(V32I8, [0] * 32))


def _legacy_row(kind, ntok=1):
    """Intrinsic dot(w, woff, xq, xoff, xstride, xd, xs, xdoff, xdstride, lut, nb): one weight row
    (nb blocks from byte woff) against ntok activation rows -> float32 or UniTuple(float32, ntok).

    Per block: Σ q_w q_x exact in int32 lanes, converted to float and accumulated with
    d_w·d_x by FMA into a <8 x float> per token (llama.cpp's AVX2 scheme); Q4_1/Q5_1 add m_w·s_x.
    """
    bsize = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "iq4_nl": 18}[kind]

    @intrinsic
    def dot(typingctx, w, woff, xq, xoff, xstride, xd, xs, xdoff, xdstride, lut, nb):
        _require(w=(w, BYTES), xq=(xq, BYTES), xd=(xd, FLOAT), xs=(xs, FLOAT), lut=(lut, FLOAT))
        ret = types.float32 if ntok == 1 else types.UniTuple(types.float32, ntok)
        sig = ret(w, woff, xq, xoff, xstride, xd, xs, xdoff, xdstride, lut, nb)

        def codegen(context, builder, sig, args):
            w_, woff_, xq_, xoff_, xstride_, xd_, xs_, xdoff_, xdstride_, lut_, nb_ = args
            wp = builder.gep(_data(context, builder, sig.args[0], w_), [woff_])
            x0 = _data(context, builder, sig.args[2], xq_)
            xd0 = _data(context, builder, sig.args[5], xd_)
            xs0 = _data(context, builder, sig.args[6], xs_)
            lutp = _data(context, builder, sig.args[9], lut_)
            toks = range(ntok)
            xps = [builder.gep(x0, [builder.add(xoff_, builder.mul(xstride_, ir.Constant(I64, i)))]) for i in toks]
            xdos = [builder.add(xdoff_, builder.mul(xdstride_, ir.Constant(I64, i))) for i in toks]
            xdps = [builder.gep(xd0, [o]) for o in xdos]
            xsps = [builder.gep(xs0, [o]) for o in xdos]
            accs = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, [0.0] * 8)) for _ in toks]
            accms = [cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0)) for _ in toks]
            fma = _fn(builder, "llvm.fma.v8f32", V8F32, [V8F32, V8F32, V8F32])
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                blk = builder.gep(wp, [builder.mul(b, ir.Constant(I64, bsize))])
                _prefetch_ahead(builder, blk, 1)   # one per block: a line every 2-3 blocks, the rest hits
                dw = _f16(builder, blk, lutp)
                signed = True
                if kind == "q8_0":
                    qw = _load(builder, builder.gep(blk, [ir.Constant(I64, 2)]), V32I8)
                elif kind == "q4_0":
                    qw = _nibbles32(builder, builder.gep(blk, [ir.Constant(I64, 2)]))
                    qw = builder.sub(qw, ir.Constant(V32I8, [8] * 32))
                elif kind == "iq4_nl":
                    idx = _nibbles32(builder, builder.gep(blk, [ir.Constant(I64, 2)]))
                    qw = _pshufb(builder, _iq4_table(builder), idx)
                elif kind == "q5_0":
                    qw = _nibbles32(builder, builder.gep(blk, [ir.Constant(I64, 6)]))
                    qw = builder.or_(qw, _bits32(builder, builder.gep(blk, [ir.Constant(I64, 2)])))
                    qw = builder.sub(qw, ir.Constant(V32I8, [16] * 32))
                elif kind == "q4_1":
                    signed = False
                    qw = _nibbles32(builder, builder.gep(blk, [ir.Constant(I64, 4)]))
                else:  # q5_1
                    signed = False
                    qw = _nibbles32(builder, builder.gep(blk, [ir.Constant(I64, 8)]))
                    qw = builder.or_(qw, _bits32(builder, builder.gep(blk, [ir.Constant(I64, 4)])))
                if signed:
                    uw = _psign(builder, qw, qw)  # |w| as unsigned bytes (exact even for -128)
                else:
                    mw = _f16(builder, builder.gep(blk, [ir.Constant(I64, 2)]), lutp)
                for i in toks:
                    qx = _load(builder, builder.gep(xps[i], [builder.mul(b, ir.Constant(I64, 32))]), V32I8)
                    dx = builder.load(builder.gep(xdps[i], [b]))
                    if signed:
                        isum = _maddubs(builder, uw, _psign(builder, qx, qw))
                    else:
                        isum = _maddubs(builder, qw, qx)
                        sx = builder.load(builder.gep(xsps[i], [b]))
                        builder.store(builder.fadd(builder.load(accms[i]), builder.fmul(mw, sx)), accms[i])
                    f = builder.sitofp(isum, V8F32)
                    sc = _splat(builder, builder.fmul(dw, dx), V8F32)
                    builder.store(builder.call(fma, [f, sc, builder.load(accs[i])]), accs[i])
            res = [builder.fadd(_hsum8(builder, builder.load(accs[i])), builder.load(accms[i])) for i in toks]
            if ntok == 1:
                return res[0]
            return context.make_tuple(builder, ret, res)

        return sig, codegen

    return dot





# ----------------------------------------------------------------------------- super-blocks
V8I16 = ir.VectorType(I16, 8)


def _pmaddubs16(builder, u, s):
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [V32I8, V32I8]), [u, s])


def _pmaddwd(builder, a, b):
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16]), [a, b])


def _opaque16(builder, v):
    """v <16 x i16> unchanged, but opaque to LLVM's shuffle combining (see _q4k_body)."""
    return builder.call(ir.InlineAsm(ir.FunctionType(V16I16, [V16I16]), "", "=x,0"), [v])


def _pair_scales(builder, sc16):
    """16 group scales <16 x i16> (group g in lane g) -> pair(k): the <16 x i16> with scale 2k
    in lanes 0..7 and 2k+1 in lanes 8..15, what one vpmaddubsw of 32 codes (two groups of 16)
    needs for its vpmaddwd. The scales are ordered [evens | odds] once per block, so each pair
    is one in-lane vpshufb (k-th word of each 128-bit lane), not a shuffle and a sign extension:
    those two were 16 of a Q6_K block's ~90 instructions, half of them on one port."""
    idx = ir.VectorType(I32, 16)
    eo = _opaque16(builder, builder.shuffle_vector(sc16, sc16, ir.Constant(idx, list(range(0, 16, 2)) + list(range(1, 16, 2)))))
    eob = builder.bitcast(eo, V32I8)

    def pair(k):
        return builder.bitcast(_pshufb(builder, eob, ir.Constant(V32I8, [2 * k, 2 * k + 1] * 16)), V16I16)
    return pair


def _packssdw(builder, a, b):
    return builder.call(_fn(builder, "llvm.x86.avx2.packssdw", V16I16, [V8I32, V8I32]), [a, b])


# packssdw(bs[0:8], bs[8:16]) puts the 16 int32 in these word lanes (in-lane packing)
_PACK_ORDER = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]


def _group_scales(builder, sc8, signed):
    """A block's 16 group scales <16 x i8> as <16 x i16> in the word order _group_dot's packed
    activation sums take (once per block, shared by the tokens)."""
    order = builder.shuffle_vector(sc8, sc8, ir.Constant(ir.VectorType(I32, 16), _PACK_ORDER))
    return (builder.sext if signed else builder.zext)(order, ir.VectorType(I16, 16))


def _group_dot(builder, gsc, bsp):
    """Σ_g sc_g·bsum_g over a block's 16 groups, spread over <8 x i32> lanes: gsc from
    _group_scales, bsp the 16 int32 activation sums (each within int16: 16 codes of |x| <= 127).
    One vpackssdw and one vpmaddwd in 256-bit registers: as a <16 x i32> multiply, LLVM used a
    512-bit vpmulld where AVX-512 exists, which also shuts port 1's vector units for a while
    (Q6_K rows ~10% slower)."""
    bs16 = _packssdw(builder, _load(builder, bsp, V8I32, align=4),
                     _load(builder, builder.gep(bsp, [ir.Constant(I64, 8)]), V8I32, align=4))
    return _pmaddwd(builder, bs16, gsc)


def _c8(v):
    return ir.Constant(V32I8, [v & 0xFF] * 32)


class _Acc:
    """Per-token <8 x i32> accumulators: add(q, x_offset, scale_vec) over every token tile."""

    def __init__(self, builder, xps, ld):
        self.b, self.xps, self.ld = builder, xps, ld
        self.accs = [ir.Constant(V8I32, [0] * 8) for _ in xps]

    def add(self, q, xo, scale, signed=False, sub=None):
        b = self.b
        if signed:
            u = _psign(b, q, q)
        for i, xp in enumerate(self.xps):
            x = self.ld(xp, xo)
            if signed:
                p16 = _pmaddubs16(b, u, _psign(b, x, q))
            else:
                p16 = _pmaddubs16(b, q, x)
            if sub is not None:
                p16 = b.sub(p16, _pmaddubs16(b, sub, x))
            self.accs[i] = b.add(self.accs[i], _pmaddwd(b, p16, scale))

    def result(self, i):
        return self.accs[i]


def _q4k_body(builder, wp, acc, sm2, ld, qh_off=None, qs_off=16):
    """Q4_K / Q5_K: 8 groups of 32, unsigned codes; sm2 the block's scale bytes (_q4k_scale_bytes)
    in both 128-bit lanes. Group g's scale, zero-extended to every 16-bit lane, is one in-lane
    vpshufb of them (indices [g, 0x80]: the 0x80 writes the zero high byte), not an extract and
    a broadcast: from memory the rows' speed follows their instruction count (docs/ARCHITECTURE.md)."""
    qh = ld(wp, 16) if qh_off is not None else None
    for p in range(4):
        v = ld(wp, qs_off + 32 * p)
        lo = builder.and_(v, _c8(15))
        hi = builder.and_(builder.lshr(v, _c8(4)), _c8(15))
        for g, q in ((2 * p, lo), (2 * p + 1, hi)):
            if qh is not None:
                hb = builder.and_(builder.lshr(qh, _c8(g)), _c8(1))
                q = builder.or_(q, builder.shl(hb, _c8(4)))
            scale = builder.bitcast(_pshufb(builder, sm2, ir.Constant(V32I8, [g, 0x80] * 16)), V16I16)
            acc.add(q, 32 * g, scale)


def _q4k_lanes(builder, both):
    """The 16 scale/min bytes in both 128-bit lanes of a <32 x i8>, opaque to LLVM's shuffle
    combining (which would otherwise fold each group's vpshufb into wider or cross-lane ones)."""
    v = builder.shuffle_vector(both, both, ir.Constant(ir.VectorType(I32, 32), list(range(16)) * 2))
    v = builder.bitcast(_opaque16(builder, builder.bitcast(v, V16I16)), V32I8)
    return v


# the mins, zero-extended to 16 bits, in the word order of the packed activation sums
# (_PACK_ORDER: bsum j belongs to group j // 2; the mins are bytes 8..15 of the scale bytes)
_Q4K_MIN_IDX = [x for j in _PACK_ORDER[:8] for x in (8 + j // 2, 0x80)] + \
               [x for j in _PACK_ORDER[8:] for x in (8 + j // 2, 0x80)]


def _q5k_body(builder, wp, acc, sm2, ld):
    _q4k_body(builder, wp, acc, sm2, ld, qh_off=16, qs_off=48)


def _q6k_body(builder, wp, acc, pair, ld):
    """Q6_K: Σ_g sc_g Σ q x with q the unsigned 6-bit code 0..63 (caller subtracts 32·Σ sc·bsum)."""
    for n in range(2):
        a = ld(wp, 64 * n)
        c = ld(wp, 64 * n + 32)
        h = ld(wp, 128 + 32 * n)
        parts = (
            builder.or_(builder.and_(a, _c8(15)), builder.shl(builder.and_(h, _c8(3)), _c8(4))),
            builder.or_(builder.and_(c, _c8(15)), builder.shl(builder.and_(builder.lshr(h, _c8(2)), _c8(3)), _c8(4))),
            builder.or_(builder.lshr(a, _c8(4)), builder.shl(builder.and_(builder.lshr(h, _c8(4)), _c8(3)), _c8(4))),
            builder.or_(builder.lshr(c, _c8(4)), builder.shl(builder.lshr(h, _c8(6)), _c8(4))),
        )
        for p, q in enumerate(parts):
            acc.add(q, 128 * n + 32 * p, pair(4 * n + p))


def _q2k_body(builder, wp, acc, pair, ld):
    """Q2_K: Σ_g sc_g Σ q x, q 2-bit unsigned (caller handles the min term)."""
    for n in range(2):
        v = ld(wp, 16 + 32 * n)
        for j in range(4):
            q = builder.and_(builder.lshr(v, _c8(2 * j)), _c8(3))
            acc.add(q, 16 * (8 * n + 2 * j), pair(4 * n + j))


def _q3k_body(builder, wp, acc, pair, ld):
    """Q3_K: Σ_g sc_g Σ q x with q = 2-bit code - (hmask bit ? 0 : 4), sc signed."""
    hm = ld(wp, 0)
    nhm = builder.xor(hm, _c8(0xFF))
    for n in range(2):
        v = ld(wp, 32 + 32 * n)
        for j in range(4):
            q = builder.and_(builder.lshr(v, _c8(2 * j)), _c8(3))
            m4 = builder.shl(builder.and_(builder.lshr(nhm, _c8(4 * n + j)), _c8(1)), _c8(2))
            acc.add(q, 16 * (8 * n + 2 * j), pair(4 * n + j), sub=m4)


def _iq4_table(builder):
    vals = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    return ir.Constant(V32I8, [v & 0xFF for v in vals] * 2)


def _pshufb(builder, table, idx):
    return builder.call(_fn(builder, "llvm.x86.avx2.pshuf.b", V32I8, [V32I8, V32I8]), [table, idx])


def _iq4xs_body(builder, wp, acc, scs, ld):
    """IQ4_XS: 8 groups of 32 (16 bytes each: low nibbles values 0..15, high 16..31), signed ls-32."""
    tab = _iq4_table(builder)
    for ib in range(8):
        v = ld(wp, 8 + 16 * ib, V16I8)
        lo = builder.and_(v, ir.Constant(V16I8, [15] * 16))
        hi = builder.lshr(v, ir.Constant(V16I8, [4] * 16))
        idx = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        acc.add(_pshufb(builder, tab, idx), 32 * ib, _splat(builder, scs[ib], V16I16), signed=True)


TILE = 4

dot_q8_0_row = _legacy_row("q8_0")
dot_q4_0_row = _legacy_row("q4_0")
dot_q4_1_row = _legacy_row("q4_1")
dot_q5_0_row = _legacy_row("q5_0")
dot_q5_1_row = _legacy_row("q5_1")
dot_iq4_nl_row = _legacy_row("iq4_nl")
dot4_q8_0_row = _legacy_row("q8_0", TILE)
dot4_q4_0_row = _legacy_row("q4_0", TILE)
dot4_q4_1_row = _legacy_row("q4_1", TILE)
dot4_q5_0_row = _legacy_row("q5_0", TILE)
dot4_q5_1_row = _legacy_row("q5_1", TILE)
dot4_iq4_nl_row = _legacy_row("iq4_nl", TILE)
# 2- and 3-token tails of a tile (a speculative verification of 2-3 tokens, a batch's last
# T % 4 tokens): each weight block decoded once for them too, each token summed as in decode
dot2_q8_0_row, dot3_q8_0_row = _legacy_row("q8_0", 2), _legacy_row("q8_0", 3)
dot2_q4_0_row, dot3_q4_0_row = _legacy_row("q4_0", 2), _legacy_row("q4_0", 3)
dot2_q4_1_row, dot3_q4_1_row = _legacy_row("q4_1", 2), _legacy_row("q4_1", 3)
dot2_q5_0_row, dot3_q5_0_row = _legacy_row("q5_0", 2), _legacy_row("q5_0", 3)
dot2_q5_1_row, dot3_q5_1_row = _legacy_row("q5_1", 2), _legacy_row("q5_1", 3)
dot2_iq4_nl_row, dot3_iq4_nl_row = _legacy_row("iq4_nl", 2), _legacy_row("iq4_nl", 3)


# ----------------------------------------------------------------------------- k-quant rows
V8I8 = ir.VectorType(I8, 8)


def _i32c(v):
    return ir.Constant(I32, v)


def _q4k_scale_bytes(builder, blk):
    """Q4_K/Q5_K packed 6-bit scales (12 bytes b0..b11 at blk+4) -> <16 x i8>: the 8 scales in
    bytes 0..7, the 8 mins in bytes 8..15.

    In vector lanes, a few instructions: scales 0..3 = b0..b3 & 63, mins 0..3 = b4..b7 & 63;
    scales 4..7 = (b8..b11 & 15) | (b0..b3 >> 6) << 4, mins 4..7 = (b8..b11 >> 4) | (b4..b7 >> 6) << 4."""
    v = _load(builder, builder.gep(blk, [ir.Constant(I64, 4)]), V16I8)   # (4 bytes of codes after them)
    idx = ir.VectorType(I32, 16)
    a = builder.shuffle_vector(v, v, ir.Constant(idx, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]))
    masked = builder.and_(a, ir.Constant(V16I8, [63] * 4 + [15] * 4 + [63] * 4 + [255] * 4))
    high4 = builder.lshr(a, ir.Constant(V16I8, [4] * 16))
    low = builder.shuffle_vector(masked, high4, ir.Constant(idx, list(range(12)) + [28, 29, 30, 31]))
    zero = ir.Constant(V16I8, [0] * 16)
    top = builder.shuffle_vector(v, zero, ir.Constant(idx, [16] * 4 + [0, 1, 2, 3] + [16] * 4 + [4, 5, 6, 7]))
    top = builder.and_(builder.lshr(top, ir.Constant(V16I8, [2] * 16)), ir.Constant(V16I8, [0x30] * 16))  # (b >> 6) << 4
    return builder.or_(low, top)


def _q4k_unpack(builder, blk):
    """Q4_K/Q5_K scales -> (8 scales <8 x i16>, 8 mins <8 x i32>)."""
    both = _q4k_scale_bytes(builder, blk)
    sc = builder.zext(builder.shuffle_vector(both, both, ir.Constant(ir.VectorType(I32, 8), list(range(8)))), V8I16)
    mins = builder.zext(builder.shuffle_vector(both, both, ir.Constant(ir.VectorType(I32, 8), list(range(8, 16)))), V8I32)
    return sc, mins


def _q3k_unpack(builder, blk):
    """Q3_K: 16 six-bit scales packed in the 12 bytes at blk+96 -> <16 x i16> signed (value - 32).

    Words a0, a1 hold the low 4 bits (scales 0..7 in the low nibbles, 8..15 in the high
    ones), a2 the top 2 bits of all 16; byte masks 0x0f / 0x03 put each scale in a byte."""
    a0, a1, a2 = (_load(builder, builder.gep(blk, [ir.Constant(I64, 96 + 4 * i)]), I32) for i in range(3))
    k1, k2 = _i32c(0x03030303), _i32c(0x0F0F0F0F)

    def part(lo, lo_shift, hi_shift):
        low = builder.and_(builder.lshr(lo, _i32c(lo_shift)) if lo_shift else lo, k2)
        high = builder.and_(builder.lshr(a2, _i32c(hi_shift)) if hi_shift else a2, k1)
        return builder.or_(low, builder.shl(high, _i32c(4)))

    words = [part(a0, 0, 0), part(a1, 0, 2), part(a0, 4, 4), part(a1, 4, 6)]
    v = ir.Constant(ir.VectorType(I32, 4), ir.Undefined)
    for i, wd in enumerate(words):
        v = builder.insert_element(v, wd, _i32c(i))
    return builder.sub(builder.zext(builder.bitcast(v, V16I8), ir.VectorType(I16, 16)),
                       ir.Constant(ir.VectorType(I16, 16), [32] * 16))


def _iq4xs_unpack(builder, blk):
    """IQ4_XS: 8 six-bit scales (low 4 bits in the nibbles of bytes 4..7, high 2 bits in the
    u16 at byte 2) -> 8 signed i16 (value - 32)."""
    sh = builder.zext(_load(builder, builder.gep(blk, [ir.Constant(I64, 2)]), I16), I32)
    sl = _load(builder, builder.gep(blk, [ir.Constant(I64, 4)]), I32)
    out = []
    for ib in range(8):
        lo = builder.and_(builder.lshr(sl, _i32c(8 * (ib // 2) + 4 * (ib % 2))), _i32c(15))
        hi = builder.and_(builder.lshr(sh, _i32c(2 * ib)), _i32c(3))
        ls = builder.sub(builder.or_(lo, builder.shl(hi, _i32c(4))), _i32c(32))
        out.append(builder.trunc(ls, I16))
    return out


# Decode streams each weight row once from memory, and one core alone keeps too few cache misses
# in flight to reach the machine's bandwidth: the row kernels ask for the bytes PREFETCH_BYTES
# ahead, into L2 (prefetcht1). A prefetch into L1 (t0) holds one of the core's few L1 fill buffers
# until its line arrives from memory, which capped the misses in flight: the 4B shape decoded
# 12-18% faster with t1 on an Intel Xeon (docs/ARCHITECTURE.md). The K-quant kernels, whose
# blocks span 2-4 lines, then pull each line from L2 into L1 PREFETCH_NEAR_BYTES ahead (another
# ~5% there; the legacy kernels' 18-34-byte blocks lost ~4% to the extra instructions).
PREFETCH_BYTES = 4096
PREFETCH_NEAR_BYTES = 1024
_T0, _T1 = 3, 2   # llvm.prefetch locality: 3 -> prefetcht0 (into L1), 2 -> prefetcht1 (into L2)


def _prefetch_ahead(builder, blk, block_bytes, near=False):
    """Prefetch the lines of the block PREFETCH_BYTES past blk into L2 and, with near, those of
    the block PREFETCH_NEAR_BYTES past it into L1 (llvm.prefetch: read, data cache)."""
    fn = _fn(builder, "llvm.prefetch.p0", ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
    ahead = [(PREFETCH_BYTES, _T1)] + ([(PREFETCH_NEAR_BYTES, _T0)] if near else [])
    for dist, locality in ahead:
        for o in range(0, block_bytes, 64):
            builder.call(fn, [builder.gep(blk, [ir.Constant(I64, dist + o)]), _i32c(0), _i32c(locality), _i32c(1)])


def _kq_row(kind, ntok=1):
    """Intrinsic dot(w, woff, xq, xoff, xstride, xd, xdoff, xdstride, bsums, bsoff, bsstride, lut, nb):
    a whole Q2_K / Q4_K / Q5_K / Q6_K weight row (nb super-blocks from byte woff) against ntok Q8_K
    activation rows -> float32 or UniTuple(float32, ntok). Scales unpacked, min / offset
    terms and float accumulation all in vector registers; one horizontal sum per row."""
    ts = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210, "iq4_xs": 136}[kind]

    @intrinsic
    def dot(typingctx, w, woff, xq, xoff, xstride, xd, xdoff, xdstride, bsums, bsoff, bsstride, lut, nb):
        _require(w=(w, BYTES), xq=(xq, BYTES), xd=(xd, FLOAT), bsums=(bsums, INT32), lut=(lut, FLOAT))
        ret = types.float32 if ntok == 1 else types.UniTuple(types.float32, ntok)
        sig = ret(w, woff, xq, xoff, xstride, xd, xdoff, xdstride, bsums, bsoff, bsstride, lut, nb)

        def codegen(context, builder, sig, args):
            (w_, woff_, xq_, xoff_, xstride_, xd_, xdoff_, xdstride_, bs_, bsoff_, bsstride_, lut_, nb_) = args
            wp = builder.gep(_data(context, builder, sig.args[0], w_), [woff_])
            x0 = _data(context, builder, sig.args[2], xq_)
            xd0 = _data(context, builder, sig.args[5], xd_)
            bs0 = _data(context, builder, sig.args[8], bs_)
            lutp = _data(context, builder, sig.args[11], lut_)
            toks = range(ntok)

            def at(base, off, stride, i):
                return builder.gep(base, [builder.add(off, builder.mul(stride, ir.Constant(I64, i)))])

            xps = [at(x0, xoff_, xstride_, i) for i in toks]
            xdps = [at(xd0, xdoff_, xdstride_, i) for i in toks]
            bsps = [at(bs0, bsoff_, bsstride_, i) for i in toks]
            faccs = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, [0.0] * 8)) for _ in toks]
            fma = _fn(builder, "llvm.fma.v8f32", V8F32, [V8F32, V8F32, V8F32])
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                blk = builder.gep(wp, [builder.mul(b, ir.Constant(I64, ts))])
                _prefetch_ahead(builder, blk, ts, near=True)

                def ld(p, o, ty=V32I8):
                    return _load(builder, builder.gep(p, [ir.Constant(I64, o)]), ty)

                xb = [builder.gep(xps[i], [builder.mul(b, ir.Constant(I64, 256))]) for i in toks]
                bsb = [builder.gep(bsps[i], [builder.mul(b, ir.Constant(I64, 16))]) for i in toks]
                acc = _Acc(builder, xb, ld)
                if kind in ("q4_k", "q5_k"):
                    d = _f16(builder, blk, lutp)
                    dmin = _f16(builder, builder.gep(blk, [ir.Constant(I64, 2)]), lutp)
                    sm2 = _q4k_lanes(builder, _q4k_scale_bytes(builder, blk))
                    mins = builder.bitcast(_pshufb(builder, sm2, ir.Constant(V32I8, _Q4K_MIN_IDX)), V16I16)
                    (_q4k_body if kind == "q4_k" else _q5k_body)(builder, blk, acc, sm2, ld)
                    for i in toks:
                        dx = builder.load(builder.gep(xdps[i], [b]))
                        mterm = _group_dot(builder, mins, bsb[i])   # Σ_g min_g·(bsum_2g + bsum_2g+1)
                        fa = builder.load(faccs[i])
                        fa = builder.call(fma, [builder.sitofp(acc.result(i), V8F32), _splat(builder, builder.fmul(d, dx), V8F32), fa])
                        fa = builder.call(fma, [builder.sitofp(mterm, V8F32), _splat(builder, builder.fneg(builder.fmul(dmin, dx)), V8F32), fa])
                        builder.store(fa, faccs[i])
                elif kind in ("q3_k", "iq4_xs"):  # one scale d, signed group scales, no min term
                    if kind == "q3_k":
                        d = _f16(builder, builder.gep(blk, [ir.Constant(I64, 108)]), lutp)
                        _q3k_body(builder, blk, acc, _pair_scales(builder, _q3k_unpack(builder, blk)), ld)
                    else:
                        d = _f16(builder, blk, lutp)
                        scs = _iq4xs_unpack(builder, blk)
                        _iq4xs_body(builder, blk, acc, scs, ld)
                    for i in toks:
                        dx = builder.load(builder.gep(xdps[i], [b]))
                        fa = builder.call(fma, [builder.sitofp(acc.accs[i], V8F32), _splat(builder, builder.fmul(d, dx), V8F32),
                                                builder.load(faccs[i])])
                        builder.store(fa, faccs[i])
                elif kind == "q2_k":
                    d = _f16(builder, builder.gep(blk, [ir.Constant(I64, 80)]), lutp)
                    dmin = _f16(builder, builder.gep(blk, [ir.Constant(I64, 82)]), lutp)
                    s8 = _load(builder, blk, V16I8)  # low nibble: scale, high nibble: min
                    sc16 = builder.zext(builder.and_(s8, ir.Constant(V16I8, [15] * 16)), ir.VectorType(I16, 16))
                    mins = _group_scales(builder, builder.lshr(s8, ir.Constant(V16I8, [4] * 16)), signed=False)
                    _q2k_body(builder, blk, acc, _pair_scales(builder, sc16), ld)
                    for i in toks:
                        dx = builder.load(builder.gep(xdps[i], [b]))
                        fa = builder.load(faccs[i])
                        fa = builder.call(fma, [builder.sitofp(acc.accs[i], V8F32), _splat(builder, builder.fmul(d, dx), V8F32), fa])
                        fa = builder.call(fma, [builder.sitofp(_group_dot(builder, mins, bsb[i]), V8F32),
                                                _splat(builder, builder.fneg(builder.fmul(dmin, dx)), V8F32), fa])
                        builder.store(fa, faccs[i])
                else:  # q6_k
                    d = _f16(builder, builder.gep(blk, [ir.Constant(I64, 208)]), lutp)
                    sc8 = _load(builder, builder.gep(blk, [ir.Constant(I64, 192)]), V16I8)
                    gsc = _group_scales(builder, sc8, signed=True)
                    _q6k_body(builder, blk, acc, _pair_scales(builder, builder.sext(sc8, ir.VectorType(I16, 16))), ld)
                    for i in toks:
                        dx = builder.load(builder.gep(xdps[i], [b]))
                        corr = builder.shl(_group_dot(builder, gsc, bsb[i]), ir.Constant(V8I32, [5] * 8))  # 32·Σ sc·bsum
                        isum = builder.sub(acc.result(i), corr)
                        fa = builder.call(fma, [builder.sitofp(isum, V8F32), _splat(builder, builder.fmul(d, dx), V8F32),
                                                builder.load(faccs[i])])
                        builder.store(fa, faccs[i])
            res = [_hsum8(builder, builder.load(faccs[i])) for i in toks]
            if ntok == 1:
                return res[0]
            return context.make_tuple(builder, ret, res)

        return sig, codegen

    return dot


row_q3_k = _kq_row("q3_k")
row4_q3_k = _kq_row("q3_k", TILE)
row_iq4_xs = _kq_row("iq4_xs")
row4_iq4_xs = _kq_row("iq4_xs", TILE)
row_q2_k = _kq_row("q2_k")
row4_q2_k = _kq_row("q2_k", TILE)
row_q4_k = _kq_row("q4_k")
row_q5_k = _kq_row("q5_k")
row_q6_k = _kq_row("q6_k")
row4_q4_k = _kq_row("q4_k", TILE)
row4_q5_k = _kq_row("q5_k", TILE)
row4_q6_k = _kq_row("q6_k", TILE)
row2_q2_k, row3_q2_k = _kq_row("q2_k", 2), _kq_row("q2_k", 3)   # tails, as dot2_* / dot3_*
row2_q3_k, row3_q3_k = _kq_row("q3_k", 2), _kq_row("q3_k", 3)
row2_q4_k, row3_q4_k = _kq_row("q4_k", 2), _kq_row("q4_k", 3)
row2_q5_k, row3_q5_k = _kq_row("q5_k", 2), _kq_row("q5_k", 3)
row2_q6_k, row3_q6_k = _kq_row("q6_k", 2), _kq_row("q6_k", 3)
row2_iq4_xs, row3_iq4_xs = _kq_row("iq4_xs", 2), _kq_row("iq4_xs", 3)


# ----------------------------------------------------------------------------- F16 / BF16 rows
V8I16_ = ir.VectorType(I16, 8)


def _float_row(kind, ntok=1):
    """Intrinsic dot(w, woff, x, xoff, xstride, n16): Σ_k w[k]·x[k] over the first 16·n16
    16-bit weights at element woff (F16: `fpext <8 x half>` = vcvtph2ps; BF16: the bits
    shifted into the high half of a float32) against ntok float32 rows -> float32 or
    UniTuple(float32, ntok). Two <8 x float> FMA chains per token; the caller adds the tail."""

    @intrinsic
    def dot(typingctx, w, woff, x, xoff, xstride, n16):
        _require(w=(w, (types.uint16, types.int16)), x=(x, FLOAT))
        ret = types.float32 if ntok == 1 else types.UniTuple(types.float32, ntok)
        sig = ret(w, woff, x, xoff, xstride, n16)

        def codegen(context, builder, sig, args):
            w_, woff_, x_, xoff_, xstride_, n16_ = args
            wp = builder.gep(_data(context, builder, sig.args[0], w_), [woff_])
            x0 = _data(context, builder, sig.args[2], x_)
            toks = range(ntok)
            xps = [builder.gep(x0, [builder.add(xoff_, builder.mul(xstride_, ir.Constant(I64, i)))]) for i in toks]
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(V8F32, [0.0] * 8)) for _ in range(2)] for _ in toks]
            fma = _fn(builder, "llvm.fma.v8f32", V8F32, [V8F32, V8F32, V8F32])
            with cgutils.for_range(builder, n16_) as loop:
                base = builder.mul(loop.index, ir.Constant(I64, 16))
                for h in range(2):
                    o = builder.add(base, ir.Constant(I64, 8 * h))
                    raw = _load(builder, builder.gep(wp, [o]), V8I16_, align=2)
                    if kind == "f16":
                        wf = builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), 8)), V8F32)
                    else:
                        wf = builder.bitcast(builder.shl(builder.zext(raw, V8I32), ir.Constant(V8I32, [16] * 8)), V8F32)
                    for i in toks:
                        xv = _load(builder, builder.gep(xps[i], [o]), V8F32, align=4)
                        builder.store(builder.call(fma, [wf, xv, builder.load(accs[i][h])]), accs[i][h])
            res = [_hsum8(builder, builder.fadd(builder.load(accs[i][0]), builder.load(accs[i][1]))) for i in toks]
            if ntok == 1:
                return res[0]
            return context.make_tuple(builder, ret, res)

        return sig, codegen

    return dot


row_f16 = _float_row("f16")
row4_f16 = _float_row("f16", TILE)
row_bf16 = _float_row("bf16")
row4_bf16 = _float_row("bf16", TILE)
