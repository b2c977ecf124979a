"""Tiny `phi3`, `qwen2` and `qwen3` GGUF files in llama.cpp's exact layout, deterministic weights.

Used by tools/make_arch_fixtures.py (which quantizes them with llama.cpp and stores llama.cpp's
logits) and by tests/engine/test_arch_*.py, which rewrite the F32 file bit for bit and check its
weights digest against the manifest. Weights come from tests.qwen35_models._Rand (PCG64's raw
stream, exact arithmetic: the same bytes with any numpy version).

Widths are multiples of 256 so llama.cpp's K-quants apply to every matrix. GGUF ne order is
[in, out]; numpy arrays are (out, in).

    phi3:   token_embd [D, V], output [D, V], output_norm [D], rope_factors_long/short [n_rot/2],
            blk.N: attn_norm [D], attn_qkv [D, D + 2*Hkv*hd] (rows Q | K | V) -- or attn_q/k/v
            with fused_qkv=False --, attn_output [D, D], ffn_norm [D], ffn_up [D, 2*FF] (gate | up),
            ffn_down [FF, D]
    qwen2:  llama layout + attn_q.bias [Hq*hd], attn_k.bias / attn_v.bias [Hkv*hd]; tied head
    qwen3:  llama layout + attn_q_norm / attn_k_norm [hd], Hq*hd != D; untied head
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tests.qwen35_models import QWEN_CHATML, _Rand, qwen_vocab

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class ArchConfig:
    arch: str
    d_model: int = 256
    n_layer: int = 2
    n_ff: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    rope_base: float = 10000.0
    eps: float = 1e-5
    n_ctx_train: int = 4096
    tied: bool = False
    embd_scale: float = 0.5        # std of token_embd entries
    output_norm_mean: float = 0.6  # small: logits of std ~0.6 (see tools/make_arch_fixtures.py)
    fused_qkv: bool = True         # phi3 only
    n_ctx_orig: int = 0            # phi3: rope.scaling.original_context_length (0 = not written)
    attn_factor: float = 0.0       # phi3: rope.scaling.attn_factor (0 = not written)


CONFIGS = {
    # Phi-3.5-mini's layout: MHA there, GQA here (llama.cpp takes both); long context with
    # original context 4096 and the attention factor sqrt(1 + ln(32)/ln(4096)).
    "phi3": ArchConfig("phi3", n_ctx_train=131072, n_ctx_orig=4096,
                       attn_factor=float(np.sqrt(1 + np.log(32) / np.log(4096)))),
    "qwen2": ArchConfig("qwen2", rope_base=1000000.0, eps=1e-6, tied=True, embd_scale=0.0625),
    "qwen3": ArchConfig("qwen3", head_dim=128, rope_base=1000000.0, eps=1e-6),
}


def spm_vocab():
    """A small SentencePiece vocabulary as llama.cpp's `llama` tokenizer model reads it."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    pieces = ["\u2581", "e", "t", "a", "o", "i", "n", "s", "h", "r", "d", "l", "u", "c", "m", "w", "y",
              "f", "g", "p", "b", "v", "k", ".", ",", "\n",
              "\u2581t", "he", "\u2581a", "in", "er", "on", "\u2581the", "\u2581s", "\u2581w", "re", "an",
              "\u2581o", "is", "at", "en", "or", "\u2581c", "\u2581b", "es", "it", "ing", "\u2581in",
              "\u2581f", "\u2581m", "ar", "\u2581p", "ou", "ll", "\u2581h", "\u2581d", "\u2581wind", "\u2581sea"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    specials = [("<|endoftext|>", 3), ("<|assistant|>", 4), ("<|end|>", 4), ("<|system|>", 4), ("<|user|>", 4)]
    for text, ty in specials:
        tokens.append(text)
        types.append(ty)
        scores.append(0.0)
    return tokens, types, scores


def vocab(cfg: ArchConfig):
    if cfg.arch == "phi3":
        return spm_vocab()
    tokens, types, merges = qwen_vocab()
    return tokens, types, merges


def tensor_plan(cfg: ArchConfig, n_vocab: int):
    """[(name, numpy shape, kind, params)] in file order; kind "mat" (2-D) or "vec" (F32 1-D)."""
    D, FF, hd = cfg.d_model, cfg.n_ff, cfg.head_dim
    qd, kd = cfg.n_head * hd, cfg.n_head_kv * hd
    s = lambda n: dict(std=1.0 / np.sqrt(n))  # noqa: E731
    norm = dict(std=0.1, mean=1.0)
    plan = [("token_embd.weight", (n_vocab, D), "mat", dict(std=cfg.embd_scale))]
    if cfg.arch == "phi3":
        half = hd // 2
        plan += [("rope_factors_long.weight", (half,), "vec", dict(std=4.0, mean=5.0)),
                 ("rope_factors_short.weight", (half,), "vec", dict(std=0.05, mean=1.05))]
    plan.append(("output_norm.weight", (D,), "vec", dict(std=0.1 * cfg.output_norm_mean, mean=cfg.output_norm_mean)))
    if not cfg.tied:
        plan.append(("output.weight", (n_vocab, D), "mat", s(D)))
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (D,), "vec", norm))
        if cfg.arch == "phi3" and cfg.fused_qkv:
            plan.append((p + "attn_qkv.weight", (qd + 2 * kd, D), "mat", s(D)))
        else:
            plan += [(p + "attn_q.weight", (qd, D), "mat", s(D)),
                     (p + "attn_k.weight", (kd, D), "mat", s(D)),
                     (p + "attn_v.weight", (kd, D), "mat", s(D))]
        if cfg.arch == "qwen2":
            plan += [(p + "attn_q.bias", (qd,), "vec", dict(std=0.5)),
                     (p + "attn_k.bias", (kd,), "vec", dict(std=0.5)),
                     (p + "attn_v.bias", (kd,), "vec", dict(std=0.2))]
        if cfg.arch == "qwen3":
            plan += [(p + "attn_q_norm.weight", (hd,), "vec", norm),
                     (p + "attn_k_norm.weight", (hd,), "vec", norm)]
        plan += [(p + "attn_output.weight", (D, qd), "mat", s(qd)),
                 (p + "ffn_norm.weight", (D,), "vec", norm)]
        if cfg.arch == "phi3":
            plan.append((p + "ffn_up.weight", (2 * FF, D), "mat", s(D)))
        else:
            plan += [(p + "ffn_gate.weight", (FF, D), "mat", s(D)),
                     (p + "ffn_up.weight", (FF, D), "mat", s(D))]
        plan.append((p + "ffn_down.weight", (D, FF), "mat", s(FF)))
    return plan


def _generate(cfg: ArchConfig, n_vocab: int, seed: int) -> dict:
    """name -> float32 array, drawn in the order of the fused layout (so the separate-q/k/v phi3
    file holds exactly the fused file's rows)."""
    rnd = _Rand(seed)
    fused = ArchConfig(**{**asdict(cfg), "fused_qkv": True}) if cfg.arch == "phi3" else cfg
    arrays = {name: rnd.uniform(shape, **prm) for name, shape, _, prm in tensor_plan(fused, n_vocab)}
    if cfg.arch == "phi3" and not cfg.fused_qkv:
        qd, kd = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        for i in range(cfg.n_layer):
            p = f"blk.{i}."
            w = arrays.pop(p + "attn_qkv.weight")
            arrays[p + "attn_q.weight"], arrays[p + "attn_k.weight"], arrays[p + "attn_v.weight"] = \
                w[:qd], w[qd : qd + kd], w[qd + kd :]
    return arrays


def write_arch(path: str | Path, cfg: ArchConfig, *, seed: int = 0) -> Path:
    """Write the F32 file (every tensor F32; llama.cpp's quantizer makes the quantized ones)."""
    import gguf

    path = Path(path)
    tokens, types, extra = vocab(cfg)
    V = len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    a = cfg.arch
    w = gguf.GGUFWriter(str(path), a)
    w.add_name(f"deltatalk tiny {a}")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    if cfg.arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.n_ctx_orig:
        w.add_uint32(f"{a}.rope.scaling.original_context_length", cfg.n_ctx_orig)
    if cfg.attn_factor:
        w.add_float32(f"{a}.rope.scaling.attn_factor", cfg.attn_factor)
    if cfg.arch == "phi3":
        w.add_uint32(f"{a}.attention.sliding_window", 262144)  # ignored by llama.cpp, as in Phi-3.5
    w.add_file_type(0)
    if cfg.arch == "phi3":
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(extra)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(ids["<|endoftext|>"])
        w.add_uint32("tokenizer.ggml.eot_token_id", ids["<|end|>"])
        w.add_unk_token_id(0)
        w.add_pad_token_id(ids["<|endoftext|>"])
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_chat_template(PHI3_TEMPLATE)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(extra)
        w.add_bos_token_id(ids["<|endoftext|>"])
        w.add_eos_token_id(ids["<|im_end|>"])
        w.add_pad_token_id(ids["<|endoftext|>"])
        w.add_add_bos_token(False)
        w.add_chat_template(QWEN_CHATML)
    arrays = _generate(cfg, V, seed)
    order = [n for n, *_ in tensor_plan(cfg, V)]
    for name in order:
        w.add_tensor(name, np.ascontiguousarray(arrays[name], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def weights_digest(path: str | Path) -> str:
    """sha256 over (name, type, shape, bytes) of every tensor."""
    import gguf

    r = gguf.GGUFReader(str(path))
    h = hashlib.sha256()
    for t in sorted(r.tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{int(t.tensor_type)}:{list(map(int, t.shape))}".encode())
        h.update(np.ascontiguousarray(t.data).tobytes())
    return h.hexdigest()


def config_dict(cfg: ArchConfig) -> dict:
    return asdict(cfg)
