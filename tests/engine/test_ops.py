"""Each numba kernel in engine.ops against its numpy twin."""

import numpy as np
import pytest

from engine import ops


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def test_rmsnorm_matches_numpy(rng):
    x = rng.normal(size=(5, 96)).astype(np.float32) * 3
    w = rng.normal(size=96).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ops.rmsnorm_ref(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rmsnorm_may_run_in_place(rng):
    x = rng.normal(size=(2, 32)).astype(np.float32)
    w = np.ones(32, np.float32)
    expect = ops.rmsnorm_ref(x, w, 1e-6)
    ops.rmsnorm(x, w, 1e-6, x)
    np.testing.assert_allclose(x, expect, rtol=1e-5)


def test_rope_tables_follow_ggml_recurrence():
    cos, sin = ops.rope_tables(16, 8, 10000.0)
    # theta_i(p) = p * base^(-2i/n_rot), up to float32 accumulation of the ratio
    p = np.arange(16)[:, None]
    theta = p * 10000.0 ** (-2 * np.arange(4) / 8)
    np.testing.assert_allclose(cos, np.cos(theta), atol=1e-5)
    np.testing.assert_allclose(sin, np.sin(theta), atol=1e-5)


def test_rope_freq_factors_divide_theta():
    f = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    cos, _ = ops.rope_tables(8, 8, 10000.0, freq_factors=f)
    theta = np.arange(8)[:, None] * 10000.0 ** (-2 * np.arange(4) / 8) / f
    np.testing.assert_allclose(cos, np.cos(theta), atol=1e-5)


def test_rope_table_grows_with_the_positions_used():
    whole = ops.rope_tables(3000, 64, 1e6, freq_scale=0.5, attn_factor=1.1)
    table = ops.RopeTable(3000, 64, 1e6, freq_scale=0.5, attn_factor=1.1)
    assert table.upto(1)[0].shape[0] == ops.RopeTable.MIN_ROWS     # nothing sized by the context
    for n in (1, 300, 301, 700, 2999, 3000):   # rows added later equal rows made at once
        cos, sin = table.upto(n)
        assert cos.shape[0] >= n
        np.testing.assert_array_equal(cos[:n], whole[0][:n])
        np.testing.assert_array_equal(sin[:n], whole[1][:n])
    assert table.upto(3000)[0].shape[0] == 3000                      # capped at the context
    with pytest.raises(ValueError, match="past the context"):
        table.upto(3001)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [16, 8])
def test_rope_matches_numpy(rng, neox, n_rot):
    cos, sin = ops.rope_tables(64, n_rot, 10000.0)
    x = rng.normal(size=(5, 3, 16)).astype(np.float32)
    expect = ops.rope_ref(x, cos, sin, 7, n_rot, neox)
    ops.rope_inplace(x, cos, sin, 7, n_rot, neox)
    np.testing.assert_allclose(x, expect, rtol=1e-6, atol=1e-6)


def test_rope_keeps_norm_of_each_pair(rng):
    cos, sin = ops.rope_tables(32, 16, 10000.0)
    x = rng.normal(size=(4, 2, 16)).astype(np.float32)
    y = x.copy()
    ops.rope_inplace(y, cos, sin, 3, 16, False)
    np.testing.assert_allclose(np.hypot(y[..., 0::2], y[..., 1::2]), np.hypot(x[..., 0::2], x[..., 1::2]), rtol=1e-5)


@pytest.mark.parametrize("T,p0,Hq,Hkv", [(1, 0, 4, 2), (1, 9, 6, 2), (5, 0, 4, 4), (3, 4, 9, 3)])
def test_attention_matches_numpy(rng, T, p0, Hq, Hkv):
    from engine.quants.common import F16_TO_F32

    hd, n_ctx = 16, 32
    k = np.zeros((n_ctx, Hkv, hd), np.float32)
    v = np.zeros((n_ctx, Hkv, hd), np.float32)
    k[: p0 + T] = rng.normal(size=(p0 + T, Hkv, hd))
    v[: p0 + T] = rng.normal(size=(p0 + T, Hkv, hd))
    k[p0 + T :] = 6e4  # positions past the queries must never be read
    k, v = ops.f16_bits_of(k), ops.f16_bits_of(v)   # the cache holds fp16 bit patterns
    q = rng.normal(size=(T, Hq, hd)).astype(np.float32)
    out = np.empty_like(q)
    ops.attention(q, k, v, p0, np.float32(0.25), out, F16_TO_F32)
    np.testing.assert_allclose(out, ops.attention_ref(q, k, v, p0, 0.25), rtol=1e-4, atol=1e-5)


def test_batch_attention_rows_do_not_depend_on_the_tile_or_the_threads(rng):
    """A row's result is the same bits whether its token comes in a batch of 1, 5 or 21 (tiles
    of 1, 1 and 7 tokens), and with 1 or 2 threads."""
    import numba

    from engine.quants.common import F16_TO_F32

    Hq, Hkv, hd, p0, T = 6, 3, 32, 40, 21
    k = ops.f16_bits_of(rng.normal(size=(p0 + T, Hkv, hd)))
    v = ops.f16_bits_of(rng.normal(size=(p0 + T, Hkv, hd)))
    q = ops.to_f16_precision(rng.normal(size=(T, Hq, hd)).astype(np.float32))
    full = np.empty_like(q)
    ops.attention(q, k, v, p0, np.float32(0.25), full, F16_TO_F32)
    for start, n in ((0, 1), (4, 5), (20, 1)):
        part = np.empty_like(q[start : start + n])
        ops.attention(q[start : start + n], k, v, p0 + start, np.float32(0.25), part, F16_TO_F32)
        assert np.array_equal(part.view(np.uint32), full[start : start + n].view(np.uint32)), (start, n)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = np.empty_like(q)
        ops.attention(q, k, v, p0, np.float32(0.25), one, F16_TO_F32)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(one.view(np.uint32), full.view(np.uint32))


@pytest.mark.parametrize("T", [1, 3, 33])
def test_swiglu_matches_numpy(rng, T):
    g = rng.normal(size=(T, 40)).astype(np.float32) * 4
    u = rng.normal(size=(T, 40)).astype(np.float32)
    out = np.empty_like(g)
    ops.swiglu(g, u, out)
    np.testing.assert_allclose(out, ops.swiglu_ref(g, u), rtol=1e-5, atol=1e-6)
    one = np.empty((1, 40), np.float32)   # decode (serial) equals its row of a prefill (parallel)
    ops.swiglu(g[-1:], u[-1:], one)
    np.testing.assert_array_equal(one[0], out[-1])
    with pytest.raises(ValueError):
        ops.swiglu(g, u[:, :10], out)


@pytest.mark.parametrize("p0,Hq,Hkv", [(0, 4, 2), (12, 9, 3), (40, 4, 4)])
def test_decode_attention_matches_numpy_twin(rng, p0, Hq, Hkv):
    from engine.quants.common import F16_TO_F32

    hd, n_ctx = 32, 64
    k = ops.f16_bits_of(rng.normal(size=(n_ctx, Hkv, hd)))
    v = ops.f16_bits_of(rng.normal(size=(n_ctx, Hkv, hd)) * 3)
    q = ops.to_f16_precision(rng.normal(size=(1, Hq, hd)).astype(np.float32))
    out = np.empty_like(q)
    ops.attention_decode(q, k, v, p0, np.float32(0.2), out, F16_TO_F32)
    np.testing.assert_allclose(out, ops.attention_decode_ref(q, k, v, p0, 0.2), rtol=2e-3, atol=2e-3)
    # and it is attention: close to the float64 result within fp16 accumulation error
    np.testing.assert_allclose(out, ops.attention_ref(q, k, v, p0, 0.2), rtol=0, atol=2e-2)


@pytest.mark.skipif(not ops.HAVE_F16C, reason="needs F16C")
@pytest.mark.parametrize("p0,Hq,Hkv,hd", [(0, 4, 2, 32), (12, 9, 3, 64), (40, 4, 4, 32), (300, 9, 3, 64),
                                          (20, 6, 2, 96), (21, 6, 2, 80)])
def test_f16c_decode_attention_is_bit_identical_to_the_portable_kernel(rng, p0, Hq, Hkv, hd):
    from engine.quants.common import F16_TO_F32

    n_ctx = p0 + 9
    k = ops.f16_bits_of(rng.normal(size=(n_ctx, Hkv, hd)))
    v = ops.f16_bits_of(rng.normal(size=(n_ctx, Hkv, hd)) * 30)
    q = ops.to_f16_precision(rng.normal(size=(1, Hq, hd)).astype(np.float32) * 3)
    a = np.empty_like(q)
    ops.attention_decode(q, k, v, p0, np.float32(0.125), a, F16_TO_F32)
    # heads split into runs, one per thread, whatever the thread count: the same bits
    for n_runs in (1, 2, 3, Hq, Hq + 5):
        b = np.empty_like(q)
        ops.attention_decode_f16c(q, k, v, p0, np.float32(0.125), b, n_runs)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), n_runs
    np.testing.assert_allclose(b, ops.attention_decode_ref(q, k, v, p0, 0.125), rtol=2e-3, atol=2e-2)


@pytest.mark.skipif(not ops.HAVE_F16C, reason="needs F16C")
@pytest.mark.parametrize("hd", [32, 64, 96, 128])
def test_kq_dot_sums_in_ggml_avx2_order(rng, hd):
    """kq_dot (K as fp16 bits, widened by vcvtph2ps) against its numpy twin, the plain float64
    dot, and bit for bit against kq_dot_lut (the table-lookup kernel of CPUs without F16C)."""
    import numba

    from engine.quants.common import F16_TO_F32, kq_dot, kq_dot_lut

    @numba.njit
    def dots(q, k):
        out = np.empty((q.shape[1], k.shape[0]), np.float32)
        for h in range(q.shape[1]):
            for j in range(k.shape[0]):
                out[h, j] = kq_dot(q, h, k, j, h % k.shape[1])
        return out

    @numba.njit
    def dots_lut(q, k, lut):
        out = np.empty((q.shape[1], k.shape[0]), np.float32)
        lanes = np.empty(32, np.float32)
        for h in range(q.shape[1]):
            for j in range(k.shape[0]):
                out[h, j] = kq_dot_lut(q, h, k, j, h % k.shape[1], lut, lanes)
        return out

    q = ops.to_f16_precision(rng.normal(size=(1, 4, hd)).astype(np.float32) * 3)
    kbits = ops.f16_bits_of(rng.normal(size=(7, 2, hd)))
    k = ops.f16_values_of(kbits)
    got = dots(q, kbits)
    assert np.array_equal(got.view(np.uint32), dots_lut(q, kbits, F16_TO_F32).view(np.uint32))
    want = np.array([[ops._kq_dot_ref(q[0, h], k[j, h % 2]) for j in range(7)] for h in range(4)], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    exact = np.einsum("hd,jhd->hj", q[0].astype(np.float64), k[:, [0, 1, 0, 1]].astype(np.float64))
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
    # the order is ggml's, not left to right: the sum of 32 lanes pairwise
    lanes = (q[0, 0, :32].astype(np.float64) * k[0, 0, :32]).astype(np.float32)
    if hd == 32:
        l8 = (lanes[:8] + lanes[16:24]) + (lanes[8:16] + lanes[24:32])
        assert got[0, 0] == ((l8[0] + l8[4]) + (l8[1] + l8[5])) + ((l8[2] + l8[6]) + (l8[3] + l8[7]))


@pytest.mark.skipif(not ops.HAVE_F16C, reason="needs F16C")
@pytest.mark.parametrize("hd", [32, 64, 128])
def test_kq_dot8_is_eight_kq_dots_bit_for_bit(rng, hd):
    """The 8-position score kernel (horizontal sums done side by side) against kq_dot * scale."""
    import numba

    from engine.quants.common import kq_dot, kq_dot8

    @numba.njit
    def both(q, k, scale):
        n = k.shape[0]
        one = np.zeros((q.shape[1], n), np.float32)
        eight = np.zeros((q.shape[1], n), np.float32)
        for h in range(q.shape[1]):
            kh = h % k.shape[1]
            for j in range(n):
                one[h, j] = kq_dot(q, h, k, j, kh) * scale
            for j in range(0, n - 7, 3):   # any start, overlapping runs
                kq_dot8(q, h, k, j, kh, scale, eight, h, j)
        return one, eight

    q = ops.to_f16_precision(rng.normal(size=(1, 5, hd)).astype(np.float32) * 3)
    k = ops.f16_bits_of(rng.normal(size=(29, 2, hd)) * 2)
    one, eight = both(q, k, np.float32(0.125))
    # runs start at 0, 3, ..., 21: every position 0..28 written, some twice (the same bits)
    assert np.array_equal(one.view(np.uint32), eight.view(np.uint32))


def test_fma32_rounds_once(rng):
    import numba

    from engine.quants.common import fma32

    @numba.njit
    def f(a, b, c):
        out = np.empty_like(a)
        for i in range(a.shape[0]):
            out[i] = fma32(a[i], b[i], c[i])
        return out

    a, b, c = (rng.normal(size=1000).astype(np.float32) for _ in range(3))
    got = f(a, b, c)
    want = (a.astype(np.float64) * b + c).astype(np.float32)   # exact product, one rounding (ties aside)
    assert np.mean(got == want) > 0.999
    unfused = a * b + c   # two roundings: differs somewhere in 1000 draws
    assert not np.array_equal(got, unfused)


def test_f16_round_matches_numpy_on_every_kind_of_float():
    import numba

    from engine.quants.common import HAVE_F16C, f16_round

    if not HAVE_F16C:
        pytest.skip("needs F16C")

    @numba.njit
    def round_all(a, out):
        for i in range(a.shape[0]):
            out[i] = f16_round(a[i])

    bits = np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 2.98e-8,
                                                          5.96e-8, 1e-8, np.inf, -np.inf], np.float32)])
    out = np.empty_like(x)
    round_all(x, out)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).astype(np.float32)
    same = (out.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(out) & np.isnan(ref))
    assert same.all()


def test_kv_cache_holds_fp16_bits_rounded_as_llamacpp_stores_them(rng):
    """The cache keeps fp16 bit patterns: 2 bytes a value; a write rounds to the nearest fp16
    (ties to even, beyond the range to inf); a snapshot is float16 and restores every bit."""
    from engine.cache import KVCache, kv_block_caches

    kv = KVCache(8, 2, 4)
    assert kv.keys.dtype == np.uint16 and kv.values.dtype == np.uint16
    k = rng.normal(size=(3, 2, 4)).astype(np.float32) * 100
    k[0, 0, :3] = [70000.0, -1e9, 1.0 + 2.0 ** -11]   # past fp16's range; a tie, to even (1.0)
    v = rng.normal(size=(3, 2, 4)).astype(np.float32)
    kv.write(k, v)
    got = ops.f16_values_of(kv.keys[:3])
    np.testing.assert_array_equal(got, ops.to_f16_precision(k))
    assert got[0, 0, 0] == np.inf and got[0, 0, 1] == -np.inf and got[0, 0, 2] == 1.0
    assert kv.nbytes == 3 * 2 * (2 * 4) * 2
    snap = kv.snapshot()
    assert snap.arrays["k"].dtype == np.float16 and snap.arrays["k"].shape == (3, 2, 4)
    back = KVCache.from_state(snap, 8)
    assert np.array_equal(back.keys[:3], kv.keys[:3]) and np.array_equal(back.values[:3], kv.values[:3])
    # rope_and_store (F16C or numpy rounding) stores the same bits as write
    blocked = kv_block_caches(1, 8, 2, 4)[0]
    cos, sin = ops.rope_tables(8, 4, 10000.0)
    q = np.zeros((3, 2, 4), np.float32)
    kr = k.copy()
    ops.rope_and_store(q, kr, v.copy(), cos, sin, 4, False, blocked)
    plain = KVCache(8, 2, 4)
    plain.write(kr, v)
    assert np.array_equal(blocked.keys[:3], plain.keys[:3]) and np.array_equal(blocked.values[:3], plain.values[:3])



PORTABLE_KV = """
import numpy as np
from engine import ops
from engine.cache import KVCache
from engine.quants.common import F16_TO_F32, HAVE_F16C
assert not HAVE_F16C
rng = np.random.default_rng(3)
k = ops.f16_bits_of(rng.normal(size=(12, 2, 32)))
v = ops.f16_bits_of(rng.normal(size=(12, 2, 32)) * 3)
q = ops.to_f16_precision(rng.normal(size=(3, 4, 32)).astype(np.float32))
out = np.empty_like(q)
ops.attention(q, k, v, 5, np.float32(0.25), out, F16_TO_F32)          # the table branch of kv_value
np.testing.assert_allclose(out, ops.attention_ref(q, k, v, 5, 0.25), rtol=1e-4, atol=1e-5)
ops.attention_nofa(q, k, v, 5, np.float32(0.25), 0, out, F16_TO_F32)
np.testing.assert_allclose(out, ops.attention_nofa_ref(q, k, v, 5, 0.25), atol=2e-6)
one = np.empty_like(q[:1])
ops.attend(q[:1], k, v, 9, np.float32(0.2), one)                        # attention_decode, kq_dot_lut
np.testing.assert_allclose(one, ops.attention_decode_ref(q[:1], k, v, 9, 0.2), rtol=2e-3, atol=2e-3)
kv = KVCache(8, 2, 32)
cos, sin = ops.rope_tables(8, 32, 10000.0)
kk = rng.normal(size=(2, 2, 32)).astype(np.float32)
ops.rope_and_store(q[:2].copy(), kk, kk.copy(), cos, sin, 32, False, kv)   # numpy's rounding path
assert np.array_equal(kv.keys[:2], ops.f16_bits_of(kk))
print("ok")
"""


@pytest.mark.slow
def test_the_kv_cache_kernels_without_f16c(tmp_path):
    """On a CPU without F16C (numba told to compile for plain x86-64) the kernels read the
    cache's fp16 bits through the table and give the numpy twins' results."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CPU_NAME="x86-64", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", PORTABLE_KV], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
