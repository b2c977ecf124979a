"""Tiny `qwen35` GGUF files in llama.cpp's exact layout, with deterministic random weights.

Used by `tools/make_qwen35_fixtures.py` (which also runs llama.cpp on them) and by the
tests. The weights come from PCG64's raw 64-bit stream turned into uniform floats with
exact arithmetic only, so the same file is written bit for bit by any numpy version;
`weights_digest()` hashes the tensor data so a test can check that it is running on
the weights the committed llama.cpp reference outputs were made from.

Layout (see docs/models.md, qwen35), GGUF ne order = [in, out],
numpy arrays are (out, in):

    token_embd.weight        [D, V]            output_norm.weight [D]   (output.weight [D, V] if untied)
    DeltaNet layer:  attn_norm [D], attn_qkv [D, 2*Hk*dk + Hv*dv], attn_gate [D, Hv*dv],
                     ssm_beta [D, Hv], ssm_alpha [D, Hv], ssm_dt.bias [Hv], ssm_a [Hv],
                     ssm_conv1d [K, conv_dim], ssm_norm [dv], ssm_out [Hv*dv, D]
    attention layer: attn_norm [D], attn_q [D, Hq*hd*2] (q/gate interleaved per head),
                     attn_k [D, Hkv*hd], attn_v [D, Hkv*hd], attn_output [Hq*hd, D],
                     attn_q_norm [hd], attn_k_norm [hd]
    both:            post_attention_norm [D], ffn_gate/ffn_up [D, FF], ffn_down [FF, D]
    MTP block (index n_layer, only when nextn > 0): attention-layer tensors + nextn.eh_proj
                     [2D, D], nextn.enorm [D], nextn.hnorm [D], nextn.shared_head_norm [D]
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Qwen-style ChatML with the enable_thinking switch of the Qwen3.5 template.
QWEN_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}"
    "{{- '<think>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

QWEN_SPECIALS = [  # (text, ggml token type): 3 = CONTROL, 4 = USER_DEFINED
    ("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4),
]

# A small merge list (byte-level BPE, GPT-2 byte->unicode alphabet; 'Ġ' is the space).
MERGES = [
    "Ġ t", "h e", "i n", "e r", "a n", "o n", "Ġ a", "Ġ s", "Ġ w", "r e", "Ġt he", "Ġ o",
    "i s", "a t", "e n", "o r", "Ġ c", "Ġ b", "e s", "i t", "in g", "Ġ in", "Ġ f", "Ġ m",
    "a r", "Ġ p", "o u", "l l", "Ġ h", "Ġ d",
]


@dataclass(frozen=True)
class Qwen35Config:
    d_model: int = 256
    n_layer: int = 4               # trunk layers (block_count = n_layer + nextn)
    n_ff: int = 256
    n_head: int = 2                # Hq
    n_head_kv: int = 1             # Hkv
    head_dim: int = 128            # hd
    n_rot: int = 32                # rope.dimension_count (hd * 0.25)
    rope_sections: tuple = (6, 6, 4, 0)
    rope_base: float = 1.0e7
    ssm_d_state: int = 64          # dk (= dv)
    ssm_n_group: int = 2           # Hk
    ssm_dt_rank: int = 4           # Hv
    ssm_conv_kernel: int = 4       # K
    full_attention_interval: int = 4
    write_recurrent_layers: bool = True
    nextn: int = 0                 # MTP blocks appended after the trunk (never run)
    tied: bool = True
    eps: float = 1e-6
    n_ctx_train: int = 4096
    embd_scale: float = 0.2        # std of token_embd entries (sets the logit spread when tied)
    output_norm_mean: float = 1.0  # scales the logits (a random model's flat logits, see the fixtures script)
    extra_vocab: int = 0           # plain extra tokens "<unused_i>" (for a bigger vocabulary)
    tokens: tuple = field(default=(), compare=False)

    @property
    def d_inner(self) -> int:
        return self.ssm_d_state * self.ssm_dt_rank

    @property
    def conv_dim(self) -> int:
        return 2 * self.ssm_n_group * self.ssm_d_state + self.d_inner

    def is_recurrent(self, i: int) -> bool:
        return (i + 1) % self.full_attention_interval != 0


# The Qwen3.5-4B widths (the benchmark file uses them with fewer layers).
QWEN35_4B = Qwen35Config(d_model=2560, n_layer=8, n_ff=9216, n_head=16, n_head_kv=4, head_dim=256, n_rot=64,
                         rope_sections=(11, 11, 10, 0), ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32,
                         n_ctx_train=262144, embd_scale=0.02)
QWEN35_4B_VOCAB = 248320


def byte_tokens() -> list[str]:
    """The 256 GPT-2 byte-level tokens, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def qwen_vocab(extra: int = 0, n_vocab: int | None = None):
    """tokens, token types, merges: bytes, merged tokens, padding, then the Qwen control tokens.

    With n_vocab, plain "<unused_i>" tokens fill the vocabulary up to that size (specials last,
    as in the real Qwen vocabulary where they sit at 248044+).
    """
    tokens = byte_tokens()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    assert len(set(tokens)) == len(tokens)
    types = [1] * len(tokens)
    if n_vocab is not None:
        extra = n_vocab - len(tokens) - len(QWEN_SPECIALS)
    for i in range(extra):
        tokens.append(f"<unused_{i}>")
        types.append(4)
    for text, ty in QWEN_SPECIALS:
        tokens.append(text)
        types.append(ty)
    return tokens, types, list(MERGES)


class _Rand:
    """Uniform floats from PCG64's raw stream with exact arithmetic (numpy-version proof)."""

    def __init__(self, seed: int):
        self.bits = np.random.PCG64(seed)

    def uniform(self, shape, std: float, mean: float = 0.0) -> np.ndarray:
        n = int(np.prod(shape))
        out = np.empty(n, dtype=np.float32)
        a = np.float64(std * np.sqrt(3.0))
        step = 1 << 22
        for s in range(0, n, step):
            m = min(step, n - s)
            raw = self.bits.random_raw(m)
            u = (raw >> np.uint64(40)).astype(np.float64) * (2.0 ** -24)  # exact, in [0, 1)
            out[s : s + m] = (u * 2.0 - 1.0) * a + mean
        return out.reshape(shape)


def tensor_plan(cfg: Qwen35Config, n_vocab: int):
    """[(name, numpy shape (out, in) / (n,), kind, params)] in file order.

    kind: "mat" (2-D weight, may be quantized), "vec" (1-D float32), "conv" (conv taps, float32).
    """
    D, FF = cfg.d_model, cfg.n_ff
    Hq, Hkv, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    Hk, Hv, dk = cfg.ssm_n_group, cfg.ssm_dt_rank, cfg.ssm_d_state
    plan = [("token_embd.weight", (n_vocab, D), "mat", dict(std=cfg.embd_scale)),
            ("output_norm.weight", (D,), "vec", dict(std=0.1 * cfg.output_norm_mean, mean=cfg.output_norm_mean))]
    if not cfg.tied:
        plan.append(("output.weight", (n_vocab, D), "mat", dict(std=1.0 / np.sqrt(D))))

    def attn(p):
        return [
            (p + "attn_q.weight", (Hq * hd * 2, D), "mat", dict(std=1.0 / np.sqrt(D))),
            (p + "attn_k.weight", (Hkv * hd, D), "mat", dict(std=1.0 / np.sqrt(D))),
            (p + "attn_v.weight", (Hkv * hd, D), "mat", dict(std=1.0 / np.sqrt(D))),
            (p + "attn_output.weight", (D, Hq * hd), "mat", dict(std=1.0 / np.sqrt(Hq * hd))),
            (p + "attn_q_norm.weight", (hd,), "vec", dict(std=0.1, mean=1.0)),
            (p + "attn_k_norm.weight", (hd,), "vec", dict(std=0.1, mean=1.0)),
        ]

    def ffn(p):
        return [
            (p + "post_attention_norm.weight", (D,), "vec", dict(std=0.1, mean=1.0)),
            (p + "ffn_gate.weight", (FF, D), "mat", dict(std=1.0 / np.sqrt(D))),
            (p + "ffn_up.weight", (FF, D), "mat", dict(std=1.0 / np.sqrt(D))),
            (p + "ffn_down.weight", (D, FF), "mat", dict(std=1.0 / np.sqrt(FF))),
        ]

    for i in range(cfg.n_layer + cfg.nextn):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (D,), "vec", dict(std=0.1, mean=1.0)))
        if i < cfg.n_layer and cfg.is_recurrent(i):
            plan += [
                (p + "attn_qkv.weight", (cfg.conv_dim, D), "mat", dict(std=1.0 / np.sqrt(D))),
                (p + "attn_gate.weight", (cfg.d_inner, D), "mat", dict(std=1.0 / np.sqrt(D))),
                (p + "ssm_beta.weight", (Hv, D), "mat", dict(std=1.0 / np.sqrt(D))),
                (p + "ssm_alpha.weight", (Hv, D), "mat", dict(std=1.0 / np.sqrt(D))),
                (p + "ssm_dt.bias", (Hv,), "vec", dict(std=0.5, mean=-2.0)),
                (p + "ssm_a", (Hv,), "vec", dict(std=2.0, mean=-4.0)),        # -exp(A_log) < 0
                (p + "ssm_conv1d.weight", (cfg.conv_dim, cfg.ssm_conv_kernel), "conv", dict(std=0.5)),
                (p + "ssm_norm.weight", (dk,), "vec", dict(std=0.1, mean=1.0)),
                (p + "ssm_out.weight", (D, cfg.d_inner), "mat", dict(std=1.0 / np.sqrt(cfg.d_inner))),
            ]
        else:
            plan += attn(p)
        if i >= cfg.n_layer:  # MTP block
            plan += [
                (p + "nextn.eh_proj.weight", (D, 2 * D), "mat", dict(std=1.0 / np.sqrt(2 * D))),
                (p + "nextn.enorm.weight", (D,), "vec", dict(std=0.1, mean=1.0)),
                (p + "nextn.hnorm.weight", (D,), "vec", dict(std=0.1, mean=1.0)),
                (p + "nextn.shared_head_norm.weight", (D,), "vec", dict(std=0.1, mean=1.0)),
            ]
        plan += ffn(p)
    return plan


def write_qwen35(path: str | Path, cfg: Qwen35Config = Qwen35Config(), *, seed: int = 0, n_vocab: int | None = None,
                 mat_dtype: str = "f32", quiet: bool = True) -> Path:
    """Write a qwen35 GGUF with every 2-D weight in F32 (mat_dtype="f32") or F16 ("f16").

    Tensors are generated one at a time and streamed to the file (the 4B-shaped file is
    several GB before quantization). Quantized variants are made from this file by
    llama.cpp's own quantizer (tools/make_qwen35_fixtures.py).

    mat_dtype="q4_k_random": every 2-D weight as random but valid Q4_K blocks (small finite
    scales). No llama.cpp needed: for load, memory and speed tests at true 4B widths,
    where the values do not matter.
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    path = Path(path)
    tokens, types, merges = qwen_vocab(cfg.extra_vocab, n_vocab)
    V = len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    w = gguf.GGUFWriter(str(path), "qwen35")
    a = "qwen35"
    w.add_name("deltatalk tiny qwen35")
    w.add_block_count(cfg.n_layer + cfg.nextn)
    if cfg.nextn:
        w.add_nextn_predict_layers(cfg.nextn)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_rope_dimension_count(cfg.n_rot)
    w.add_rope_dimension_sections(list(cfg.rope_sections))
    w.add_full_attention_interval(cfg.full_attention_interval)
    if cfg.write_recurrent_layers:
        flags = [cfg.is_recurrent(i) if i < cfg.n_layer else False for i in range(cfg.n_layer + cfg.nextn)]
        w.add_array(f"{a}.attention.recurrent_layers", flags)
    w.add_ssm_conv_kernel(cfg.ssm_conv_kernel)
    w.add_ssm_state_size(cfg.ssm_d_state)
    w.add_ssm_group_count(cfg.ssm_n_group)
    w.add_ssm_time_step_rank(cfg.ssm_dt_rank)
    w.add_ssm_inner_size(cfg.d_inner)
    w.add_file_type({"f32": 0, "f16": 1, "q4_k_random": 15}[mat_dtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(QWEN_CHATML)

    rnd = _Rand(seed)
    plan = tensor_plan(cfg, V)
    q4k_rows = lambda shape: (int(np.prod(shape[:-1])), shape[-1] // 256 * 144)  # noqa: E731
    for name, shape, kind, _ in plan:
        if kind == "mat" and mat_dtype == "q4_k_random":
            rows = q4k_rows(shape)
            w.add_tensor_info(name, rows, np.dtype(np.uint8), rows[0] * rows[1], raw_dtype=T.Q4_K)
        elif kind == "mat" and mat_dtype == "f16":
            w.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2, raw_dtype=T.F16)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4, raw_dtype=T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    gen = np.random.default_rng(seed)
    for name, shape, kind, prm in plan:
        if kind == "mat" and mat_dtype == "q4_k_random":
            blocks = gen.integers(0, 256, size=q4k_rows(shape), dtype=np.uint8)
            view = blocks.reshape(blocks.shape[0], -1, 144)
            d = (gen.random(view.shape[:2]) * 1e-3).astype(np.float16)  # d and dmin: small and finite
            view[:, :, 0:2] = d.view(np.uint8).reshape(view.shape[:2] + (2,))
            view[:, :, 2:4] = d.view(np.uint8).reshape(view.shape[:2] + (2,))
            w.write_tensor_data(blocks)
            continue
        arr = rnd.uniform(shape, **prm)
        if kind == "mat" and mat_dtype == "f16":
            arr = arr.astype(np.float16)
        w.write_tensor_data(arr)
        if not quiet:
            print(f"  wrote {name} {shape}", flush=True)
    w.close()
    return path


def weights_digest(path: str | Path) -> str:
    """sha256 over (name, type, shape, bytes) of every tensor: what the logits depend on."""
    import gguf

    r = gguf.GGUFReader(str(path))
    h = hashlib.sha256()
    for t in sorted(r.tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{int(t.tensor_type)}:{list(map(int, t.shape))}".encode())
        h.update(np.ascontiguousarray(t.data).tobytes())
    return h.hexdigest()


def config_dict(cfg: Qwen35Config) -> dict:
    d = asdict(cfg)
    d.pop("tokens", None)
    d["rope_sections"] = list(cfg.rope_sections)
    return d
