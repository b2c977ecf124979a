"""Dense decoder-only transformers that differ from `llama` only in small ways, as llama.cpp runs them.

One forward pass covers `phi3`, `qwen2`, `qwen3` and `gemma3`; each architecture module
subclasses `DenseModel` and sets a few switches (see `DenseModel`'s class attributes):

    x = embed(tokens) [* sqrt(D) for gemma3]                        (T, D)
    for each layer:
        n = RMSNorm(x) * attn_norm
        q, k, v = W_qkv n split [Q | K | V]   or   W_q n, W_k n, W_v n  (+ biases when present)
        q, k = RMSNorm(q) * q_norm, RMSNorm(k) * k_norm             per head (qwen3, gemma3)
        q, k = RoPE_neox(q, k)                                       pairs (i, i + n_rot/2)
        att = softmax(q k^T * scale + causal [+ sliding window]) v   K, V and q at fp16 precision
        a = W_o att [; RMSNorm(a) * post_attention_norm for gemma3]
        x += a
        m = RMSNorm(x) * ffn_norm
        f = W_down(act(W_gate m) * W_up m)     act = silu, or gelu-tanh (gemma3);
                                               phi3: [gate | up] = W_up m (fused)
        [f = RMSNorm(f) * post_ffw_norm for gemma3]
        x += f
    logits = W_out RMSNorm(x) * output_norm                          only the positions asked for

Attention follows llama.cpp without flash attention (llama-cpp-python's default, which is what
the fixtures were made with): q, K and V rounded to fp16, softmax in float32 with the
probabilities rounded to fp16 before P V (ops.attention_nofa).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine import ops
from engine.cache import KVCache
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.quants.linear import LinearGroup, QuantLinear, get_format
from engine.quants.common import F16_TO_F32


def tensor(gf: GGUFFile, name: str, shape: tuple):
    t = gf.tensors.get(name)
    if t is None:
        raise ModelFileError(gf.path, f"tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape):
        raise ModelFileError(gf.path, f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def linear(gf: GGUFFile, name: str, n_in: int, n_out: int) -> QuantLinear:
    t = tensor(gf, name, (n_in, n_out))
    return QuantLinear(gf.tensor_bytes(name), t.ggml_type, n_in, n_out, name=name)


def vector(gf: GGUFFile, name: str, n: int) -> np.ndarray:
    tensor(gf, name, (n,))
    v = np.ascontiguousarray(gf.tensor_float(name), dtype=np.float32)
    return v


def optional_vector(gf: GGUFFile, name: str, n: int):
    return vector(gf, name, n) if name in gf.tensors else None


@dataclass(frozen=True)
class Args:
    n_layer: int
    d_model: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_base: float
    rope_freq_scale: float
    norm_eps: float
    n_vocab: int
    n_ctx_train: int
    n_ctx_orig: int            # rope.scaling.original_context_length (phi3 long/short factors)
    rope_attn_factor: float    # rope.scaling.attn_factor (multiplies cos and sin)
    sliding_window: int = 0    # gemma3: keys within this many positions (0 = none)
    swa_layers: tuple = field(default=())   # per layer: True = sliding-window layer
    rope_base_swa: float = 0.0  # gemma3: RoPE base of the sliding-window layers

    @classmethod
    def from_gguf(cls, gf: GGUFFile, arch: str) -> Args:
        def key(name, kind=int, default=None):
            full = f"{arch}.{name}"
            if default is None:
                return gf.require(full, kind)
            return gf.get(full, default, kind=kind)

        def bad(problem):
            raise ModelFileError(gf.path, problem)

        d_model = key("embedding_length")
        n_head = key("attention.head_count")
        if not isinstance(n_head, int):
            bad(f"{arch}.attention.head_count must be one number (per-layer head counts are not supported)")
        head_dim = key("attention.key_length", default=d_model // max(n_head, 1))
        if key("attention.value_length", default=head_dim) != head_dim:
            bad("attention.value_length differs from key_length (not supported)")
        scaling = gf.get(f"{arch}.rope.scaling.type", "none", kind=str)
        freq_scale = 1.0
        if scaling == "linear":
            factor = float(gf.get(f"{arch}.rope.scaling.factor", 1.0, kind=(int, float)))
            if not factor > 0:
                bad(f"rope.scaling.factor {factor} is not positive")
            freq_scale = 1.0 / factor
        elif scaling not in ("none", ""):
            raise ModelFileError(gf.path, f"rope scaling {scaling!r} is not supported", "none, linear")
        tok = gf.tensors.get("token_embd.weight")
        if tok is None:
            bad("tensor 'token_embd.weight' is missing")
        if len(tok.shape) != 2:
            bad(f"tensor 'token_embd.weight' has shape {list(tok.shape)}, expected 2 dimensions")
        n_ctx_train = key("context_length", default=2048)
        args = cls(
            n_layer=key("block_count"), d_model=d_model, n_ff=key("feed_forward_length"),
            n_head=n_head, n_head_kv=key("attention.head_count_kv", default=n_head), head_dim=head_dim,
            n_rot=key("rope.dimension_count", default=head_dim),
            rope_base=float(key("rope.freq_base", (int, float), default=10000.0)),
            rope_freq_scale=float(freq_scale),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", (int, float), default=1e-5)),
            n_vocab=tok.shape[1], n_ctx_train=n_ctx_train,
            n_ctx_orig=key("rope.scaling.original_context_length", default=n_ctx_train),
            rope_attn_factor=float(key("rope.scaling.attn_factor", (int, float), default=1.0)),
        )
        if min(args.n_layer, args.d_model, args.n_ff, args.n_head, args.n_head_kv, args.head_dim,
               args.n_ctx_train, args.n_vocab, args.n_ctx_orig) <= 0:
            bad(f"invalid hyperparameters {args}")
        if not np.isfinite(args.rope_base) or args.rope_base <= 0 or not 0 < args.norm_eps < 1:
            bad(f"invalid rope base / norm eps {args}")
        if not np.isfinite(args.rope_attn_factor) or not 0 < args.rope_attn_factor < 100:
            bad(f"invalid rope.scaling.attn_factor {args.rope_attn_factor}")
        if args.n_head % args.n_head_kv or args.n_rot > args.head_dim or args.n_rot % 2 or args.n_rot <= 0:
            bad(f"inconsistent attention shape {args}")
        if args.n_layer > 4096 or args.head_dim > 4096:
            bad(f"implausible sizes {args}")
        return args


class DenseLayer:
    def __init__(self, gf: GGUFFile, a: Args, i: int, m: type[DenseModel]):
        p = f"blk.{i}."
        D, hd = a.d_model, a.head_dim
        self.q_dim, self.kv_dim = a.n_head * hd, a.n_head_kv * hd
        self.attn_norm = vector(gf, p + "attn_norm.weight", D)
        if m.fused_qkv_ok and p + "attn_qkv.weight" in gf.tensors:  # rows [Q | K | V]
            self.w_qkv = linear(gf, p + "attn_qkv.weight", D, self.q_dim + 2 * self.kv_dim)
            self.wq = self.wk = self.wv = None
        else:
            self.w_qkv = None
            self.wq = linear(gf, p + "attn_q.weight", D, self.q_dim)
            self.wk = linear(gf, p + "attn_k.weight", D, self.kv_dim)
            self.wv = linear(gf, p + "attn_v.weight", D, self.kv_dim)
        # separate q/k/v (or gate/up) read one input: quantized once, fused launches
        self.qkv_group = LinearGroup([self.wq, self.wk, self.wv]) if self.w_qkv is None else None
        self.bq = self.bk = self.bv = self.bqkv = None
        if m.qkv_bias != "none":
            get = vector if m.qkv_bias == "required" else optional_vector
            if self.w_qkv is not None:
                self.bqkv = optional_vector(gf, p + "attn_qkv.bias", self.q_dim + 2 * self.kv_dim)
            else:
                self.bq = get(gf, p + "attn_q.bias", self.q_dim)
                self.bk = get(gf, p + "attn_k.bias", self.kv_dim)
                self.bv = get(gf, p + "attn_v.bias", self.kv_dim)
        self.q_norm = self.k_norm = None
        if m.qk_norm:
            self.q_norm = vector(gf, p + "attn_q_norm.weight", hd)
            self.k_norm = vector(gf, p + "attn_k_norm.weight", hd)
        self.wo = linear(gf, p + "attn_output.weight", self.q_dim, D)
        self.post_attn_norm = vector(gf, p + "post_attention_norm.weight", D) if m.post_norms else None
        self.ffn_norm = vector(gf, p + "ffn_norm.weight", D)
        if m.fused_gate_up:  # phi3: ffn_up rows [gate | up]
            self.w_gate_up = linear(gf, p + "ffn_up.weight", D, 2 * a.n_ff)
            self.w_gate = self.w_up = None
        else:
            self.w_gate_up = None
            self.w_gate = linear(gf, p + "ffn_gate.weight", D, a.n_ff)
            self.w_up = linear(gf, p + "ffn_up.weight", D, a.n_ff)
        self.gate_up_group = LinearGroup([self.w_gate, self.w_up]) if self.w_gate_up is None else None
        self.w_down = linear(gf, p + "ffn_down.weight", a.n_ff, D)
        self.post_ffw_norm = vector(gf, p + "post_ffw_norm.weight", D) if m.post_norms else None


class DenseModel:
    arch = "?"
    fused_qkv_ok = False      # accept blk.N.attn_qkv.weight (rows Q | K | V)
    fused_gate_up = False     # ffn_up holds [gate | up] and there is no ffn_gate (phi3)
    qkv_bias = "none"         # "none" | "optional" | "required"
    qk_norm = False           # per-head RMSNorm of q and k before RoPE
    post_norms = False        # gemma3: RMSNorm after attention and after the FFN
    embd_scale = False        # gemma3: embeddings * sqrt(D)
    activation = "silu"       # or "gelu" (gemma3, tanh approximation)
    q_prescale = False        # scale q before attention (kq_scale 1), as phi3/gemma3 graphs do
    rope_factors = False      # phi3: rope_factors_long/short.weight

    def __init__(self, gf: GGUFFile, n_ctx: int | None = None):
        a = self.args = self.read_args(gf)
        self.n_ctx = int(n_ctx or min(a.n_ctx_train, 8192))
        if self.n_ctx <= 0:
            raise ModelFileError(gf.path, f"invalid context size {self.n_ctx}")
        D = a.d_model
        emb = tensor(gf, "token_embd.weight", (D, a.n_vocab))
        self.token_embd = gf.tensor_bytes("token_embd.weight")  # (V, row_bytes) blocks
        self.embd_format = get_format(emb.ggml_type)
        self.layers = [DenseLayer(gf, a, i, type(self)) for i in range(a.n_layer)]
        self.output_norm = vector(gf, "output_norm.weight", D)
        if "output.weight" in gf.tensors:
            self.output = linear(gf, "output.weight", D, a.n_vocab)
        else:  # tied head: the embedding matrix, still quantized
            self.output = QuantLinear(self.token_embd, emb.ggml_type, D, a.n_vocab, name="token_embd.weight")
        self.output_bias = optional_vector(gf, "output.bias", a.n_vocab)
        self.rope = self.rope_tables(gf)  # per layer: a RopeTable (shared where equal)
        self.weight_bytes = sum(t.nbytes for t in gf.tensors.values())

    # ---- per-architecture hooks
    def read_args(self, gf: GGUFFile) -> Args:
        return Args.from_gguf(gf, self.arch)

    def rope_factors_for(self, gf: GGUFFile):
        """Frequency divisors (n_rot/2,) or None. phi3: long when n_ctx > original context, else short."""
        a = self.args
        if "rope_freqs.weight" in gf.tensors:
            return vector(gf, "rope_freqs.weight", a.n_rot // 2)
        if not self.rope_factors:
            return None
        present = {n: optional_vector(gf, n, a.n_rot // 2)  # both validated, one used
                   for n in ("rope_factors_long.weight", "rope_factors_short.weight")}
        return present["rope_factors_long.weight" if self.n_ctx > a.n_ctx_orig else "rope_factors_short.weight"]

    def rope_tables(self, gf: GGUFFile) -> list:
        a = self.args
        ff = self.rope_factors_for(gf)
        self.rope_freq_factors = ff
        table = ops.RopeTable(self.n_ctx, a.n_rot, a.rope_base, ff, a.rope_freq_scale, a.rope_attn_factor)
        return [table] * a.n_layer

    def window(self, i: int) -> int:
        return 0

    # ---- running
    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    def make_cache(self) -> list[KVCache]:
        a = self.args
        return [KVCache(self.n_ctx, a.n_head_kv, a.head_dim) for _ in range(a.n_layer)]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(self.embd_format.dequantize(self.token_embd[tokens]), dtype=np.float32)
        if self.embd_scale:
            x *= np.float32(np.sqrt(np.float32(self.args.d_model)))
        return x

    def _ffn_act(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        if self.activation == "gelu":
            ops.geglu(g, u, g)
        else:
            ops.swiglu(g, u, g)
        return g

    def forward(self, tokens, cache: list, logits: str = "last",
                token_exact: bool = False) -> np.ndarray | None:
        """Feed tokens (T,) at the cache's current position; return logits (n, V) or None.

        logits: "last" (the last position only), "all" (every position) or "none".
        token_exact: each row's logits bit-identical to feeding the tokens one at a time
        (decode's row kernels instead of the GEMM; speculative verification).
        """
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if T == 0:
            raise ValueError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= a.n_vocab:
            raise ValueError(f"token id out of range 0..{a.n_vocab - 1}")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', not {logits!r}")
        if len(cache) != a.n_layer:
            raise ValueError(f"cache has {len(cache)} layers, the model {a.n_layer}")
        p0 = cache[0].offset
        if p0 + T > self.n_ctx:
            raise ValueError(f"context full: {p0} + {T} tokens > {self.n_ctx}")

        H, Hkv, hd = a.n_head, a.n_head_kv, a.head_dim
        eps = a.norm_eps
        scale = np.float32(self.attention_scale())
        x = self.embed(tokens)  # (T, D)
        n = np.empty_like(x)
        att = np.empty((T, H, hd), dtype=np.float32)
        for i, (layer, kv) in enumerate(zip(self.layers, cache)):
            if kv.offset != p0:
                raise ValueError("cache layers are at different positions")
            ops.rmsnorm(x, layer.attn_norm, eps, n)
            if layer.w_qkv is not None:
                qkv = layer.w_qkv.matmul(n, token_exact=token_exact)
                if layer.bqkv is not None:
                    qkv += layer.bqkv
                qd, kd = layer.q_dim, layer.kv_dim
                q, k, v = qkv[:, :qd], qkv[:, qd : qd + kd], qkv[:, qd + kd :]
            else:
                q, k, v = layer.qkv_group.matmul(n, token_exact=token_exact)
                if layer.bq is not None:
                    q += layer.bq
                if layer.bk is not None:
                    k += layer.bk
                if layer.bv is not None:
                    v += layer.bv
            q = np.ascontiguousarray(q).reshape(T, H, hd)
            k = np.ascontiguousarray(k).reshape(T, Hkv, hd)
            v = np.ascontiguousarray(v).reshape(T, Hkv, hd)
            if layer.q_norm is not None:
                ops.rmsnorm(q.reshape(T * H, hd), layer.q_norm, eps, q.reshape(T * H, hd))
                ops.rmsnorm(k.reshape(T * Hkv, hd), layer.k_norm, eps, k.reshape(T * Hkv, hd))
            cos, sin = self.rope[i].upto(p0 + T)
            ops.rope_inplace(q, cos, sin, p0, a.n_rot, True)
            ops.rope_inplace(k, cos, sin, p0, a.n_rot, True)
            kv.write(ops.to_f16_precision(k), ops.to_f16_precision(v))
            if self.q_prescale:
                q *= scale
                s = np.float32(1.0)
            else:
                s = scale
            qh = ops.to_f16_precision(q)
            ops.attention_nofa(qh, kv.keys, kv.values, p0, s, self.window(i), att, F16_TO_F32)
            o = layer.wo.matmul(att.reshape(T, H * hd), token_exact=token_exact)
            if layer.post_attn_norm is not None:
                ops.rmsnorm(o, layer.post_attn_norm, eps, o)
            x += o

            ops.rmsnorm(x, layer.ffn_norm, eps, n)
            if layer.w_gate_up is not None:
                gu = layer.w_gate_up.matmul(n, token_exact=token_exact)
                g = np.ascontiguousarray(gu[:, : a.n_ff])
                u = np.ascontiguousarray(gu[:, a.n_ff :])
            else:
                g, u = layer.gate_up_group.matmul(n, token_exact=token_exact)
            f = layer.w_down.matmul(self._ffn_act(g, u), token_exact=token_exact)
            if layer.post_ffw_norm is not None:
                ops.rmsnorm(f, layer.post_ffw_norm, eps, f)
            x += f

        if logits == "none":
            return None
        rows = x[-1:] if logits == "last" else x
        h = np.empty_like(rows)
        ops.rmsnorm(np.ascontiguousarray(rows), self.output_norm, eps, h)
        out = self.output.matmul(h, token_exact=token_exact)
        if self.output_bias is not None:
            out += self.output_bias
        return out

    def attention_scale(self) -> float:
        return 1.0 / np.sqrt(self.args.head_dim)
