"""One decode step of a `llama` model (SmolLM2, Llama) in a single compiled call.

Why: a token of SmolLM2-135M is ~300 kernel calls of a few µs each. Called from Python, each
one pays the interpreter, numba's argument unboxing and a few numpy allocations: ~2 ms a
token on a 2-core AVX2 machine, a fifth of the step. Here the whole layer loop runs inside
numba: the same kernels (simd_kernels' row kernels, ops' RMSNorm, RoPE and decode attention,
activations' quantizers), called in the same order on preallocated buffers, so the logits are
bit for bit those of `Model.forward` one token at a time (tests/engine/test_fused_decode.py).

    x = embed(token)                                     (1, D)         Python (one row)
    for each layer l:                                   inside numba:
        n = RMSNorm(x) * attn_norm[l]
        q, k, v = Wq n, Wk n, Wv n                       one quantization of n, row kernels
        RoPE(q, k); k, v -> cache[l] at p0 (fp16)        rope_store_f16c
        att = attend(q, cache[l][: p0 + 1])              attention_decode_f16c
        x += Wo att
        m = RMSNorm(x) * ffn_norm[l]
        x += Wdown (silu(Wgate m) * Wup m)
    logits = Wout RMSNorm(x) * output_norm               (1, V)

The same call takes up to MAX_TOKENS tokens for a speculative verification (`forward(...,
token_exact=True, logits="all")`): the row kernels over T rows and attention query by query,
so row t equals a decode step of token t alone, bit for bit.

Used only where its kernels are the ones decode would run: the AVX2 row kernels with F16C,
weights in the formats below (others fall back to the layer-by-layer path). Set
DELTATALK_NO_FUSED_DECODE=1 to turn it off (the bench compares both that way).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from gguf import GGMLQuantizationType as G

from engine import ops
from engine.cache import KV_DTYPE, kv_block
from engine.jit import JIT_EXACT, release_linking_bitcode
from engine.quants.linear import KERNEL_FAMILY, QuantLinear
from engine.quants.activations import _q8_0_kernel, _q8_k_kernel
from engine.quants.common import F16_TO_F32, HAVE_F16C

# The formats whose decode kernels this step calls, with the activation each one takes.
ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2
FORMAT_ACT = {int(G.Q4_0): ACT_Q8_0, int(G.Q5_0): ACT_Q8_0, int(G.Q8_0): ACT_Q8_0,
              int(G.Q4_1): ACT_Q8_1, int(G.Q5_1): ACT_Q8_1,
              int(G.Q4_K): ACT_Q8_K, int(G.Q5_K): ACT_Q8_K, int(G.Q6_K): ACT_Q8_K}

if KERNEL_FAMILY in ("avx2", "avx-vnni"):
    from engine.quants import simd_kernels as _sk

    _MV = {k: _sk.KERNELS[k] for k in FORMAT_ACT}
    _MV3 = {k: _sk.MULTI_KERNELS[k] for k in FORMAT_ACT}
    _mv_q4_0, _mv_q4_1, _mv_q5_0, _mv_q5_1, _mv_q8_0, _mv_q4_k, _mv_q5_k, _mv_q6_k = (
        _MV[int(t)] for t in (G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0, G.Q4_K, G.Q5_K, G.Q6_K))
    _m3_q4_0, _m3_q4_1, _m3_q5_0, _m3_q5_1, _m3_q8_0, _m3_q4_k, _m3_q5_k, _m3_q6_k = (
        _MV3[int(t)] for t in (G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0, G.Q4_K, G.Q5_K, G.Q6_K))
    AVAILABLE = HAVE_F16C
else:  # the portable family has no row kernels to call: the layer-by-layer path only
    AVAILABLE = False

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = int(G.Q4_0), int(G.Q4_1), int(G.Q5_0), int(G.Q5_1), int(G.Q8_0)
_Q4_K, _Q5_K, _Q6_K = int(G.Q4_K), int(G.Q5_K), int(G.Q6_K)


# Most tokens one call takes: a decode step is 1, a speculative verification k + 1 (k <= 15).
MAX_TOKENS = 16

# sha256 of the callees' sources (engine/kernel_stamp.py): an edit there changes this file, so
# numba's cache of the step is rebuilt instead of keeping the old callees' code
CALLEE_SOURCES_SHA256 = "ddac46de14d6fd18b49295e8d17b8be798d7dcc02b1139f509a36f37f4169799"


def enabled() -> bool:
    return AVAILABLE and os.environ.get("DELTATALK_NO_FUSED_DECODE", "") != "1"


if AVAILABLE:
    @numba.njit(**JIT_EXACT)
    def _quantize(act, X, xq, xd, xs, kd, kb, lut):
        """X (T, K) into the activation buffers of `act` (viewed (T, K)-shaped)."""
        T, K = X.shape
        q = xq[: T * K].reshape(T, K)
        if act == ACT_Q8_K:
            _q8_k_kernel(X, q, kd[: T * (K // 256)].reshape(T, K // 256), kb[: T * (K // 16)].reshape(T, K // 16))
        else:
            _q8_0_kernel(X, q, xd[: T * (K // 32)].reshape(T, K // 32), act == ACT_Q8_1,
                         xs[: T * (K // 32)].reshape(T, K // 32), lut)

    @numba.njit(**JIT_EXACT)
    def _matvec(kind, w, K, xq, xd, xs, kd, kb, lut, out):
        """out (T, N) = X W^T with the format's decode kernel, X quantized in the buffers."""
        T = out.shape[0]
        q = xq[: T * K].reshape(T, K)
        d, s = xd[: T * (K // 32)].reshape(T, K // 32), xs[: T * (K // 32)].reshape(T, K // 32)
        dk, bk = kd[: T * (K // 256)].reshape(T, K // 256), kb[: T * (K // 16)].reshape(T, K // 16)
        if kind == _Q4_0:
            _mv_q4_0(w, q, d, lut, out)
        elif kind == _Q4_1:
            _mv_q4_1(w, q, d, s, lut, out)
        elif kind == _Q5_0:
            _mv_q5_0(w, q, d, lut, out)
        elif kind == _Q5_1:
            _mv_q5_1(w, q, d, s, lut, out)
        elif kind == _Q8_0:
            _mv_q8_0(w.view(np.int8), q, d, lut, out)
        elif kind == _Q4_K:
            _mv_q4_k(w, q, dk, bk, lut, out)
        elif kind == _Q5_K:
            _mv_q5_k(w, q, dk, bk, lut, out)
        elif kind == _Q6_K:
            _mv_q6_k(w, q, dk, bk, lut, out)

    @numba.njit(**JIT_EXACT)
    def _matvec3(kind, w0, w1, w2, K, xq, xd, xs, kd, kb, lut, o0, o1, o2):
        """Three weights of one format, one shared activation, one parallel region."""
        T = o0.shape[0]
        q = xq[: T * K].reshape(T, K)
        d, s = xd[: T * (K // 32)].reshape(T, K // 32), xs[: T * (K // 32)].reshape(T, K // 32)
        dk, bk = kd[: T * (K // 256)].reshape(T, K // 256), kb[: T * (K // 16)].reshape(T, K // 16)
        if kind == _Q4_0:
            _m3_q4_0(w0, w1, w2, q, d, d, lut, o0, o1, o2)
        elif kind == _Q4_1:
            _m3_q4_1(w0, w1, w2, q, d, s, lut, o0, o1, o2)
        elif kind == _Q5_0:
            _m3_q5_0(w0, w1, w2, q, d, d, lut, o0, o1, o2)
        elif kind == _Q5_1:
            _m3_q5_1(w0, w1, w2, q, d, s, lut, o0, o1, o2)
        elif kind == _Q8_0:
            _m3_q8_0(w0.view(np.int8), w1.view(np.int8), w2.view(np.int8), q, d, d, lut, o0, o1, o2)
        elif kind == _Q4_K:
            _m3_q4_k(w0, w1, w2, q, dk, bk, lut, o0, o1, o2)
        elif kind == _Q5_K:
            _m3_q5_k(w0, w1, w2, q, dk, bk, lut, o0, o1, o2)
        elif kind == _Q6_K:
            _m3_q6_k(w0, w1, w2, q, dk, bk, lut, o0, o1, o2)

    @numba.njit(**JIT_EXACT)
    def _group(kinds, acts, w0, w1, w2, X, xq, xd, xs, kd, kb, lut, o0, o1, o2):
        """Y_i = W_i X for 2-3 weights reading X (w2/o2 empty for a pair): X quantized once per
        activation type; one fused launch when the formats match (equal to separate calls)."""
        K = X.shape[1]
        n = 3 if o2.shape[1] > 0 else 2
        same = kinds[0] == kinds[1] and (n == 2 or kinds[1] == kinds[2])
        _quantize(acts[0], X, xq, xd, xs, kd, kb, lut)
        if same:
            _matvec3(kinds[0], w0, w1, w2, K, xq, xd, xs, kd, kb, lut, o0, o1, o2)
            return
        cur = acts[0]
        _matvec(kinds[0], w0, K, xq, xd, xs, kd, kb, lut, o0)
        if acts[1] != cur:
            _quantize(acts[1], X, xq, xd, xs, kd, kb, lut)
            cur = acts[1]
        _matvec(kinds[1], w1, K, xq, xd, xs, kd, kb, lut, o1)
        if n == 3:
            if acts[2] != cur:
                _quantize(acts[2], X, xq, xd, xs, kd, kb, lut)
            _matvec(kinds[2], w2, K, xq, xd, xs, kd, kb, lut, o2)

    @numba.njit(**JIT_EXACT)
    def _add(x, y):
        for t in range(x.shape[0]):
            for i in range(x.shape[1]):
                x[t, i] += y[t, i]

    @numba.njit(**JIT_EXACT)
    def _weight(blocks, where, l, i):
        """Weight i of layer l: its (rows, row_bytes) blocks inside the mapped file."""
        off, rows, row_bytes = where[l, i, 0], where[l, i, 1], where[l, i, 2]
        return blocks[off : off + rows * row_bytes].reshape(rows, row_bytes)

    @numba.njit(**JIT_EXACT)
    def _decode_step(x, p0, kinds, acts, attn_norm, ffn_norm, blocks, where, w_none,
                     keys, values, cos, sin, n_rot, eps, scale, n_runs, H, Hkv, hd,
                     n, q, k, v, att, o, g, u, f, o_none,
                     xq, xd, xs, kd, kb, lut, out_norm, head_kind, head_act, head, h, logits):
        """kinds/acts (L, 7): q k v o gate up down; where (L, 7, 3): offset, rows, row bytes of
        each weight in `blocks` (the file, uint8). keys/values (L, n_ctx, Hkv, hd) fp16 bits. Every
        buffer (T, width) float32: T tokens at positions p0.. (decode: 1; a speculative
        verification: each row exactly as if fed alone, decode's single-query attention)."""
        L = attn_norm.shape[0]
        T = x.shape[0]
        for l in range(L):
            wq, wk, wv = _weight(blocks, where, l, 0), _weight(blocks, where, l, 1), _weight(blocks, where, l, 2)
            wo, wg, wu = _weight(blocks, where, l, 3), _weight(blocks, where, l, 4), _weight(blocks, where, l, 5)
            wd = _weight(blocks, where, l, 6)
            ops.rmsnorm(x, attn_norm[l], eps, n)
            _group(kinds[l, 0:3], acts[l, 0:3], wq, wk, wv, n, xq, xd, xs, kd, kb, lut, q, k, v)
            ops.rope_store_f16c(q.reshape(T, H, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd), cos, sin,
                                p0, n_rot, False, keys[l], values[l])
            for t in range(T):   # query by query: row t equals a decode step at p0 + t
                ops.attention_decode_f16c(q[t : t + 1].reshape(1, H, hd), keys[l], values[l], p0 + t, scale,
                                          att[t : t + 1].reshape(1, H, hd), n_runs)
            _quantize(acts[l, 3], att, xq, xd, xs, kd, kb, lut)
            _matvec(kinds[l, 3], wo, att.shape[1], xq, xd, xs, kd, kb, lut, o)
            _add(x, o)
            ops.rmsnorm(x, ffn_norm[l], eps, n)
            _group(kinds[l, 4:6], acts[l, 4:6], wg, wu, w_none, n, xq, xd, xs, kd, kb, lut, g, u, o_none)
            ops._swiglu_serial(g, u, g)
            _quantize(acts[l, 6], g, xq, xd, xs, kd, kb, lut)
            _matvec(kinds[l, 6], wd, g.shape[1], xq, xd, xs, kd, kb, lut, f)
            _add(x, f)
        ops.rmsnorm(x, out_norm, eps, h)
        _quantize(head_act, h, xq, xd, xs, kd, kb, lut)
        _matvec(head_kind, head, h.shape[1], xq, xd, xs, kd, kb, lut, logits)


def unsupported_reason(model) -> str | None:
    """Why this dense model's decode cannot run fused here (None: it can): the step implements
    llama's numerics only (engine/models/llama.py), and the formats of FORMAT_ACT."""
    if not enabled():
        return "turned off" if AVAILABLE else f"no fused decode for the {KERNEL_FAMILY} kernels"
    m = type(model)
    if (m.attention_kernel != "attend" or m.rope_neox or m.q_prescale or m.qk_norm or m.post_norms
            or m.activation != "silu" or m.embd_scale or model.output_bias is not None):
        return f"{model.arch}'s numerics are not llama's"
    if any(r is not model.rope[0] for r in model.rope):
        return "RoPE differs between layers"
    for layer in model.layers:
        if layer.w_qkv is not None or layer.w_gate_up is not None:
            return "fused q/k/v or gate/up weights"
        if any(b is not None for b in (layer.bq, layer.bk, layer.bv, layer.bqkv)):
            return "attention biases"
        for lin in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down):
            if lin.fmt.ggml_type not in FORMAT_ACT:
                return f"{lin.name} is {lin.fmt.name}"
    if model.output.fmt.ggml_type not in FORMAT_ACT:
        return f"the output head is {model.output.fmt.name}"
    return None


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _file_blocks(arrays: list[np.ndarray]) -> tuple[np.ndarray, list[int]] | None:
    """The one buffer (the mapped file) that all `arrays` are views of, as flat uint8, and each
    array's byte offset in it; None when they do not share one (then no fused step)."""
    owners = []
    for a in arrays:
        b = a
        while isinstance(b, np.ndarray) and b.base is not None:
            b = b.base
        owners.append(b.obj if isinstance(b, memoryview) else b)   # np.frombuffer wraps the mmap
    owner = owners[0] if owners else None
    if owner is None or isinstance(owner, np.ndarray) or any(o is not owner for o in owners):
        return None
    flat = np.frombuffer(owner, np.uint8)
    base, end = _address(flat), _address(flat) + flat.nbytes
    offsets = [_address(a) - base for a in arrays]
    if any(o < 0 or _address(a) + a.nbytes > end for o, a in zip(offsets, arrays)):
        return None
    return flat, offsets


class FusedDecode:
    """Decode one token of a `llama` Model in a single numba call (see the module docstring)."""

    _released = 0   # overloads of the step whose linking bitcode is dropped (nothing calls it from numba)

    def __init__(self, model, blocks: np.ndarray, offsets: list[int]):
        """blocks: the mapped file (uint8); offsets: of each layer's 7 weights in it, by row."""
        a = model.args
        self.model = model
        self.args = a
        layers = model.layers
        lins: list[list[QuantLinear]] = [[l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down] for l in layers]
        self.kinds = np.array([[lin.fmt.ggml_type for lin in row] for row in lins], np.int64).reshape(-1, 7)
        self.acts = np.vectorize(FORMAT_ACT.__getitem__, otypes=[np.int64])(self.kinds).reshape(-1, 7)
        self.blocks = blocks
        # (L, 7, 3): where each weight's blocks start in the file, its rows and row bytes
        shapes = [[lin.raw.shape for lin in row] for row in lins]
        self.where = np.array([[(offsets[7 * l + i], *shapes[l][i]) for i in range(7)] for l in range(len(lins))],
                              np.int64).reshape(-1, 7, 3)
        self.w_none = blocks[:0].reshape(0, 0)  # the empty third weight of a pair
        self.attn_norm = np.ascontiguousarray(np.stack([l.attn_norm for l in layers]), np.float32)
        self.ffn_norm = np.ascontiguousarray(np.stack([l.ffn_norm for l in layers]), np.float32)
        self.out_norm = np.ascontiguousarray(model.output_norm, np.float32)
        head = model.output
        self.head, self.head_kind, self.head_act = head.raw, head.fmt.ggml_type, FORMAT_ACT[head.fmt.ggml_type]
        D, hd, H, Hkv = a.d_model, a.head_dim, a.n_head, a.n_head_kv

        def buf(width: int) -> np.ndarray:
            return np.zeros((MAX_TOKENS, width), np.float32)

        self.n, self.h = buf(D), buf(D)
        self.q, self.k, self.v = buf(H * hd), buf(Hkv * hd), buf(Hkv * hd)
        self.att, self.o, self.f = buf(H * hd), buf(D), buf(D)
        self.g, self.u = buf(a.n_ff), buf(a.n_ff)
        self.o_none = np.zeros((1, 0), np.float32)
        kmax = MAX_TOKENS * max(D, a.n_ff, H * hd)
        self.xq = np.zeros(kmax, np.int8)
        self.xd, self.xs = np.zeros(kmax // 32, np.float32), np.zeros(kmax // 32, np.float32)
        self.kd, self.kb = np.zeros(max(kmax // 256, 1), np.float32), np.zeros(kmax // 16, np.int32)
        self.scale = model.scale

    @classmethod
    def build(cls, model) -> FusedDecode | None:
        """The fused step for `model`, or None where it cannot run (unsupported_reason, or
        weights that are not all views of one mapped file)."""
        if unsupported_reason(model) is not None:
            return None
        raws = [lin.raw for l in model.layers for lin in (l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down)]
        found = _file_blocks(raws)
        return None if found is None else cls(model, *found)

    def _kv_block(self, cache: list) -> tuple[np.ndarray, np.ndarray]:
        """The caches' (L, n_ctx, heads, dim) keys and values; caches made apart (a restored
        session) are moved into one block first, once."""
        a = self.args
        block = cache[0].block
        if block is None or any(c.block is not block or c.layer != l for l, c in enumerate(cache)):
            block = kv_block(len(cache), cache[0].n_ctx, a.n_head_kv, a.head_dim)
            for l, c in enumerate(cache):
                c.move_to_block(block, l)
        if block[0].shape != (a.n_layer, cache[0].n_ctx, a.n_head_kv, a.head_dim) or block[0].dtype != KV_DTYPE \
                or block[1].shape != block[0].shape or block[1].dtype != KV_DTYPE:
            raise ValueError(f"KV cache of shape {block[0].shape} does not fit the model")
        return block

    def step(self, tokens: np.ndarray, cache: list) -> np.ndarray:
        """Feed 1..MAX_TOKENS tokens at the cache's position (checked by the caller); return
        logits (T, V), row t bit-identical to a decode step of token t alone."""
        m, a = self.model, self.args
        T = len(tokens)
        if not 1 <= T <= MAX_TOKENS:
            raise ValueError(f"the fused step takes 1 to {MAX_TOKENS} tokens, not {T}")
        p0 = cache[0].offset
        if p0 + T > min(c.n_ctx for c in cache):
            raise ValueError(f"context full: {p0} + {T} tokens > {cache[0].n_ctx}")
        keys, values = self._kv_block(cache)
        cos, sin = m.rope[0].upto(p0 + T)
        x = m.embed(np.asarray(tokens, np.int64))
        logits = np.empty((T, a.n_vocab), np.float32)
        _decode_step(x, p0, self.kinds, self.acts, self.attn_norm, self.ffn_norm, self.blocks, self.where, self.w_none,
                     keys, values, cos, sin, a.n_rot, a.norm_eps, self.scale, numba.get_num_threads(),
                     a.n_head, a.n_head_kv, a.head_dim,
                     self.n[:T], self.q[:T], self.k[:T], self.v[:T], self.att[:T], self.o[:T], self.g[:T], self.u[:T],
                     self.f[:T], self.o_none, self.xq, self.xd, self.xs, self.kd, self.kb, F16_TO_F32, self.out_norm,
                     self.head_kind, self.head_act, self.head, self.h[:T], logits)
        for c in cache:
            c.offset = p0 + T
        if len(_decode_step.overloads) != FusedDecode._released:   # a new overload: loaded or compiled
            FusedDecode._released = len(_decode_step.overloads)
            release_linking_bitcode(_decode_step)
        return logits
