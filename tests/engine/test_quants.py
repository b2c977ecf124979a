"""Block formats: our numpy dequantization against gguf.quants, numba kernels against numpy twins."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from engine.errors import UnsupportedQuantError
from engine.quants.linear import FORMATS, QuantLinear, get_format
from engine.quants import activations as act

# Byte offsets of the fp16 scale fields inside one block, per type.
FP16_FIELDS = {
    G.Q4_0: [0], G.Q4_1: [0, 2], G.Q5_0: [0], G.Q5_1: [0, 2], G.Q8_0: [0], G.IQ4_NL: [0],
    G.Q2_K: [80, 82], G.Q3_K: [108], G.Q4_K: [0, 2], G.Q5_K: [0, 2], G.Q6_K: [208], G.IQ4_XS: [0],
}
QUANT_TYPES = list(FP16_FIELDS)
ALL_TYPES = [G.F32, G.F16, G.BF16] + QUANT_TYPES


def random_blocks(qtype, n_rows: int, n_cols: int, rng, edge: str | None = None) -> np.ndarray:
    """Random raw blocks with finite fp16 scales; edge='zero' / 'max' for the edge cases."""
    fmt = get_format(qtype)
    row_bytes = fmt.row_bytes(n_cols)
    if qtype == G.F32:
        vals = rng.normal(size=(n_rows, n_cols)).astype(np.float32)
        return vals.view(np.uint8).reshape(n_rows, row_bytes)
    if qtype in (G.F16, G.BF16):
        vals = rng.normal(size=(n_rows, n_cols)).astype(np.float32)
        if qtype == G.F16:
            return vals.astype(np.float16).view(np.uint8).reshape(n_rows, row_bytes)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_rows, row_bytes)
    raw = rng.integers(0, 256, size=(n_rows, row_bytes), dtype=np.uint8)
    if edge == "zero":
        raw[:] = 0
    elif edge == "max":
        raw[:] = 0xFF
    blocks = raw.reshape(n_rows, -1, fmt.type_size)
    for off in FP16_FIELDS[qtype]:
        if edge == "zero":
            vals = np.zeros(blocks.shape[:2], np.float16)
        elif edge == "max":
            vals = np.full(blocks.shape[:2], 60000.0 if off == 0 else -60000.0, np.float16)
        else:
            vals = (rng.normal(size=blocks.shape[:2]) * 0.05).astype(np.float16)
        blocks[:, :, off : off + 2] = vals.view(np.uint8).reshape(blocks.shape[:2] + (2,))
    return raw


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 3, 7])
def test_dequantize_matches_gguf(qtype, n_rows, rng):
    n_cols = 512
    raw = random_blocks(qtype, n_rows, n_cols, rng)
    ours = get_format(qtype).dequantize(raw)
    theirs = gguf.quants.dequantize(raw, qtype).reshape(n_rows, n_cols)
    assert ours.shape == (n_rows, n_cols) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("edge", ["zero", "max"])
def test_dequantize_edge_values(qtype, edge, rng):
    raw = random_blocks(qtype, 2, 256, rng, edge=edge)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.dequantize(raw, qtype).reshape(2, 256).astype(np.float32)
    np.testing.assert_array_equal(get_format(qtype).dequantize(raw), theirs)


def test_every_code_value_of_a_nibble_format_round_trips(rng):
    """Q4_1 with d=1, m=0: each value equals its 4-bit code, in llama.cpp's nibble order."""
    raw = np.zeros((1, 20), np.uint8)
    raw[0, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    raw[0, 4:20] = np.arange(16) | (np.arange(16)[::-1] << 4)
    y = get_format(G.Q4_1).dequantize(raw)[0]
    np.testing.assert_array_equal(y[:16], np.arange(16))
    np.testing.assert_array_equal(y[16:], np.arange(16)[::-1])


@pytest.mark.parametrize("qtype", [G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0], ids=lambda t: t.name)
def test_dequantize_of_gguf_quantized_data(qtype, rng):
    x = rng.normal(size=(5, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    ours = get_format(qtype).dequantize(raw)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    assert np.abs(ours - x).max() < 0.5  # and it is a quantization of x


@pytest.mark.parametrize("kind", ["q8_0", "q8_1", "q8_k"])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_activation_quantizer_matches_numpy_twin(kind, T, rng):
    """One token runs the serial kernel, more the token-parallel one: both equal the twin."""
    X = (rng.normal(size=(T, 512)) * rng.uniform(0.01, 30, size=(T, 1))).astype(np.float32)
    if T > 1:
        X[1] = 0.0  # an all-zero row
    X[T // 2, :256] = 0.0  # a zero block
    X[-1, 7] = 1e4  # an outlier
    got = act.QUANTIZERS[kind](X)
    want = act.QUANTIZERS_REF[kind](X)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for t in (0, T - 1):   # a token alone (decode) gives its row of the batch
        for g, w in zip(act.QUANTIZERS[kind](X[t : t + 1]), got):
            np.testing.assert_array_equal(g[0], w[t])


def test_q8_0_activation_follows_llama_cpp():
    x = np.linspace(-1, 1, 32, dtype=np.float32)[None]
    q, d = act.quantize_q8_0(x)
    assert q[0, 0] == -127 and q[0, -1] == 127
    assert d[0, 0] == np.float32(np.float16(1 / 127))


def test_q8_k_uses_the_signed_maximum():
    x = np.zeros((1, 256), np.float32)
    x[0, 5] = -2.0
    x[0, 6] = 1.0
    q, d, bsums = act.quantize_q8_k(x)
    # iscale = -127 / max with max = -2 (signed): q = round_half_even(63.5 * x)
    assert q[0, 5] == -127 and q[0, 6] == 64
    assert d[0, 0] == np.float32(1) / np.float32(63.5)
    assert bsums[0, 0] == -127 + 64


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 3, 17])
def test_kernel_matches_numpy_twin(qtype, T, rng):
    fmt = get_format(qtype)
    N, K = 13, 512
    raw = random_blocks(qtype, N, K, rng)
    X = rng.normal(size=(T, K)).astype(np.float32)
    lin = QuantLinear(raw, qtype, K, N)
    got = lin.matmul(X)
    a = fmt.quantize_act(X)
    want = fmt.matmul_ref(raw, a)
    # scale of the sum: sum |w||x| per output
    w = np.abs(fmt.dequantize(raw)).astype(np.float64)
    x = np.abs(act.DEQUANT_REF[fmt.act](a))
    bound = x @ w.T
    assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-6)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_quantized_activation_stays_close_to_float(qtype, rng):
    N, K = 9, 1024
    raw = random_blocks(qtype, N, K, rng)
    X = rng.normal(size=(2, K)).astype(np.float32)
    got = QuantLinear(raw, qtype, K, N).matmul(X)
    exact = X.astype(np.float64) @ get_format(qtype).dequantize(raw).astype(np.float64).T
    scale = np.abs(X).astype(np.float64) @ np.abs(get_format(qtype).dequantize(raw)).astype(np.float64).T
    assert np.all(np.abs(got - exact) <= 0.02 * scale + 1e-5)


def test_decode_call_equals_one_row_of_prefill(rng):
    raw = random_blocks(G.Q4_1, 8, 256, rng)
    lin = QuantLinear(raw, G.Q4_1, 256, 8)
    X = rng.normal(size=(4, 256)).astype(np.float32)
    from engine.quants import linear

    if linear.KERNEL_FAMILY != "portable":   # prefill is gemm.py's tokens-in-lanes sum order
        np.testing.assert_allclose(lin(X[2]), lin.matmul(X)[2], rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(lin(X[2]), lin.matmul(X)[2])


def test_readonly_mmapped_blocks_are_accepted(rng):
    raw = random_blocks(G.Q8_0, 4, 64, rng)
    ro = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(raw.shape)
    assert not ro.flags.writeable
    x = rng.normal(size=64).astype(np.float32)
    np.testing.assert_array_equal(QuantLinear(ro, G.Q8_0, 64, 4)(x), QuantLinear(raw, G.Q8_0, 64, 4)(x))


def test_quant_linear_rejects_wrong_shapes(rng):
    raw = random_blocks(G.Q4_K, 3, 256, rng)
    with pytest.raises(ValueError, match="blk.0.x"):
        QuantLinear(raw, G.Q4_K, 512, 3, name="blk.0.x")
    with pytest.raises(ValueError):
        QuantLinear(raw.astype(np.int16), G.Q4_K, 256, 3)
    with pytest.raises(ValueError, match="multiple of 256"):
        QuantLinear(raw, G.Q4_K, 100, 3)
    lin = QuantLinear(raw, G.Q4_K, 256, 3)
    with pytest.raises(ValueError):
        lin.matmul(np.zeros((1, 128), np.float32))


def test_unknown_type_names_the_supported_ones():
    with pytest.raises(UnsupportedQuantError, match="IQ2_XXS.*Q4_K"):
        get_format(G.IQ2_XXS)
    assert {"Q4_1", "Q8_0", "Q4_K", "Q6_K", "BF16"} <= {f.name for f in FORMATS.values()}


@pytest.mark.parametrize("first", [-2.0, 2.0])
def test_q8_k_takes_the_first_of_equal_magnitudes(first):
    """|x| ties of opposite sign: the first one is the signed maximum (llama.cpp's scan)."""
    x = np.zeros((1, 256), np.float32)
    x[0, 3], x[0, 9], x[0, 20] = first, -first, first / 2
    q, d, bsums = act.quantize_q8_k(x)
    assert q[0, 3] == -127 and q[0, 9] == 127
    for g, w in zip((q, d, bsums), act.quantize_q8_k_ref(x)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("kind", ["q8_0", "q8_1", "q8_k"])
def test_a_value_that_is_not_finite_quantizes_as_zero(kind, rng):
    """A NaN or infinity (a model with broken weights) stays in its own value: its block's
    scale and the other codes are those of the same input with a 0 there."""
    X = rng.normal(size=(1, 512)).astype(np.float32)
    Y = X.copy()
    X[0, [5, 300]] = np.nan
    X[0, [40, 301]] = np.inf, -np.inf
    Y[0, [5, 300, 40, 301]] = 0.0
    for g, w in zip(act.QUANTIZERS[kind](X), act.QUANTIZERS[kind](Y)):
        np.testing.assert_array_equal(g, w)
