"""The AVX2 (vpmaddubsw) kernels against the portable kernels and an exact numpy twin of
llama.cpp's block dot products (integer sums exact, scales applied per block)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from engine.quants.linear import AVX2_KERNELS, FORMATS, PORTABLE_KERNELS, SIMD_KERNELS, QuantLinear, get_format, kernel_weights
from engine.quants.common import F16_TO_F32

pytestmark = pytest.mark.skipif(not SIMD_KERNELS, reason="no AVX2 (or DELTATALK_NO_SIMD=1): portable kernels only")

FP16_FIELDS = {
    G.Q4_0: [0], G.Q4_1: [0, 2], G.Q5_0: [0], G.Q5_1: [0, 2], G.Q8_0: [0], G.IQ4_NL: [0],
    G.Q2_K: [80, 82], G.Q3_K: [108], G.Q4_K: [0, 2], G.Q5_K: [0, 2], G.Q6_K: [208], G.IQ4_XS: [0],
}
TYPES = list(FP16_FIELDS)


def blocks_for(qtype, n_rows, n_cols, rng, fill=None):
    fmt = get_format(qtype)
    raw = rng.integers(0, 256, size=(n_rows, fmt.row_bytes(n_cols)), dtype=np.uint8)
    if fill is not None:
        raw[:] = fill
    b = raw.reshape(n_rows, -1, fmt.type_size)
    for off in FP16_FIELDS[qtype]:
        vals = (rng.normal(size=b.shape[:2]) * 0.05).astype(np.float16)
        b[:, :, off:off + 2] = vals.view(np.uint8).reshape(b.shape[:2] + (2,))
    return raw


def run(kernel, qtype, raw, act):
    out = np.full((act[0].shape[0], raw.shape[0]), np.nan, np.float32)
    kernel(kernel_weights(raw, qtype), *act, F16_TO_F32, out)
    return out


def exact_twin(qtype, raw, act):
    """Σ over blocks of the llama.cpp formula in float64, from dequantized weights and the
    quantized activation; for Q4_1/Q5_1 the min term uses the stored (fp16) s = d·Σq."""
    fmt = get_format(qtype)
    W = fmt.dequantize(raw).astype(np.float64)
    if fmt.act != "q8_1":
        return fmt.matmul_ref(raw, act).astype(np.float64)
    xq, xd, xs = act
    N, K = W.shape
    T = xq.shape[0]
    b = raw.reshape(N, K // 32, fmt.type_size)
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float64)  # (N, nb)
    Wq = (W.reshape(N, K // 32, 32) - m[..., None])  # d_w * q_w
    dot = np.einsum("nbj,tbj->tnb", Wq, xq.reshape(T, K // 32, 32).astype(np.float64))
    return (dot * xd[:, None, :] + m[None] * xs[:, None, :]).sum(-1)


def bound(qtype, raw, X):
    W = np.abs(get_format(qtype).dequantize(raw)).astype(np.float64)
    return np.abs(X).astype(np.float64) @ W.T


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_avx2_kernels_are_the_ones_in_use():
    for t in TYPES + [G.F16, G.BF16]:
        assert FORMATS[int(t)].kernel is SIMD_KERNELS[int(t)]
        assert PORTABLE_KERNELS[int(t)] is not SIMD_KERNELS[int(t)]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_simd_matches_exact_twin_and_portable(qtype, rng):
    """T = 1 (decode), 4 and 9 (4-token tiles plus a remainder); odd N; read-only blocks."""
    fmt = get_format(qtype)
    N, K = 11, 768 if fmt.block_size == 256 else 352
    raw = blocks_for(qtype, N, K, rng)
    raw.setflags(write=False)
    for T in (1, 4, 9):
        X = rng.normal(size=(T, K)).astype(np.float32)
        act = fmt.quantize_act(X)
        got = run(SIMD_KERNELS[int(qtype)], qtype, raw, act)
        lim = 2e-6 * bound(qtype, raw, X) + 1e-6
        assert np.all(np.abs(got - exact_twin(qtype, raw, act)) <= lim)
        assert np.all(np.abs(got - run(PORTABLE_KERNELS[int(qtype)], qtype, raw, act)) <= lim)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x80, 0x7F])
def test_extreme_codes_do_not_saturate(qtype, fill, rng):
    """Every code byte at an extreme (incl. Q8_0's -128) against activations at ±127."""
    fmt = get_format(qtype)
    K = fmt.block_size * (2 if fmt.block_size == 256 else 8)
    raw = blocks_for(qtype, 3, K, rng, fill=fill)
    X = np.where(rng.random((5, K)) < 0.5, -1.0, 1.0).astype(np.float32)  # every |q_x| = 127
    act = fmt.quantize_act(X)
    got = run(SIMD_KERNELS[int(qtype)], qtype, raw, act)
    with np.errstate(all="ignore"):
        want = exact_twin(qtype, raw, act)
        lim = 2e-6 * bound(qtype, raw, X) + 1e-6
    assert np.all(np.abs(got - want) <= lim)


@pytest.mark.parametrize("qtype", [G.F16, G.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("K", [16, 37, 200])
def test_16bit_float_kernels(qtype, K, rng):
    """F16 / BF16 rows: vector part (multiples of 16) plus a scalar tail; T = 1, 4, 7."""
    fmt = get_format(qtype)
    N = 5
    w = rng.normal(size=(N, K)).astype(np.float32)
    if qtype == G.F16:
        raw = w.astype(np.float16).view(np.uint8).reshape(N, -1)
    else:
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(N, -1)
    raw.setflags(write=False)
    for T in (1, 4, 7):
        X = rng.normal(size=(T, K)).astype(np.float32)
        act = fmt.quantize_act(X)
        lin = QuantLinear(raw, qtype, K, N)
        got = lin.matmul(X)
        want = fmt.matmul_ref(raw, act).astype(np.float64)
        assert np.all(np.abs(got - want) <= 1e-6 * bound(qtype, raw, X) + 1e-7)


def test_microbench_smoke():
    from engine.quants.microbench import bench_matvec

    r = bench_matvec("Q4_1", 64, 256, repeats=2, prefill_tokens=8, cold_bytes=1e5)
    assert r["decode_gbps"] > 0 and r["prefill_gflops"] > 0 and r["weight_mb"] == 64 * 160 / 1e6


def test_simd_kernels_were_generated_from_this_simd_py():
    """numba's cache of simd_kernels.py does not see edits to simd.py or gemm.py: regenerate after them."""
    import hashlib
    from pathlib import Path

    from engine.quants import simd_kernels

    here = Path(simd_kernels.__file__).parent
    src = (here / "simd.py").read_bytes() + (here / "gemm.py").read_bytes()
    assert simd_kernels.SIMD_SOURCE_SHA256 == hashlib.sha256(src).hexdigest(), \
        "simd.py or gemm.py changed: run `python -m engine.quants.gen_simd_kernels`"


@pytest.mark.parametrize("qtype", TYPES + [G.F16, G.BF16], ids=lambda t: t.name)
def test_decode_is_bit_identical_to_a_prefill_row(qtype, rng):
    """Same summation order in the 1-token kernel, the 4-token tiles and the 2- or 3-token
    tails (T % 4 rows after the tiles): every row of a T-row call equals its own decode."""
    fmt = get_format(qtype)
    K = 512
    if qtype in (G.F16, G.BF16):
        raw = rng.normal(size=(7, K)).astype(np.float16 if qtype == G.F16 else np.float32)
        raw = raw.view(np.uint8).reshape(7, -1) if qtype == G.F16 else \
            (raw.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(7, -1)
    else:
        raw = blocks_for(qtype, 7, K, rng)
    lin = QuantLinear(raw, qtype, K, 7)
    X = rng.normal(size=(9, K)).astype(np.float32)
    # the AVX2 row kernels' prefill (prefill runs gemm.py's GEMM instead, whose own chunking
    # invariants are tested in test_quants_gemm.py)
    decoded = np.stack([lin(X[t]) for t in range(9)])
    for T in (2, 3, 5, 6, 7, 9):   # tails of 2, 3, 1, 2, 3, 1 after 0-2 tiles
        Y = np.empty((T, 7), np.float32)
        AVX2_KERNELS[int(qtype)](lin.weights, *lin.quantize(X[:T]), lin.lut, Y)
        np.testing.assert_array_equal(decoded[:T], Y, err_msg=f"T = {T}")
    assert fmt.name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 6])
def test_fused_group_equals_separate_kernels_and_the_twin(qtype, T):
    """LinearGroup (one quantized input, one parallel region over q/k/v- or gate/up-like weights)
    gives the separate kernels' results bit for bit, and they match the exact numpy twin."""
    from engine.quants.linear import LinearGroup

    rng = np.random.default_rng(int(qtype) * 7 + T)
    K = 512
    for rows in ([48, 16, 16], [40, 24]):
        lins = [QuantLinear(blocks_for(qtype, n, K, rng), qtype, K, n, name=f"w{i}") for i, n in enumerate(rows)]
        group = LinearGroup(lins)
        assert group.fused and len(group.plan[0][1]) == 1
        X = rng.normal(size=(T, K)).astype(np.float32)
        got = group.matmul(X)
        act = lins[0].quantize(X)
        for lin, y in zip(lins, got):
            assert y.shape == (T, lin.n_out)
            assert np.array_equal(y, lin.matmul(X))
            np.testing.assert_allclose(y, exact_twin(qtype, lin.raw, act), rtol=1e-4,
                                       atol=1e-5 * bound(qtype, lin.raw, X).max())


def test_group_of_mixed_formats_shares_the_input_when_the_activation_type_matches():
    from engine.quants.linear import LinearGroup

    rng = np.random.default_rng(5)
    K = 512
    a = QuantLinear(blocks_for(G.Q4_K, 32, K, rng), G.Q4_K, K, 32)
    b = QuantLinear(blocks_for(G.Q6_K, 16, K, rng), G.Q6_K, K, 16)
    c = QuantLinear(blocks_for(G.Q4_0, 16, K, rng), G.Q4_0, K, 16)
    X = rng.normal(size=(3, K)).astype(np.float32)
    g = LinearGroup([a, b])
    assert g.shared_act and not g.fused
    assert all(np.array_equal(y, l.matmul(X)) for y, l in zip(g.matmul(X), [a, b]))
    g = LinearGroup([a, c])   # Q8_K and Q8_0 inputs: each weight quantizes its own
    assert not g.shared_act
    assert all(np.array_equal(y, l.matmul(X)) for y, l in zip(g.matmul(X), [a, c]))
    # four weights, two formats: Q4_K x3 fused (one launch), the Q6_K alone, one Q8_K input
    a2 = QuantLinear(blocks_for(G.Q4_K, 8, K, rng), G.Q4_K, K, 8)
    a3 = QuantLinear(blocks_for(G.Q4_K, 24, K, rng), G.Q4_K, K, 24)
    g = LinearGroup([a, b, a2, a3])
    assert g.shared_act and g.fused and len(g.plan[0][1]) == 2
    assert all(np.array_equal(y, l.matmul(X)) for y, l in zip(g.matmul(X), [a, b, a2, a3]))
    with pytest.raises(ValueError):
        LinearGroup([])
    with pytest.raises(ValueError):
        LinearGroup([a, QuantLinear(blocks_for(G.Q4_K, 8, 256, rng), G.Q4_K, 256, 8)])
