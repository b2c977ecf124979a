"""`llama` architecture (SmolLM2, Llama 2/3 style files), as llama.cpp runs it.

    x  = embed(tokens)                                          (T, D)
    for each layer:
        n  = RMSNorm(x) * attn_norm
        q, k, v = Wq n, Wk n, Wv n                              (T, Hq*hd), (T, Hkv*hd) x2
        q, k = RoPE(q), RoPE(k)        adjacent pairs (2i, 2i+1): the converter permuted rows
        x += Wo · softmax(q k^T / sqrt(hd) + causal) v          grouped-query: h -> h // (Hq/Hkv)
        m  = RMSNorm(x) * ffn_norm
        x += Wdown (silu(Wgate m) * Wup m)
    logits = Wout · RMSNorm(x) * output_norm                    only for the positions asked for
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import fused_decode, ops
from engine.cache import KVCache
from engine.errors import ModelFileError
from engine.fused_decode import FusedDecode
from engine.gguf_file import GGUFFile
from engine.quants.linear import LinearGroup, QuantLinear, get_format


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

    @classmethod
    def from_gguf(cls, gf: GGUFFile, arch: str = "llama") -> Args:
        def key(name, kind=int, default=None):
            full = f"{arch}.{name}"
            if default is None:
                return gf.require(full, kind)
            return gf.get(full, default, kind=kind)

        d_model = key("embedding_length")
        n_head = key("attention.head_count")
        head_dim = key("attention.key_length", default=d_model // max(n_head, 1))
        scaling = gf.get(f"{arch}.rope.scaling.type", "none", kind=str)
        freq_scale = 1.0
        if scaling == "linear":
            freq_scale = 1.0 / gf.get(f"{arch}.rope.scaling.factor", 1.0, kind=(int, float))
        elif scaling not in ("none", ""):
            raise ModelFileError(gf.path, f"rope scaling {scaling!r} is not supported", "none, linear")
        tok = gf.tensors.get("token_embd.weight")
        if tok is None:
            raise ModelFileError(gf.path, "tensor 'token_embd.weight' is missing")
        args = cls(
            n_layer=key("block_count"),
            d_model=d_model,
            n_ff=key("feed_forward_length"),
            n_head=n_head,
            n_head_kv=key("attention.head_count_kv", default=n_head),
            head_dim=head_dim,
            n_rot=key("rope.dimension_count", default=head_dim),
            rope_base=float(key("rope.freq_base", (int, float), default=10000.0)),
            rope_freq_scale=float(freq_scale),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", (int, float), default=1e-5)),
            n_vocab=tok.shape[1],
            n_ctx_train=key("context_length", default=2048),
        )
        if min(args.n_layer, args.d_model, args.n_ff, args.n_head, args.n_head_kv, args.head_dim,
               args.n_ctx_train) <= 0 or not np.isfinite(args.rope_base) or args.rope_base <= 0:
            raise ModelFileError(gf.path, f"invalid hyperparameters {args}")
        if args.n_head % args.n_head_kv or args.n_rot > args.head_dim or args.n_rot % 2:
            raise ModelFileError(gf.path, f"inconsistent attention shape {args}")
        return args


def _linear(gf: GGUFFile, name: str, n_in: int, n_out: int) -> QuantLinear:
    t = gf.tensors.get(name)
    if t is None:
        raise ModelFileError(gf.path, f"tensor {name!r} is missing")
    if t.shape != (n_in, n_out):
        raise ModelFileError(gf.path, f"tensor {name!r} has shape {list(t.shape)}, expected {[n_in, n_out]}")
    return QuantLinear(gf.tensor_bytes(name), t.ggml_type, n_in, n_out, name=name)


def _vector(gf: GGUFFile, name: str, n: int) -> np.ndarray:
    t = gf.tensors.get(name)
    if t is None:
        raise ModelFileError(gf.path, f"tensor {name!r} is missing")
    if t.shape != (n,):
        raise ModelFileError(gf.path, f"tensor {name!r} has shape {list(t.shape)}, expected {[n]}")
    return gf.tensor_float(name)


class Layer:
    def __init__(self, gf: GGUFFile, a: Args, i: int):
        p = f"blk.{i}."
        D, q_dim, kv_dim = a.d_model, a.n_head * a.head_dim, a.n_head_kv * a.head_dim
        self.attn_norm = _vector(gf, p + "attn_norm.weight", D)
        self.wq = _linear(gf, p + "attn_q.weight", D, q_dim)
        self.wk = _linear(gf, p + "attn_k.weight", D, kv_dim)
        self.wv = _linear(gf, p + "attn_v.weight", D, kv_dim)
        self.wo = _linear(gf, p + "attn_output.weight", q_dim, D)
        self.ffn_norm = _vector(gf, p + "ffn_norm.weight", D)
        self.w_gate = _linear(gf, p + "ffn_gate.weight", D, a.n_ff)
        self.w_up = _linear(gf, p + "ffn_up.weight", D, a.n_ff)
        self.w_down = _linear(gf, p + "ffn_down.weight", a.n_ff, D)
        # same input: quantized once, one parallel region when the formats match
        self.wqkv = LinearGroup([self.wq, self.wk, self.wv])
        self.w_gate_up = LinearGroup([self.w_gate, self.w_up])


class Model:
    arch = "llama"

    def __init__(self, gf: GGUFFile, n_ctx: int | None = None):
        a = self.args = Args.from_gguf(gf, self.arch)
        self.n_ctx = int(n_ctx or min(a.n_ctx_train, 8192))
        D = a.d_model
        emb = gf.tensors["token_embd.weight"]
        if emb.shape != (D, a.n_vocab):
            raise ModelFileError(gf.path, f"token_embd.weight has shape {list(emb.shape)}, expected {[D, a.n_vocab]}")
        self.token_embd = gf.tensor_bytes("token_embd.weight")  # (V, row_bytes) blocks
        self.embd_format = get_format(emb.ggml_type)
        self.layers = [Layer(gf, a, i) for i in range(a.n_layer)]
        self.output_norm = _vector(gf, "output_norm.weight", D)
        if "output.weight" in gf.tensors:
            self.output = _linear(gf, "output.weight", D, a.n_vocab)
        else:  # tied head: the embedding matrix, still quantized
            self.output = QuantLinear(self.token_embd, emb.ggml_type, D, a.n_vocab, name="token_embd.weight")
        freq_factors = None
        if "rope_freqs.weight" in gf.tensors:
            freq_factors = _vector(gf, "rope_freqs.weight", a.n_rot // 2)
        self.rope = ops.RopeTable(self.n_ctx, a.n_rot, a.rope_base, freq_factors, a.rope_freq_scale)
        self.weight_bytes = sum(t.nbytes for t in gf.tensors.values())
        # decode's whole token in one numba call where its kernels allow (same logits, bit for bit)
        self.fused = FusedDecode(self) if fused_decode.unsupported_reason(self) is None else None

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    def make_cache(self) -> list[KVCache]:
        a = self.args
        return [KVCache(self.n_ctx, a.n_head_kv, a.head_dim) for _ in range(a.n_layer)]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.embd_format.dequantize(self.token_embd[tokens]), dtype=np.float32)

    def forward(self, tokens, cache: list[KVCache], logits: str = "last",
                token_exact: bool = False) -> np.ndarray | None:
        """Feed tokens (T,) at the cache's current position; return logits (n, V) or None.

        logits: "last" (the last position only), "all" (every position) or "none".
        token_exact: each row's logits bit-identical to feeding the tokens one at a time
        (decode's row kernels and single-query attention; speculative verification).
        """
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if T == 0:
            raise ValueError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= a.n_vocab:
            raise ValueError(f"token id out of range 0..{a.n_vocab - 1}")
        p0 = cache[0].offset
        if p0 + T > self.n_ctx:
            raise ValueError(f"context full: {p0} + {T} tokens > {self.n_ctx}")

        if T == 1 and logits == "last" and self.fused is not None:   # decode: one compiled call
            return self.fused.step(int(tokens[0]), cache)

        H, Hkv, hd = a.n_head, a.n_head_kv, a.head_dim
        scale = np.float32(1.0 / np.sqrt(hd))
        x = self.embed(tokens)  # (T, D)
        n = np.empty_like(x)
        att = np.empty((T, H, hd), dtype=np.float32)
        cos, sin = self.rope.upto(p0 + T)
        for layer, kv in zip(self.layers, cache):
            ops.rmsnorm(x, layer.attn_norm, a.norm_eps, n)
            q, k, v = layer.wqkv.matmul(n, token_exact)
            q, k, v = q.reshape(T, H, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd)
            # RoPE, then q/k/v rounded to fp16 (llama.cpp's F16 cache); k, v appended to the cache
            ops.rope_and_store(q, k, v, cos, sin, a.n_rot, False, kv)
            if token_exact:  # decode's single-query path (fp16 accumulator), query by query
                for t in range(T):
                    ops.attend(q[t : t + 1], kv.keys, kv.values, p0 + t, scale, att[t : t + 1])
            else:
                ops.attend(q, kv.keys, kv.values, p0, scale, att)
            x += layer.wo.matmul(att.reshape(T, H * hd), token_exact=token_exact)

            ops.rmsnorm(x, layer.ffn_norm, a.norm_eps, n)
            g, u = layer.w_gate_up.matmul(n, token_exact)
            ops.swiglu(g, u, g)
            x += layer.w_down.matmul(g, token_exact=token_exact)

        if logits == "none":
            return None
        rows = x[-1:] if logits == "last" else x
        h = np.empty_like(rows)
        ops.rmsnorm(np.ascontiguousarray(rows), self.output_norm, a.norm_eps, h)
        return self.output.matmul(h, token_exact=token_exact)
