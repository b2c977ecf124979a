"""The llama forward pass against a plain numpy implementation written from the math.

F32 weights keep llama.cpp's activation quantization out of the comparison, so the two
must agree to float32 rounding (the KV cache's fp16 rounding is applied in both).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from engine.gguf_file import GGUFFile
from engine.loader import load_model
from tests.tiny_models import write_tiny_llama


def numpy_llama(gf: GGUFFile, tokens: list[int]) -> np.ndarray:
    """Logits (T, V) of a whole prompt, from dequantized weights, in float64."""
    m = gf.metadata
    D, H, Hkv = m["llama.embedding_length"], m["llama.attention.head_count"], m["llama.attention.head_count_kv"]
    hd, eps, base = D // H, m["llama.attention.layer_norm_rms_epsilon"], m["llama.rope.freq_base"]
    W = lambda name: gf.tensor_float(name).astype(np.float64)  # noqa: E731  (numpy order: out x in)
    f16 = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731  (F16 KV cache)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    n = len(tokens)
    pos = np.arange(n)[:, None]
    inv = base ** (-np.arange(0, hd, 2) / hd)
    if "rope_freqs.weight" in gf.tensors:
        inv = inv / W("rope_freqs.weight")
    ang = pos * inv  # (n, hd/2)

    def rope(x):  # x (n, heads, hd); adjacent pairs
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        return out

    x = W("token_embd.weight")[tokens]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(m["llama.block_count"]):
        p = f"blk.{i}."
        h = norm(x, W(p + "attn_norm.weight"))
        q = rope((h @ W(p + "attn_q.weight").T).reshape(n, H, hd))
        k = f16(rope((h @ W(p + "attn_k.weight").T).reshape(n, Hkv, hd)))
        v = f16((h @ W(p + "attn_v.weight").T).reshape(n, Hkv, hd))
        att = np.empty((n, H, hd))
        for hh in range(H):
            kv = hh // (H // Hkv)
            s = f16(q[:, hh]) @ k[:, kv].T / np.sqrt(hd) + mask
            pr = np.exp(s - s.max(-1, keepdims=True))
            att[:, hh] = (pr / pr.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(n, D) @ W(p + "attn_output.weight").T
        h = norm(x, W(p + "ffn_norm.weight"))
        g, u = h @ W(p + "ffn_gate.weight").T, h @ W(p + "ffn_up.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ W(p + "ffn_down.weight").T
    out = W("output.weight") if "output.weight" in gf.tensors else W("token_embd.weight")
    return norm(x, W("output_norm.weight")) @ out.T


@pytest.mark.parametrize("variant", [
    dict(),                                   # tied head, GQA 4/2
    dict(tied=False, n_head_kv=4),            # separate head, plain MHA
    dict(rope_freqs=True, n_head=8, n_head_kv=2),  # Llama-3 style rope_freqs, GQA 4:1
])
def test_engine_matches_numpy_forward(tmp_path, variant):
    path = write_tiny_llama(tmp_path / "m.gguf", weight_type=T.F32, embd_type=T.F32, **variant)
    loaded = load_model(path, n_ctx=64)
    tokens = [1, 40, 80, 120, 7, 260, 2, 90, 91, 92, 93]
    got = loaded.model.forward(tokens, loaded.model.make_cache(), logits="all")
    want = numpy_llama(loaded.gguf, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_quantized_model_stays_close_to_its_float_twin(tmp_path):
    """Same random weights in Q8_0 vs F32: quantization noise only, no structural difference."""
    f32 = load_model(write_tiny_llama(tmp_path / "f.gguf", weight_type=T.F32, embd_type=T.F32), n_ctx=64)
    q8 = load_model(write_tiny_llama(tmp_path / "q.gguf", weight_type=T.Q8_0, embd_type=T.Q8_0), n_ctx=64)
    tokens = [1, 5, 9, 200, 17]
    a = f32.model.forward(tokens, f32.model.make_cache(), logits="all")
    b = q8.model.forward(tokens, q8.model.make_cache(), logits="all")
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_logits_only_where_asked(tiny_llama_path):
    m = load_model(tiny_llama_path, n_ctx=32).model
    c = m.make_cache()
    assert m.forward([1, 2, 3], c, logits="none") is None
    assert m.forward([4, 5], c, logits="last").shape == (1, m.n_vocab)
    assert m.forward([6, 7], c, logits="all").shape == (2, m.n_vocab)
    assert c[0].offset == 7


def test_context_overflow_and_bad_tokens_are_refused(tiny_llama_path):
    m = load_model(tiny_llama_path, n_ctx=8).model
    c = m.make_cache()
    with pytest.raises(ValueError, match="context full"):
        m.forward(list(range(9)), c)
    with pytest.raises(ValueError, match="out of range"):
        m.forward([m.n_vocab], c)
    assert c[0].offset == 0  # nothing was written


def test_forward_checks_its_input_before_writing(tiny_llama_path):
    """The shared preamble (engine.models.base): llama refuses what every architecture refuses."""
    m = load_model(tiny_llama_path, n_ctx=32).model
    c = m.make_cache()
    with pytest.raises(ValueError, match="logits must be"):
        m.forward([1, 2], c, logits="first")
    with pytest.raises(ValueError, match="cache has 1 layers"):
        m.forward([1, 2], c[:1])
    m.forward([1, 2], c, logits="none")
    c[-1].trim(1)
    with pytest.raises(ValueError, match="different positions"):
        m.forward([3], c)
    assert [x.offset for x in c] == [2] * (len(c) - 1) + [1]   # nothing was written


def test_reused_work_buffers_carry_nothing_between_calls(tiny_llama_path):
    """Two conversations interleaved step by step (same T, so the same run state) give the
    logits each gives alone."""
    m = load_model(tiny_llama_path, n_ctx=64).model
    prompts = ([1, 50, 60, 70], [9, 8, 7, 6])
    alone = []
    for p in prompts:
        c = m.make_cache()
        alone.append([m.forward(p, c)] + [m.forward([t], c) for t in (11, 12, 13)])
    caches = [m.make_cache(), m.make_cache()]
    mixed: list[list] = [[], []]
    for i, p in enumerate(prompts):
        mixed[i].append(m.forward(p, caches[i]))
    for t in (11, 12, 13):
        for i in range(2):
            mixed[i].append(m.forward([t], caches[i]))
    for a, b in zip(alone, mixed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
