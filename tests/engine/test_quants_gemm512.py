"""The AVX-512 VNNI family: zmm row kernels (bit-identical to AVX2) and the tokens-in-lanes
prefill GEMM for the K-quants Q4_K / Q6_K and the 32-value formats (against the exact numpy
twin, and its activation reorders against their numpy twins)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from engine import quants
from engine.quants import QuantLinear, get_format, kernel_weights, simd, simd_kernels
from engine.quants.common import F16_TO_F32
from tests.engine.test_quants_simd import blocks_for, bound, exact_twin

pytestmark = pytest.mark.skipif(quants.KERNEL_FAMILY != "avx512-vnni",
                                reason="no AVX-512 VNNI (or DELTATALK_NO_AVX512=1): AVX2 kernels only")

GEMM_TYPES = [G.Q4_K, G.Q6_K, G.Q8_0, G.Q4_0, G.Q5_0, G.IQ4_NL, G.Q4_1, G.Q5_1]


def width(qtype, blocks=3):
    return get_format(qtype).block_size * blocks * (1 if get_format(qtype).block_size == 256 else 6)


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_family_and_dispatch_tables():
    from engine.quants import gemm512

    assert simd.HAVE_AVX512_VNNI
    for t in GEMM_TYPES:
        assert quants.FORMATS[int(t)].kernel.__name__.endswith("_gemm")
        assert quants.MULTI_KERNELS[int(t)].__name__.endswith("_gemm")
    assert quants.FORMATS[int(G.Q5_K)].kernel.__name__ == "matmul_q5_k_512"
    assert quants.FORMATS[int(G.Q2_K)].kernel is quants.AVX2_KERNELS[int(G.Q2_K)]
    assert gemm512.GEMM_MIN_TOKENS == 2


@pytest.mark.parametrize("groups", [8, 16])
@pytest.mark.parametrize("T", [1, 16, 37])
def test_interleave_matches_numpy_twin(groups, T, rng):
    from engine.quants.gemm512 import interleave_q8_k_ref, interleaved

    X = rng.normal(size=(T, 768)).astype(np.float32)
    act = get_format(G.Q4_K).quantize_act(X)
    for got, want in zip(interleaved(*act, groups), interleave_q8_k_ref(*act, groups)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", [G.Q8_0, G.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 16, 37])
def test_interleave_32_matches_numpy_twin(qtype, T, rng):
    from engine.quants.gemm512 import interleave_q8_32_ref, interleaved_32

    act = get_format(qtype).quantize_act(rng.normal(size=(T, 352)).astype(np.float32))
    xs = act[2] if len(act) == 3 else act[1]
    for got, want in zip(interleaved_32(act[0], act[1], xs), interleave_q8_32_ref(act[0], act[1], xs)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", [G.Q4_K, G.Q5_K, G.Q6_K], ids=lambda t: t.name)
def test_zmm_row_kernels_are_bit_identical_to_avx2(qtype, rng):
    raw = blocks_for(qtype, 13, 768, rng)
    for T in (1, 4, 9, 15):
        act = get_format(qtype).quantize_act(rng.normal(size=(T, 768)).astype(np.float32))
        outs = []
        for kernel in (quants.AVX2_KERNELS[int(qtype)], getattr(simd_kernels, f"matmul_{qtype.name.lower()}_512")):
            out = np.full((T, 13), np.nan, np.float32)
            kernel(kernel_weights(raw, qtype), *act, F16_TO_F32, out)
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [16, 37, 64, 100, 131])
def test_gemm_matches_exact_twin(qtype, T, rng):
    """Whole 64-token chunks, single tiles and a padded last tile; odd N; read-only blocks."""
    fmt = get_format(qtype)
    N, K = 11, width(qtype)
    raw = blocks_for(qtype, N, K, rng)
    raw.setflags(write=False)
    X = rng.normal(size=(T, K)).astype(np.float32)
    act = fmt.quantize_act(X)
    got = QuantLinear(raw, qtype, K, N).matmul(X)
    lim = 2e-6 * bound(qtype, raw, X) + 1e-6
    assert np.all(np.abs(got - exact_twin(qtype, raw, act)) <= lim)


@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x80, 0x3F])
def test_gemm_extreme_codes_do_not_overflow(qtype, fill, rng):
    """Every code and scale byte at an extreme against activations at ±127 (int32 headroom)."""
    fmt = get_format(qtype)
    K = width(qtype, 8)
    raw = blocks_for(qtype, 3, K, rng, fill=fill)
    X = np.where(rng.random((20, K)) < 0.5, -1.0, 1.0).astype(np.float32)
    act = fmt.quantize_act(X)
    got = QuantLinear(raw, qtype, K, 3).matmul(X)
    with np.errstate(all="ignore"):
        want = exact_twin(qtype, raw, act)
        lim = 2e-6 * bound(qtype, raw, X) + 1e-6
    assert np.all(np.abs(got - want) <= lim)


@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
def test_decode_is_the_row_kernel_and_prefill_rows_do_not_depend_on_T(qtype, rng):
    """One token: the row kernel bit for bit (and the GEMM agrees with it to rounding). From
    GEMM_MIN_TOKENS on, a token's row is the same whatever T and its lane: chunked prefill
    equals one batch bit for bit."""
    from engine.quants.gemm512 import GEMM_MIN_TOKENS

    K = width(qtype, 2)
    raw = blocks_for(qtype, 9, K, rng)
    lin = QuantLinear(raw, qtype, K, 9)
    X = rng.normal(size=(37, K)).astype(np.float32)
    want = np.empty((1, 9), np.float32)
    quants.AVX2_KERNELS[int(qtype)](lin.weights, *lin.quantize(X[:1]), F16_TO_F32, want)
    np.testing.assert_array_equal(lin(X[0]), want[0])
    Y = lin.matmul(X)
    np.testing.assert_allclose(Y[0], want[0], rtol=1e-5, atol=1e-5 * np.abs(want).max())
    parts = [lin.matmul(X[a:b]) for a, b in ((0, 2), (2, 19), (19, 35), (35, 37))]
    assert all(b - a >= GEMM_MIN_TOKENS for a, b in ((0, 2), (2, 19), (19, 35), (35, 37)))
    np.testing.assert_array_equal(np.concatenate(parts), Y)


@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
def test_group_through_the_gemm_equals_separate_calls(qtype, rng):
    from engine.quants import LinearGroup

    K = width(qtype, 2)
    for rows in ([48, 16, 16], [40, 24]):
        lins = [QuantLinear(blocks_for(qtype, n, K, rng), qtype, K, n, name=f"w{i}") for i, n in enumerate(rows)]
        group = LinearGroup(lins)
        X = rng.normal(size=(40, K)).astype(np.float32)
        for lin, y in zip(lins, group.matmul(X)):
            assert np.array_equal(y, lin.matmul(X))
