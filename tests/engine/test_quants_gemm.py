"""The prefill GEMM (tokens in the lanes) in every instruction set this CPU has, for the
K-quants Q4_K / Q6_K and the 32-value formats, against the exact numpy twin; its activation
reorders against their numpy twins; and which family engine.quants picked."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from engine.quants import linear as quants
from engine.quants import simd
from engine.quants.linear import QuantLinear, get_format, kernel_weights
from engine.quants.common import F16_TO_F32
from tests.engine.test_quants_simd import blocks_for, bound, exact_twin

pytestmark = pytest.mark.skipif(not quants.SIMD_KERNELS, reason="no AVX2 (or DELTATALK_NO_SIMD=1): portable kernels only")

GEMM_TYPES = [G.Q4_K, G.Q6_K, G.Q8_0, G.Q4_0, G.Q5_0, G.IQ4_NL, G.Q4_1, G.Q5_1]
ISAS = [isa for isa, ok in (("avxvnni", simd.HAVE_AVX_VNNI), ("avx2", True)) if ok]


def width(qtype, blocks=3):
    return get_format(qtype).block_size * blocks * (1 if get_format(qtype).block_size == 256 else 6)


def gemm_kernels(isa):
    from engine.quants import gemm_dispatch

    return gemm_dispatch.kernels(isa, quants.AVX2_KERNELS, quants.AVX2_MULTI_KERNELS)


def run(kernel, qtype, raw, act):
    out = np.full((act[0].shape[0], raw.shape[0]), np.nan, np.float32)
    kernel(kernel_weights(raw, qtype), *act, F16_TO_F32, out)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_the_family_in_use_is_the_best_this_cpu_has():
    import os

    from engine.quants import gemm_dispatch

    if os.environ.get("DELTATALK_NO_VNNI") == "1":
        pytest.skip("stepped down by DELTATALK_NO_VNNI")
    want, isa = ("avx-vnni", "avxvnni") if simd.HAVE_AVX_VNNI else ("avx2", "avx2")
    assert quants.KERNEL_FAMILY == want
    for t in GEMM_TYPES:
        assert quants.FORMATS[int(t)].kernel.__name__.endswith(f"_gemm_{isa}")
        assert quants.MULTI_KERNELS[int(t)].__name__.endswith(f"_gemm_{isa}")
    assert quants.FORMATS[int(G.Q2_K)].kernel is quants.AVX2_KERNELS[int(G.Q2_K)]
    assert gemm_dispatch.GEMM_MIN_TOKENS == 2


@pytest.mark.parametrize("groups", [8, 16])
@pytest.mark.parametrize("T", [1, 16, 37])
def test_interleave_matches_numpy_twin(groups, T, rng):
    from engine.quants.gemm import interleave_q8_k_ref, interleaved

    X = rng.normal(size=(T, 768)).astype(np.float32)
    act = get_format(G.Q4_K).quantize_act(X)
    for got, want in zip(interleaved(*act, groups), interleave_q8_k_ref(*act, groups)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", [G.Q8_0, G.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 16, 37])
def test_interleave_32_matches_numpy_twin(qtype, T, rng):
    from engine.quants.gemm import interleave_q8_32_ref, interleaved_32

    act = get_format(qtype).quantize_act(rng.normal(size=(T, 352)).astype(np.float32))
    xs = act[2] if len(act) == 3 else act[1]
    for got, want in zip(interleaved_32(act[0], act[1], xs), interleave_q8_32_ref(act[0], act[1], xs)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
def test_gemm_matches_exact_twin(isa, qtype, rng):
    """T = 2 (one padded tile), 16, 37, 64, 100, 131: whole runs of tiles, single tiles and a
    padded last one; odd N; read-only blocks."""
    fmt = get_format(qtype)
    N, K = 11, width(qtype)
    raw = blocks_for(qtype, N, K, rng)
    raw.setflags(write=False)
    kernel = gemm_kernels(isa)[0][int(qtype)]
    for T in (2, 16, 37, 64, 100, 131):
        X = rng.normal(size=(T, K)).astype(np.float32)
        act = fmt.quantize_act(X)
        lim = 2e-6 * bound(qtype, raw, X) + 1e-6
        assert np.all(np.abs(run(kernel, qtype, raw, act) - exact_twin(qtype, raw, act)) <= lim), T


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x80, 0x3F])
def test_gemm_extreme_codes_do_not_overflow_or_saturate(isa, qtype, fill, rng):
    """Every code and scale byte at an extreme (Q8_0's -128 and +127 included) against
    activations at ±127: int32 headroom, and no int16 pair sum saturates on avx2."""
    fmt = get_format(qtype)
    K = width(qtype, 8)
    raw = blocks_for(qtype, 3, K, rng, fill=fill)
    X = np.where(rng.random((20, K)) < 0.5, -1.0, 1.0).astype(np.float32)
    act = fmt.quantize_act(X)
    got = run(gemm_kernels(isa)[0][int(qtype)], qtype, raw, act)
    with np.errstate(all="ignore"):
        want = exact_twin(qtype, raw, act)
        lim = 2e-6 * bound(qtype, raw, X) + 1e-6
    assert np.all(np.abs(got - want) <= lim)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
def test_decode_is_the_row_kernel_and_prefill_rows_do_not_depend_on_T(isa, qtype, rng):
    """One token: the row kernel bit for bit (the GEMM agrees with it to rounding). From
    GEMM_MIN_TOKENS on, a token's row is the same whatever T and its lane: chunked prefill
    equals one batch bit for bit."""
    from engine.quants.gemm_dispatch import GEMM_MIN_TOKENS

    K = width(qtype, 2)
    raw = blocks_for(qtype, 9, K, rng)
    kernel = gemm_kernels(isa)[0][int(qtype)]
    X = rng.normal(size=(37, K)).astype(np.float32)
    fmt = get_format(qtype)
    one = run(kernel, qtype, raw, fmt.quantize_act(X[:1]))
    np.testing.assert_array_equal(one, run(quants.AVX2_KERNELS[int(qtype)], qtype, raw, fmt.quantize_act(X[:1])))
    Y = run(kernel, qtype, raw, fmt.quantize_act(X))
    np.testing.assert_allclose(Y[0], one[0], rtol=1e-5, atol=1e-5 * np.abs(one).max())
    cuts = ((0, 2), (2, 19), (19, 35), (35, 37))
    assert all(b - a >= GEMM_MIN_TOKENS for a, b in cuts)
    parts = [run(kernel, qtype, raw, fmt.quantize_act(X[a:b])) for a, b in cuts]
    np.testing.assert_array_equal(np.concatenate(parts), Y)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", [G.Q4_K, G.Q6_K, G.Q8_0, G.Q4_1], ids=lambda t: t.name)
def test_fused_group_call_equals_separate_calls(isa, qtype, rng):
    """matmul3 (one activation reorder for up to three weights) equals three single calls."""
    kernels, multi = gemm_kernels(isa)
    K = width(qtype, 2)
    fmt = get_format(qtype)
    for rows in ([48, 16, 16], [40, 24]):
        raws = [blocks_for(qtype, n, K, rng) for n in rows]
        act = fmt.quantize_act(rng.normal(size=(40, K)).astype(np.float32))
        ws = [kernel_weights(r, qtype) for r in raws]
        outs = [np.empty((40, n), np.float32) for n in rows]
        if len(rows) == 2:
            ws.append(ws[1][:0])
            outs.append(np.empty((40, 0), np.float32))
        xs = act[2] if len(act) == 3 else act[1]
        multi[int(qtype)](ws[0], ws[1], ws[2], act[0], act[1], xs, F16_TO_F32, *outs)
        for raw, y in zip(raws, outs):
            np.testing.assert_array_equal(y, run(kernels[int(qtype)], qtype, raw, act))


def test_quant_linear_prefill_goes_through_the_family_in_use(rng):
    raw = blocks_for(G.Q4_K, 16, 512, rng)
    lin = QuantLinear(raw, G.Q4_K, 512, 16)
    X = rng.normal(size=(20, 512)).astype(np.float32)
    np.testing.assert_array_equal(lin.matmul(X), run(quants.FORMATS[int(G.Q4_K)].kernel, G.Q4_K, raw, lin.quantize(X)))
