"""Small dense ops of the forward pass: RMSNorm, RoPE, attention over the KV cache, SwiGLU.

Each numba kernel has a plain numpy twin (`*_ref`) beside it; tests compare the two.
Numerics follow llama.cpp's CPU backend: norms accumulate in float64, RoPE angles are
built by repeated float32 multiplication, K/V and q are rounded to fp16 for the
attention dot products (llama.cpp keeps an F16 KV cache). The KV cache holds fp16 bit
patterns (uint16: numba has no float16), half the bytes of float32; the kernels widen them
as they read (vcvtph2ps with F16C, else the F16_TO_F32 table).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from engine.cache import f16_bits_of, f16_values_of  # noqa: F401  (the KV cache's format; tests use them from here)
from engine.quants.common import (F16_TO_F32, HAVE_F16C, f16_bits, f16_round, f16_value, f32_to_f16_bits, fma32,
                                  fma32_ref, kq_dot, kq_dot8, kq_dot_lut)

from engine.jit import JIT as _JIT, JIT_EXACT, JIT_EXACT_PAR, JIT_PAR as _JIT_PAR


# --------------------------------------------------------------------------- RMSNorm
@numba.njit(**JIT_EXACT)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w     x, out: (T, D); w: (D,)

    Bit for bit as ggml (rms_norm, then mul): float32 squares summed in order in float64,
    the mean and 1/sqrt in float32, then (x * scale) * w. The next matmul quantizes its input
    (Q8_0/Q8_K), so a 1-ulp difference here can move a block's scale and flip many rounded
    values (gemma3 270M: logits off by ~3 at the second position).
    """
    T, D = x.shape
    e = np.float32(eps)
    for t in range(T):
        s = 0.0
        for i in range(D):
            v = x[t, i]
            s += np.float64(v * v)
        mean = np.float32(s / D)
        scale = np.float32(1.0) / np.float32(np.sqrt(mean + e))
        for i in range(D):
            out[t, i] = (x[t, i] * scale) * w[i]


def rmsnorm_ref(x, w, eps):
    sq = (x * x).astype(np.float64)
    mean = (sq.sum(axis=-1, keepdims=True) / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    return ((x * scale).astype(np.float32) * w).astype(np.float32)


# --------------------------------------------------------------------------- RoPE
class RopeTable:
    """cos/sin (positions, n_rot/2) float32, bit for bit as ggml's rope cache, for the
    positions reached so far: rows are added (doubling) as a conversation grows, so a long
    context window (Qwen3.5: 262K positions, 64 MB of rows) costs only what is used.

    theta starts at the position and is multiplied by powf(base, -2/n_rot) once per pair in
    float32; freq_factors (Llama-3 rope_freqs, Phi-3 long/short factors) divide theta. The
    cos/sin are libm's cosf/sinf (numba's math.cos on float32), not numpy's float32 SIMD
    versions, which are off by an ulp on ~10% of the angles. A row depends on its position
    only, so rows computed later equal rows computed at once.
    """

    MIN_ROWS = 256

    def __init__(self, n_ctx: int, n_rot: int, base: float, freq_factors=None, freq_scale: float = 1.0,
                 attn_factor: float = 1.0):
        half = n_rot // 2
        ff = np.ones(half, np.float32) if freq_factors is None else np.asarray(freq_factors, np.float32)[:half]
        self.n_ctx = int(n_ctx)
        self._args = (np.float32(base), np.float32(-2.0) / np.float32(n_rot), np.ascontiguousarray(ff),
                      np.float32(freq_scale), np.float32(attn_factor))
        self.cos = np.empty((0, half), np.float32)
        self.sin = np.empty((0, half), np.float32)

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin) holding at least positions 0..n-1."""
        have = self.cos.shape[0]
        if n > have:
            if n > self.n_ctx:
                raise ValueError(f"position {n - 1} is past the context of {self.n_ctx}")
            rows = min(self.n_ctx, max(n, 2 * have, self.MIN_ROWS))
            cos = np.empty((rows, self.cos.shape[1]), np.float32)
            sin = np.empty_like(cos)
            cos[:have], sin[:have] = self.cos, self.sin
            _rope_cache(*self._args, have, cos, sin)
            self.cos, self.sin = cos, sin
        return self.cos, self.sin


def rope_tables(n_ctx: int, n_rot: int, base: float, freq_factors=None, freq_scale: float = 1.0,
                attn_factor: float = 1.0):
    """cos/sin (n_ctx, n_rot/2) float32 for every position (see RopeTable)."""
    cos, sin = RopeTable(n_ctx, n_rot, base, freq_factors, freq_scale, attn_factor).upto(n_ctx)
    return cos[:n_ctx], sin[:n_ctx]


@numba.njit(**JIT_EXACT)
def _rope_cache(base, exponent, ff, freq_scale, attn_factor, first, cos, sin):
    """Rows first.. of the tables."""
    theta_scale = math.pow(base, exponent)
    for p in range(first, cos.shape[0]):
        theta = np.float32(p)
        for i in range(cos.shape[1]):
            t = freq_scale * (theta / ff[i])
            cos[p, i] = math.cos(t) * attn_factor
            sin[p, i] = math.sin(t) * attn_factor
            theta = theta * theta_scale


@numba.njit(**_JIT)
def rope_inplace(x, cos, sin, p0, n_rot, neox):
    """Rotate the first n_rot dims of every head of x (T, H, hd) at positions p0..p0+T-1.

    neox=False: pairs (2i, 2i+1) (llama "NORM" mode); neox=True: pairs (i, i + n_rot/2).
    """
    T, H, hd = x.shape
    half = n_rot // 2
    for t in range(T):
        p = p0 + t
        for h in range(H):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                if neox:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * c - b * s
                    x[t, h, i + half] = a * s + b * c
                else:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * c - b * s
                    x[t, h, 2 * i + 1] = a * s + b * c


def rope_ref(x, cos, sin, p0, n_rot, neox):
    x = x.copy()
    T = x.shape[0]
    half = n_rot // 2
    c = cos[p0 : p0 + T, None, :]
    s = sin[p0 : p0 + T, None, :]
    if neox:
        a, b = x[..., :half].copy(), x[..., half:n_rot].copy()
        x[..., :half] = a * c - b * s
        x[..., half:n_rot] = a * s + b * c
    else:
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2] = a * c - b * s
        x[..., 1:n_rot:2] = a * s + b * c
    return x


# --------------------------------------------------------------------------- attention
def to_f16_precision(a):
    """Round float32 values to the nearest fp16 (what an F16 KV cache stores)."""
    with np.errstate(over="ignore"):  # beyond fp16's range becomes inf, as in llama.cpp
        return a.astype(np.float16).astype(np.float32)


@numba.njit(**JIT_EXACT)
def rope_store_f16c(q, k, v, cos, sin, p0, n_rot, neox, keys, values):
    """rope_and_store in one call (needs HAVE_F16C): q, k rotated in place; q rounded to fp16 in
    place; k and v rounded to fp16 into keys/values (uint16 bit patterns) at positions p0..p0+T-1."""
    rope_inplace(q, cos, sin, p0, n_rot, neox)
    rope_inplace(k, cos, sin, p0, n_rot, neox)
    T, H, hd = q.shape
    Hkv = k.shape[1]
    for t in range(T):
        for h in range(H):
            for d in range(hd):
                q[t, h, d] = f16_round(q[t, h, d])
        for h in range(Hkv):
            for d in range(hd):
                keys[p0 + t, h, d] = f16_bits(k[t, h, d])
                values[p0 + t, h, d] = f16_bits(v[t, h, d])


def rope_and_store(q, k, v, cos, sin, n_rot, neox, kv):
    """RoPE on q and k (T, H, hd) at the cache's position; append fp16-rounded k, v to the
    KV cache; round q to fp16 in place (llama.cpp's F16 cache and F16 query). Returns p0."""
    T = k.shape[0]
    p0 = kv.offset
    if p0 + T > kv.n_ctx:
        raise ValueError(f"KV cache full: {p0} + {T} positions > context {kv.n_ctx}")
    if k.shape[1:] != kv.keys.shape[1:] or v.shape != k.shape or p0 + T > cos.shape[0]:
        raise ValueError(f"rope_and_store: shapes q {q.shape} k {k.shape} v {v.shape} cache {kv.keys.shape}")
    if HAVE_F16C:
        rope_store_f16c(q, k, v, cos, sin, p0, n_rot, neox, kv.keys, kv.values)
        kv.offset = p0 + T
    else:
        rope_inplace(q, cos, sin, p0, n_rot, neox)
        rope_inplace(k, cos, sin, p0, n_rot, neox)
        kv.write(k, v)
        q[...] = to_f16_precision(q)
    return p0


@numba.njit(inline="always", **_JIT)
def kv_value(bits, lut):
    """The float32 value of a KV cache entry (fp16 bits): vcvtph2ps with F16C (HAVE_F16C is
    fixed when numba compiles, and the other branch is pruned), else the table `lut`. In a
    kernel's inner loop the F16C form vectorizes; table reads there cost pp512 a third."""
    if HAVE_F16C:
        return f16_value(bits)
    return lut[bits]


@numba.njit(**_JIT_PAR)
def attention(q, k_cache, v_cache, p0, scale, out, lut):
    """Causal grouped-query attention of T new queries over the cache.

    q: (T, Hq, hd) already rotated and fp16-rounded; k_cache, v_cache: (n_ctx, Hkv, hd) fp16
    bits holding positions 0..p0+T-1; query t sits at position p0+t and sees 0..p0+t.
    out: (T, Hq, hd).  Query head h reads kv head h // (Hq / Hkv). lut: F16_TO_F32 (kv_value).

    A job is one kv head and a tile of up to 8 tokens: its rows (token, query head) share
    every K and V row, widened from fp16 once for all of them (one row a job was 30-40% slower
    at depth). Each row's sums run in the same order whatever the tile or the thread count.
    """
    T, Hq, hd = q.shape
    Hkv = k_cache.shape[1]
    n_rep = Hq // Hkv
    tile = min(8, max(1, T * Hkv // 8))      # enough jobs for the threads when T is small
    n_tiles = (T + tile - 1) // tile
    for job in prange(Hkv * n_tiles):
        kh = job // n_tiles
        t0 = (job % n_tiles) * tile
        nt = min(T, t0 + tile) - t0
        R = nt * n_rep                       # row r: token t0 + r // n_rep, head kh * n_rep + r % n_rep
        n_all = p0 + t0 + nt                 # the positions the tile's last token sees
        qs = np.empty((R, hd), np.float32)
        for r in range(R):
            for d in range(hd):
                qs[r, d] = q[t0 + r // n_rep, kh * n_rep + r % n_rep, d]
        p = np.empty((R, n_all), np.float32)   # scores, then probabilities (0 past a row's last position)
        row = np.empty(hd, np.float32)
        for j in range(n_all):
            for d in range(hd):
                row[d] = kv_value(k_cache[j, kh, d], lut)
            for r in range(R):
                s = np.float32(0.0)
                for d in range(hd):
                    s += qs[r, d] * row[d]
                p[r, j] = s * scale
        for r in range(R):
            n = p0 + t0 + r // n_rep + 1
            m = np.float32(-np.inf)
            for j in range(n):
                if p[r, j] > m:
                    m = p[r, j]
            total = np.float32(0.0)
            for j in range(n):
                e = np.exp(p[r, j] - m)
                p[r, j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(n):
                p[r, j] *= inv
            for j in range(n, n_all):
                p[r, j] = np.float32(0.0)
        acc = np.zeros((R, hd), np.float32)
        for j in range(n_all):
            for d in range(hd):
                row[d] = kv_value(v_cache[j, kh, d], lut)
            for r in range(R):
                w = p[r, j]
                for d in range(hd):
                    acc[r, d] += w * row[d]
        for r in range(R):
            for d in range(hd):
                out[t0 + r // n_rep, kh * n_rep + r % n_rep, d] = acc[r, d]


@numba.njit(**JIT_EXACT_PAR)
def attention_decode(q, k_cache, v_cache, p0, scale, out, lut):
    """One query (T = 1) the way llama.cpp's CPU flash attention runs it.

    Scores summed as ggml's fp16 dot product is on AVX2 (kq_dot); online softmax over the
    positions in order, with the V accumulator kept in fp16 (acc + v * p fused, rounded after
    every update), as ggml's single-query path does; then / sum.
    q: (1, Hq, hd), fp16 values; k_cache, v_cache: fp16 bit patterns; lut: fp16 bits ->
    float32 (engine.quants.common.F16_TO_F32). For CPUs without F16C (portable, slow).
    """
    _, Hq, hd = q.shape
    Hkv = k_cache.shape[1]
    n_rep = Hq // Hkv
    n = p0 + 1
    for h in prange(Hq):
        kh = h // n_rep
        sf = np.empty(1, np.float32)
        su = sf.view(np.uint32)
        acc = np.zeros(hd, np.float32)  # always holds fp16-representable values
        lanes = np.empty(32, np.float32)
        m = np.float32(-np.inf)
        total = np.float32(0.0)
        for j in range(n):
            s = kq_dot_lut(q, h, k_cache, j, kh, lut, lanes) * scale
            ms = np.float32(1.0)
            vs = np.float32(1.0)
            if s > m:
                ms = np.exp(m - s) if m != -np.inf else np.float32(0.0)
                m = s
                for d in range(hd):
                    acc[d] = lut[f32_to_f16_bits(acc[d] * ms, sf, su)]
            else:
                vs = np.exp(s - m)
            for d in range(hd):
                acc[d] = lut[f32_to_f16_bits(fma32(lut[v_cache[j, kh, d]], vs, acc[d]), sf, su)]
            total = total * ms + vs
        inv = np.float32(1.0) / total
        for d in range(hd):
            out[0, h, d] = acc[d] * inv


@numba.njit(**JIT_EXACT_PAR)
def attention_decode_f16c(q, k_cache, v_cache, p0, scale, out, n_runs):
    """attention_decode, bit for bit, with hardware fp16 rounding (needs HAVE_F16C).

    Each thread takes a run of heads and walks the positions once for all of them: deep in a
    chat the K/V rows come from memory (30 layers x 4000 positions: ~92 MB a token), and
    neighbouring heads share them (grouped-query attention), so each row is read once for its
    heads; and a head's fp16 accumulator is one dependent chain over the positions (each update
    waits on the last), so several heads' chains side by side fill the time one would wait.
    Per head, the same operations in the same order as attention_decode. n_runs: the threads
    in use (numba.get_num_threads(), passed in: read inside the kernel it would keep numba
    from caching it).
    """
    _, Hq, hd = q.shape
    Hkv = k_cache.shape[1]
    n_rep = Hq // Hkv
    n = p0 + 1
    n_runs = max(1, min(Hq, n_runs))
    for run in prange(n_runs):
        h0, h1 = run * Hq // n_runs, (run + 1) * Hq // n_runs
        nh = h1 - h0
        khs = np.empty(nh, np.int64)
        for i in range(nh):
            khs[i] = (h0 + i) // n_rep
        # vs[i, j]: first the scores, then the weight of position j's V row
        vs = np.empty((nh, n), np.float32)
        n8 = n - n % 8 if hd % 32 == 0 else 0
        for j in range(0, n8, 8):   # positions outside: a K row is read from memory once for the heads sharing it
            for i in range(nh):
                kq_dot8(q, h0 + i, k_cache, j, khs[i], scale, vs, i, j)
        for j in range(n8, n):
            for i in range(nh):
                vs[i, j] = kq_dot(q, h0 + i, k_cache, j, khs[i]) * scale
        # The online softmax's factors in a pass of their own (the running max is known from the
        # scores): ms[i, j] rescales the accumulator where the max moves, vs[i, j] weighs V row j.
        # Kept out of the V loop, the libm calls do not spill its registers.
        ms = np.empty((nh, n), np.float32)
        total = np.zeros(nh, np.float32)
        for i in range(nh):
            m = np.float32(-np.inf)
            tot = np.float32(0.0)
            for j in range(n):
                s = vs[i, j]
                f, w = np.float32(1.0), np.float32(1.0)
                if s > m:
                    f = np.exp(m - s) if m != -np.inf else np.float32(0.0)
                    m = s
                else:
                    w = np.exp(s - m)
                ms[i, j], vs[i, j] = f, w
                tot = tot * f + w
            total[i] = tot
        acc = np.zeros((nh, hd), np.float32)  # always fp16-representable values
        for j in range(n):
            for i in range(nh):
                f = ms[i, j]
                if f != np.float32(1.0):   # (acc * 1 rounds to acc: skipping it changes no bit)
                    for d in range(hd):
                        acc[i, d] = f16_round(acc[i, d] * f)
                w = vs[i, j]
                kh = khs[i]
                for d in range(hd):
                    acc[i, d] = f16_round(fma32(f16_value(v_cache[j, kh, d]), w, acc[i, d]))
        for i in range(nh):
            inv = np.float32(1.0) / total[i]
            for d in range(hd):
                out[0, h0 + i, d] = acc[i, d] * inv


def _kq_dot_ref(q: np.ndarray, k: np.ndarray) -> np.float32:
    """numpy twin of kq_dot (fused steps: exact products in float64)."""
    hd = q.shape[0]
    n32 = hd - hd % 32
    lanes = np.zeros(32, np.float32)
    for b in range(0, n32, 32):
        lanes = (q[b : b + 32].astype(np.float64) * k[b : b + 32] + lanes).astype(np.float32)
    lanes[:8] += lanes[16:24]
    lanes[8:16] += lanes[24:32]
    lanes[:8] += lanes[8:16]
    s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    for d in range(n32, hd):
        s = fma32_ref(q[d], k[d], s)
    return np.float32(s)


def attention_decode_ref(q, k_cache, v_cache, p0, scale):
    """numpy twin of attention_decode (same order, fp16 accumulator); caches as fp16 bits."""
    k_cache, v_cache = f16_values_of(k_cache), f16_values_of(v_cache)
    _, Hq, hd = q.shape
    n_rep = Hq // k_cache.shape[1]
    out = np.empty((1, Hq, hd), np.float32)
    for h in range(Hq):
        kh = h // n_rep
        sc = [_kq_dot_ref(q[0, h], k_cache[j, kh]) * np.float32(scale) for j in range(p0 + 1)]
        acc = np.zeros(hd, np.float16)
        m, total = np.float32(-np.inf), np.float32(0.0)
        for j, s in enumerate(sc):
            ms, vs = np.float32(1.0), np.float32(1.0)
            if s > m:
                ms = np.float32(np.exp(np.float32(m - s))) if m != -np.inf else np.float32(0.0)
                m = s
                acc = (acc.astype(np.float32) * ms).astype(np.float16)
            else:
                vs = np.float32(np.exp(np.float32(s - m)))
            fused = v_cache[j, kh].astype(np.float64) * np.float64(vs) + acc.astype(np.float64)
            acc = fused.astype(np.float32).astype(np.float16)
            total = np.float32(total * ms + vs)
        out[0, h] = acc.astype(np.float32) / total
    return out


def attention_ref(q, k_cache, v_cache, p0, scale):
    """numpy twin of attention, in float64; caches as fp16 bits."""
    k_cache, v_cache = f16_values_of(k_cache), f16_values_of(v_cache)
    T, Hq, hd = q.shape
    Hkv = k_cache.shape[1]
    n_rep = Hq // Hkv
    out = np.zeros((T, Hq, hd), dtype=np.float64)
    for t in range(T):
        n = p0 + t + 1
        for h in range(Hq):
            k = k_cache[:n, h // n_rep].astype(np.float64)
            v = v_cache[:n, h // n_rep].astype(np.float64)
            s = k @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v
    return out.astype(np.float32)


def attend(q, k_cache, v_cache, p0, scale, out):
    """Causal attention of q (T, Hq, hd) at positions p0.. over the cache, into out.

    A single query takes llama.cpp's decode path (fp16 accumulator); a batch takes the
    float32 path, as llama.cpp's tiled kernel accumulates in f32. k_cache, v_cache: the
    cache's fp16 bits.
    """
    if q.shape[0] == 1:
        if HAVE_F16C:
            attention_decode_f16c(q, k_cache, v_cache, p0, scale, out, numba.get_num_threads())
        else:
            attention_decode(q, k_cache, v_cache, p0, scale, out, F16_TO_F32)
    else:
        attention(q, k_cache, v_cache, p0, scale, out, F16_TO_F32)


# --------------------------------------------------------------------------- FFN
@numba.njit(**_JIT)
def _swiglu_token(gate, up, out, t):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


@numba.njit(**_JIT)
def _swiglu_serial(gate, up, out):
    for t in range(gate.shape[0]):
        _swiglu_token(gate, up, out, t)


@numba.njit(**_JIT_PAR)
def _swiglu_par(gate, up, out):
    for t in prange(gate.shape[0]):
        _swiglu_token(gate, up, out, t)


def swiglu(gate, up, out):
    """out = silu(gate) * up, all (T, F): one token serially, more over the threads."""
    if not (gate.shape == up.shape == out.shape and gate.ndim == 2):
        raise ValueError(f"swiglu: shapes {gate.shape}, {up.shape}, {out.shape}")
    (_swiglu_serial if gate.shape[0] == 1 else _swiglu_par)(gate, up, out)


def swiglu_ref(gate, up):
    g = gate.astype(np.float64)
    return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)


# --------------------------------------------------------------------------- gates
@numba.njit(**_JIT)
def _sigmoid_flat(x, out):
    for i in range(x.shape[0]):
        out[i] = np.float32(1.0) / (np.float32(1.0) + np.exp(-x[i]))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) in float32, any shape (the gated-attention output gate)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _sigmoid_flat(x.reshape(-1), out.reshape(-1))
    return out


def sigmoid_ref(x):
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


# --------------------------------------------------------------------------- attention without flash attention
@numba.njit(**JIT_EXACT)
def _fma32(a, b, c):
    # float32 fused multiply-add: the product of two float32 is exact in float64
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


# ggml_v_expf's constants (ARM optimized-routines expf): log2(e), 1.5*2^23, ln2 split in two
# parts, polynomial coefficients
_EXP_C = tuple(float.fromhex(h) for h in (
    "0x1.715476p+0", "0x1.8p23", "0x1.62e4p-1", "0x1.7f7d1cp-20",
    "0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1"))
_LOG2E, _SHIFT, _LN2_HI, _LN2_LO, _P5, _P4, _P3, _P2, _P1 = (np.float32(c) for c in _EXP_C)


@numba.njit(**JIT_EXACT)
def v_expf(x):
    """exp(x) for x <= 0 as ggml's AVX-512 ggml_v_expf computes it (softmax): a degree-5
    polynomial after range reduction by ln2, within ~1.5 ulp of expf but not equal to it."""
    z = _fma32(x, _LOG2E, _SHIFT)
    n = z - _SHIFT
    if n < np.float32(-192.0):
        return np.float32(0.0)
    b = _fma32(-n, _LN2_HI, x)
    b = _fma32(-n, _LN2_LO, b)
    u = b * b
    hi = _fma32(_fma32(_P5, b, _P4), u, _fma32(_P3, b, _P2))
    j = _fma32(hi, u, _fma32(_P1, b, np.float32(1.0)))
    return np.float32(np.float64(j) * 2.0 ** np.float64(n))


@numba.njit(**JIT_EXACT)
def _sum16(lanes):
    """Horizontal sum of 16 float32 lanes in _mm512_reduce_add_ps order."""
    t = np.empty(8, np.float32)
    for i in range(8):
        t[i] = lanes[i] + lanes[i + 8]
    for i in range(4):
        t[i] = t[i] + t[i + 4]
    return (t[0] + t[2]) + (t[1] + t[3])


@numba.njit(**JIT_EXACT_PAR)
def attention_nofa(q, k_cache, v_cache, p0, scale, window, out, lut):
    """Causal grouped-query attention as llama.cpp's CPU build computes it with flash attention off.

    KQ in float32 (q and K already fp16-rounded), softmax(KQ * scale + mask) with its sum in
    float64 (ggml_vec_soft_max_f32), the probabilities rounded to fp16 (ggml's mul_mat converts
    them to V's type), then out = P V in float32. window > 0: llama.cpp's standard sliding
    window, query position p sees keys p-window < j <= p (gemma3); window <= 0: all j <= p.
    q: (T, Hq, hd); k_cache, v_cache: (n_ctx, Hkv, hd) fp16 bits; out: (T, Hq, hd); lut: fp16 bits -> float32.

    Rounded bit for bit as llama.cpp on AVX-512: both fp16 matmuls run in llamafile's tinyBLAS,
    one 16-lane accumulator over the reduced dimension (lane = index mod 16, the cache index for
    P V) and a tree sum at the end; the softmax uses ggml_v_expf and adds 16-lane blocks of the
    cache into its float64 sum. Masked keys contribute exact zeros, so they are skipped.
    """
    T, Hq, hd = q.shape
    Hkv = k_cache.shape[1]
    n_rep = Hq // Hkv
    for job in prange(T * Hq):
        t = job // Hq
        h = job % Hq
        kh = h // n_rep
        n = p0 + t + 1
        j0 = n - window if window > 0 else 0
        if j0 < 0:
            j0 = 0
        sf = np.empty(1, np.float32)
        su = sf.view(np.uint32)
        lanes = np.zeros(16, np.float32)
        scores = np.empty(n - j0, dtype=np.float32)
        m = np.float32(-np.inf)
        for j in range(j0, n):
            lanes[:] = 0.0
            for d in range(hd):
                lanes[d & 15] += q[t, h, d] * kv_value(k_cache[j, kh, d], lut)
            s = _sum16(lanes) * scale
            scores[j - j0] = s
            if s > m:
                m = s
        total = 0.0  # float64, as ggml
        lanes[:] = 0.0
        for j in range(j0, n):
            e = v_expf(scores[j - j0] - m)
            scores[j - j0] = e
            lanes[j & 15] = e
            if j & 15 == 15 or j == n - 1:
                total += _sum16(lanes)
                lanes[:] = 0.0
        inv = np.float32(1.0 / total)
        acc = np.zeros((16, hd), np.float32)
        for j in range(j0, n):
            w = lut[f32_to_f16_bits(scores[j - j0] * inv, sf, su)]
            for d in range(hd):
                acc[j & 15, d] += w * kv_value(v_cache[j, kh, d], lut)
        for d in range(hd):
            out[t, h, d] = _sum16(acc[:, d])


def attention_nofa_ref(q, k_cache, v_cache, p0, scale, window=0):
    """numpy twin of attention_nofa; caches as fp16 bits."""
    k_cache, v_cache = f16_values_of(k_cache), f16_values_of(v_cache)
    T, Hq, hd = q.shape
    n_rep = Hq // k_cache.shape[1]
    out = np.zeros((T, Hq, hd), dtype=np.float32)
    for t in range(T):
        n = p0 + t + 1
        j0 = max(0, n - window) if window > 0 else 0
        for h in range(Hq):
            k = k_cache[j0:n, h // n_rep]
            v = v_cache[j0:n, h // n_rep]
            s = (k.astype(np.float64) @ q[t, h].astype(np.float64)).astype(np.float32) * np.float32(scale)
            e = np.exp(s - s.max()).astype(np.float32)
            p = to_f16_precision(e * np.float32(1.0 / e.astype(np.float64).sum()))
            out[t, h] = (p.astype(np.float64) @ v.astype(np.float64)).astype(np.float32)
    return out


# --------------------------------------------------------------------------- GELU-gated FFN
@numba.njit(**JIT_EXACT)
def _gelu_f32_kernel(x, out):
    c = np.float32(0.79788456080286535587989211986876)
    a = np.float32(0.044715)
    for i in range(x.shape[0]):
        v = x[i]
        # 1 + a*v*v contracted to one fma, and libm's tanhf (numba's math.tanh on float32),
        # as llama.cpp's build computes ggml_gelu_f32; numpy's float32 tanh is off by an ulp
        # near -1, which moves ~2300 fp16 table entries
        inner = np.float32(np.float64(a * v) * np.float64(v) + 1.0)
        out[i] = np.float32(0.5) * v * (np.float32(1.0) + math.tanh(c * v * inner))


def _gelu_f32(x):
    """ggml_gelu_f32 (tanh approximation) in float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _gelu_f32_kernel(x.reshape(-1), out.reshape(-1))
    return out


# ggml_table_gelu_f16: gelu of every fp16 value, rounded to fp16 (what ggml's CPU GELU looks up)
GELU_F16_TABLE = to_f16_precision(_gelu_f32(F16_TO_F32))


@numba.njit(**JIT_EXACT)
def _geglu_flat(gate, up, out, table):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    for i in range(gate.shape[0]):
        g = gate[i]
        if g <= np.float32(-10.0):
            out[i] = np.float32(0.0)
        elif g >= np.float32(10.0):
            out[i] = g * up[i]
        else:
            out[i] = table[f32_to_f16_bits(g, sf, su)] * up[i]


def geglu(gate, up, out):
    """out = gelu_tanh(gate) * up, all (T, F), as ggml's CPU geglu: the GELU is looked up by the
    fp16-rounded input in a table of fp16 values (|x| >= 10: 0 or x)."""
    _geglu_flat(gate.reshape(-1), up.reshape(-1), out.reshape(-1), GELU_F16_TABLE)


def geglu_ref(gate, up):
    g = np.asarray(gate, dtype=np.float32)
    y = to_f16_precision(_gelu_f32(to_f16_precision(g)))
    y = np.where(g <= -10, np.float32(0.0), np.where(g >= 10, g, y))
    return (y * up).astype(np.float32)
