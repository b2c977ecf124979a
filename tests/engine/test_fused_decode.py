"""The fused decode step (engine/fused_decode.py) against the layer-by-layer forward it replaces.

Both run the same kernels in the same order, so the logits and the KV cache must be equal bit
for bit at every step, for every weight format the fused step takes, and with mixed formats.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from engine import fused_decode
from engine.loader import load_model
from tests.tiny_models import write_tiny_llama

pytestmark = pytest.mark.skipif(not fused_decode.enabled(), reason="no AVX2+F16C row kernels here")


def _decode_both(model, prompt: list[int], steps: int) -> int:
    """Greedy decode with the fused step and with the layer-by-layer path, side by side."""
    fused = model.fused
    assert fused is not None
    ca, cb = model.make_cache(), model.make_cache()
    model.forward(prompt, ca, logits="none")
    model.forward(prompt, cb, logits="none")
    tok = prompt[-1]
    for i in range(steps):
        a = model.forward([tok], ca)                 # fused
        model.fused = None
        try:
            b = model.forward([tok], cb)             # layer by layer
        finally:
            model.fused = fused
        assert a.shape == b.shape == (1, model.n_vocab)
        assert np.array_equal(a, b), f"step {i}: logits differ by {np.abs(a - b).max()}"
        assert ca[0].offset == cb[0].offset == len(prompt) + i + 1
        for la, lb in zip(ca, cb):
            n = la.offset
            assert np.array_equal(la.keys[:n], lb.keys[:n]) and np.array_equal(la.values[:n], lb.values[:n])
        tok = int(a[0].argmax())
    return tok


@pytest.mark.parametrize("wtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_fused_step_equals_the_layer_by_layer_forward(tmp_path, wtype):
    kq = wtype in (T.Q4_K, T.Q5_K, T.Q6_K)
    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=wtype, d_model=256 if kq else 64,
                            n_ff=512 if kq else 128, n_layer=3, seed=int(wtype))
    model = load_model(path, 64).model
    _decode_both(model, [5, 17, 99, 3], steps=12)


def test_mixed_formats_and_a_separate_head(tmp_path):
    # Q4_K layers with a Q6_K head (a Q4_K_M-like file); GQA 4:1
    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=T.Q4_K, embd_type=T.Q6_K, tied=False,
                            d_model=256, n_ff=512, n_head=8, n_head_kv=2, n_layer=2)
    model = load_model(path, 64).model
    _decode_both(model, [7, 8, 9], steps=8)


def test_unsupported_formats_and_the_switch_fall_back(tmp_path, monkeypatch):
    f16 = load_model(write_tiny_llama(tmp_path / "f16.gguf", weight_type=T.F16), 64).model
    assert f16.fused is None
    assert "F16" in fused_decode.unsupported_reason(f16)
    path = write_tiny_llama(tmp_path / "q8.gguf", weight_type=T.Q8_0)
    assert load_model(path, 64).model.fused is not None
    monkeypatch.setenv("DELTATALK_NO_FUSED_DECODE", "1")
    off = load_model(path, 64).model
    assert off.fused is None and fused_decode.unsupported_reason(off) == "turned off"


def test_context_end_is_refused_before_any_kernel(tmp_path):
    model = load_model(write_tiny_llama(tmp_path / "m.gguf", weight_type=T.Q8_0), 16).model
    cache = model.make_cache()
    model.forward(list(range(1, 17)), cache, logits="none")
    with pytest.raises(ValueError, match="context full"):
        model.forward([3], cache)
    assert cache[0].offset == 16


@pytest.mark.slow
def test_default_model_fused_decode_is_exact(default_model_path):
    model = load_model(default_model_path, 256).model
    assert model.fused is not None, fused_decode.unsupported_reason(model)
    _decode_both(model, [1, 9690, 314, 253, 1345, 28], steps=24)


def test_caches_restored_apart_are_moved_into_one_block(tmp_path):
    # a restored session's caches are made one per layer (KVCache.from_state); the fused step
    # moves them into one block, once, and decodes exactly as the layer-by-layer path
    from engine.cache import KVCache

    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=T.Q8_0, n_layer=2)
    model = load_model(path, 64).model
    full = model.make_cache()
    model.forward([5, 6, 7, 8], full, logits="none")
    apart = [KVCache.from_state(c.snapshot(), 64) for c in full]
    assert all(c.block is None for c in apart)
    a = model.forward([9], apart)
    assert all(c.block is apart[0].block and c.layer == l for l, c in enumerate(apart))
    model.fused, fused = None, model.fused
    b = model.forward([9], full)
    model.fused = fused
    assert np.array_equal(a, b)
    for ca, cb in zip(apart, full):
        assert np.array_equal(ca.keys[:5], cb.keys[:5]) and np.array_equal(ca.values[:5], cb.values[:5])


def test_weights_outside_one_file_mapping_take_the_layer_path(tmp_path):
    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=T.Q8_0, n_layer=2)
    model = load_model(path, 64).model
    assert fused_decode.FusedDecode.build(model) is not None
    layer = model.layers[1]
    layer.w_up.raw = layer.w_up.raw.copy()        # a weight in its own memory, not the file
    assert fused_decode.FusedDecode.build(model) is None


@pytest.mark.parametrize("wtype", [T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_fused_verification_rows_equal_the_layer_path_and_single_steps(tmp_path, wtype):
    # a speculative verification (token_exact, logits of every row) in one fused call: each
    # row bit for bit the layer-by-layer token-exact pass and a decode step fed alone
    kq = wtype in (T.Q4_K, T.Q6_K)
    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=wtype, d_model=256 if kq else 64,
                            n_ff=512 if kq else 128, n_layer=2, seed=3)
    model = load_model(path, 64).model
    fused = model.fused
    assert fused is not None
    prompt, batch = [5, 17, 99, 3], [42, 7, 7, 200, 11, 2, 9, 61, 5]
    for T_ in (2, 4, 5, 9):
        ca, cb, cc = model.make_cache(), model.make_cache(), model.make_cache()
        for c in (ca, cb, cc):
            model.forward(prompt, c, logits="none")
        a = model.forward(batch[:T_], ca, logits="all", token_exact=True)   # fused
        model.fused = None
        try:
            b = model.forward(batch[:T_], cb, logits="all", token_exact=True)   # layer by layer
            singles = np.concatenate([model.forward([t], cc, logits="last") for t in batch[:T_]])
        finally:
            model.fused = fused
        assert a.shape == (T_, model.n_vocab)
        assert np.array_equal(a, b) and np.array_equal(a, singles), f"T={T_}"
        n = ca[0].offset
        assert n == cb[0].offset == len(prompt) + T_
        for la, lb in zip(ca, cb):
            assert np.array_equal(la.keys[:n], lb.keys[:n]) and np.array_equal(la.values[:n], lb.values[:n])


def test_the_step_carries_the_stamp_of_its_callees_sources():
    """numba caches the step with its callees' code inside: the stamp must follow their sources."""
    from engine import fused_decode
    from engine.kernel_stamp import sources_sha256

    assert fused_decode.CALLEE_SOURCES_SHA256 == sources_sha256(), \
        "a kernel the fused step calls changed: run `python -m engine.quants.gen_simd_kernels`"


def test_the_steps_linking_bitcode_is_dropped_after_it_loads(tmp_path):
    """numba keeps a parsed LLVM module beside the step for linking it into callers (none
    exist): ~10 MB for the step, which links every format's kernels. It is dropped after the
    first step, and the step runs on unchanged."""
    from engine.jit import release_linking_bitcode

    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=T.Q4_1, d_model=64, n_ff=128, n_layer=2)
    model = load_model(path, 64).model
    _decode_both(model, [1, 2, 3], steps=2)
    libs = [cres.library for cres in fused_decode._decode_step.overloads.values()]
    assert libs and all(lib._shared_module is None for lib in libs)
    assert release_linking_bitcode(fused_decode._decode_step) == 0   # nothing left to drop
    _decode_both(model, [4, 5, 6], steps=3)
