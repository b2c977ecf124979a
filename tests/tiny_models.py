"""Tiny GGUF files written with the `gguf` package, for loader, fuzz and model tests.

`write_tiny_llama(path)` makes a 2-layer `llama` model with random weights (a few
hundred KB) in llama.cpp's exact layout and metadata, with a byte-level BPE vocabulary
(the 256 byte tokens, a few merges and ChatML control tokens).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_vocab():
    """GPT-2 byte-level tokens for all 256 bytes, some merges, and control tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tokens = [chr(c) for _, c in sorted(zip(bs, cs))]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_tokens + merged
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


# Byte offsets of the fp16 scales in a block, for the types gguf.quants cannot quantize.
_K_SCALES = {T.Q4_K: (144, [0, 2]), T.Q5_K: (176, [0, 2]), T.Q6_K: (210, [208])}


def _quantize(data: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return data.astype(np.float32)
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype in _K_SCALES:
        # gguf.quants has no k-quant quantizer: random valid blocks (small finite scales) seeded
        # by the data, enough for tests that compare two code paths over the same weights
        size, scales = _K_SCALES[qtype]
        rng = np.random.default_rng(abs(int(data.view(np.uint32).sum())) % (1 << 32))
        n_rows, n_cols = data.shape
        raw = rng.integers(0, 256, size=(n_rows, n_cols // 256 * size), dtype=np.uint8)
        blocks = raw.reshape(n_rows, -1, size)
        for off in scales:
            vals = (rng.normal(size=blocks.shape[:2]) * 0.02).astype(np.float16)
            blocks[:, :, off : off + 2] = vals.view(np.uint8).reshape(blocks.shape[:2] + (2,))
        return raw
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def write_tiny_llama(path: str | Path, *, d_model=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                     weight_type: T = T.Q8_0, embd_type: T = T.Q8_0, tied=True, seed=0,
                     n_ctx_train=256, rope_freqs: bool = False, chat_template: str | bool | None = None,
                     n_vocab_rows: int | None = None) -> Path:
    """n_vocab_rows: embedding/output rows when they should differ from the token list (a hostile file).
    chat_template: None/True ChatML, False none (a base model: completion only), or the template's text."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types, merges = byte_vocab()
    vocab = n_vocab_rows or len(tokens)
    hd = d_model // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not False:   # False: a base model (completion only)
        w.add_chat_template(CHATML if chat_template in (None, True) else chat_template)

    def mat(name, n_in, n_out, qtype, scale=None):
        scale = scale or 1.0 / np.sqrt(n_in)
        w.add_tensor(name, _quantize(rng.normal(0, scale, size=(n_out, n_in)).astype(np.float32), qtype),
                     raw_dtype=qtype)

    def vec(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.normal(size=n)).astype(np.float32))

    mat("token_embd.weight", d_model, vocab, embd_type, scale=1.0)
    if rope_freqs:  # Llama-3 style per-pair frequency divisors
        w.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, hd // 2).astype(np.float32))
    vec("output_norm.weight", d_model)
    if not tied:
        mat("output.weight", d_model, vocab, embd_type)
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", d_model)
        mat(p + "attn_q.weight", d_model, n_head * hd, weight_type)
        mat(p + "attn_k.weight", d_model, n_head_kv * hd, weight_type)
        mat(p + "attn_v.weight", d_model, n_head_kv * hd, weight_type)
        mat(p + "attn_output.weight", n_head * hd, d_model, weight_type)
        vec(p + "ffn_norm.weight", d_model)
        mat(p + "ffn_gate.weight", d_model, n_ff, weight_type)
        mat(p + "ffn_up.weight", d_model, n_ff, weight_type)
        mat(p + "ffn_down.weight", n_ff, d_model, weight_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
