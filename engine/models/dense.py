"""The dense transformer forward pass shared by `llama`, `phi3`, `qwen2`, `qwen3` and `gemma3`.

Each architecture module subclasses `DenseModel` and declares how it differs: which tensors
it has (structure switches) and how llama.cpp computes it (numerics switches); both are
class fields listed in `DenseModel`, and docs/models.md describes each architecture.

    x = embed(tokens) [* sqrt(D): embd_scale]                       (T, D)
    for each layer:
        n = RMSNorm(x) * attn_norm
        q, k, v = W_qkv n split [Q | K | V]   or   W_q n, W_k n, W_v n  (+ biases when present)
        q, k = RMSNorm(q) * q_norm, RMSNorm(k) * k_norm             per head (qk_norm)
        q, k = RoPE(q, k)              rope_neox: pairs (i, i + n_rot/2); else adjacent (2i, 2i+1)
        att = softmax(q k^T * scale + causal [+ sliding window]) v   K, V and q at fp16 precision
        a = W_o att [; RMSNorm(a) * post_attention_norm: post_norms]
        x += a
        m = RMSNorm(x) * ffn_norm
        f = W_down(act(W_gate m) * W_up m)     act = silu, or gelu-tanh (activation = "gelu");
                                               fused_gate_up: [gate | up] = W_up m
        [f = RMSNorm(f) * post_ffw_norm: post_norms]
        x += f
    logits = W_out RMSNorm(x) * output_norm [+ output.bias]          only the positions asked for

The attention kernel (`attention_kernel`) is the numerics choice that matters most:
"attend" is llama.cpp's flash-attention path (fp16 accumulator for one query, float32 tiles
for a batch; what the SmolLM2 fixtures were made with), "attention_nofa" its path without
flash attention (llama-cpp-python's default, what the tiny fixtures were made with): q, K, V
rounded to fp16, softmax in float32 with the probabilities rounded to fp16 before P V.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from engine import ops
from engine.cache import Cache, KVCache, kv_block_caches
from engine.gguf_file import GGUFFile
from engine import fused_decode
from engine.fused_decode import FusedDecode
from engine.models.base import Args, BaseModel, RunState, linear, optional_vector, vector
from engine.quants.linear import LinearGroup, QuantLinear
from engine.quants.common import F16_TO_F32

ATTENTION_KERNELS = ("attend", "attention_nofa")


class DenseLayer:
    def __init__(self, gf: GGUFFile, a: Args, i: int, m: type[DenseModel]):
        p = f"blk.{i}."
        D, hd = a.d_model, a.head_dim
        self.q_dim, self.kv_dim = a.n_head * hd, a.n_head_kv * hd
        self.attn_norm = vector(gf, p + "attn_norm.weight", D)
        self.w_qkv: QuantLinear | None = None
        self.qkv_group: LinearGroup | None = None   # separate q/k/v read one input: quantized once
        self.wq = self.wk = self.wv = None
        if m.fused_qkv_ok and p + "attn_qkv.weight" in gf.tensors:  # rows [Q | K | V]
            self.w_qkv = linear(gf, p + "attn_qkv.weight", D, self.q_dim + 2 * self.kv_dim)
        else:
            self.wq = linear(gf, p + "attn_q.weight", D, self.q_dim)
            self.wk = linear(gf, p + "attn_k.weight", D, self.kv_dim)
            self.wv = linear(gf, p + "attn_v.weight", D, self.kv_dim)
            self.qkv_group = LinearGroup([self.wq, self.wk, self.wv])
        self.bq = self.bk = self.bv = self.bqkv = None
        if m.qkv_bias != "none":
            get = vector if m.qkv_bias == "required" else optional_vector
            if self.w_qkv is not None:
                self.bqkv = optional_vector(gf, p + "attn_qkv.bias", self.q_dim + 2 * self.kv_dim)
            else:
                self.bq = get(gf, p + "attn_q.bias", self.q_dim)
                self.bk = get(gf, p + "attn_k.bias", self.kv_dim)
                self.bv = get(gf, p + "attn_v.bias", self.kv_dim)
        self.q_norm = vector(gf, p + "attn_q_norm.weight", hd) if m.qk_norm else None
        self.k_norm = vector(gf, p + "attn_k_norm.weight", hd) if m.qk_norm else None
        self.wo = linear(gf, p + "attn_output.weight", self.q_dim, D)
        self.post_attn_norm = vector(gf, p + "post_attention_norm.weight", D) if m.post_norms else None
        self.ffn_norm = vector(gf, p + "ffn_norm.weight", D)
        self.w_gate_up: QuantLinear | None = None
        self.gate_up_group: LinearGroup | None = None
        self.w_gate = self.w_up = None
        if m.fused_gate_up:  # phi3: ffn_up rows [gate | up]
            self.w_gate_up = linear(gf, p + "ffn_up.weight", D, 2 * a.n_ff)
        else:
            self.w_gate = linear(gf, p + "ffn_gate.weight", D, a.n_ff)
            self.w_up = linear(gf, p + "ffn_up.weight", D, a.n_ff)
            self.gate_up_group = LinearGroup([self.w_gate, self.w_up])
        self.w_down = linear(gf, p + "ffn_down.weight", a.n_ff, D)
        self.post_ffw_norm = vector(gf, p + "post_ffw_norm.weight", D) if m.post_norms else None


class DenseRun(RunState):
    def __init__(self, T: int, a: Args):
        super().__init__(T)
        self.n = self.zeros(T, a.d_model)                       # normed input of a block
        self.att = self.zeros(T, a.n_head, a.head_dim)          # attention output per head
        self.o = self.zeros(T, a.d_model)                       # W_o att
        self.f = self.zeros(T, a.d_model)                       # W_down(...)


class DenseModel(BaseModel[DenseRun]):
    # structure: which tensors the layers have
    fused_qkv_ok: ClassVar[bool] = False   # accept blk.N.attn_qkv.weight (rows Q | K | V)
    fused_gate_up: ClassVar[bool] = False  # ffn_up holds [gate | up] and there is no ffn_gate (phi3)
    qkv_bias: ClassVar[str] = "none"       # "none" | "optional" | "required"
    qk_norm: ClassVar[bool] = False        # per-head RMSNorm of q and k before RoPE
    post_norms: ClassVar[bool] = False     # RMSNorm after attention and after the FFN (gemma3)
    rope_factors: ClassVar[bool] = False   # rope_factors_long/short.weight (phi3)
    activation: ClassVar[str] = "silu"     # or "gelu" (tanh approximation, gemma3)
    # numerics: how llama.cpp computes it (docs/ARCHITECTURE.md, "Numerics per architecture")
    attention_kernel: ClassVar[str] = "attention_nofa"   # or "attend" (flash-attention path)
    rope_neox: ClassVar[bool] = True       # pairs (i, i + n_rot/2); False: adjacent (2i, 2i+1)
    q_prescale: ClassVar[bool] = False     # q *= scale before rounding to fp16, kq_scale 1 (phi3, gemma3)
    scale_in_f32: ClassVar[bool] = False   # 1/sqrt(hd) computed in float32, not float64 (gemma3)
    rope_attn_factor: ClassVar[bool] = True  # cos, sin * rope.scaling.attn_factor (llama ignores it)
    head_bias = True

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.attention_kernel not in ATTENTION_KERNELS:
            raise TypeError(f"{cls.__name__}.attention_kernel {cls.attention_kernel!r} not in {ATTENTION_KERNELS}")
        if cls.attention_kernel == "attend" and cls.q_prescale:
            raise TypeError(f"{cls.__name__}: the 'attend' path rounds q to fp16 as it stores K, V: no q_prescale")

    def __init__(self, gf: GGUFFile, n_ctx: int | None = None):
        super().__init__(gf, n_ctx, self.read_args(gf))
        self.layers = [DenseLayer(gf, self.args, i, type(self)) for i in range(self.args.n_layer)]
        self.rope = self.rope_tables(gf)  # per layer: a RopeTable (shared where equal)
        hd = self.args.head_dim
        self.scale: np.float32 = np.float32(1.0 / np.sqrt(np.float32(hd)) if self.scale_in_f32 else 1.0 / np.sqrt(hd))
        # decode's whole token in one numba call where the numerics and formats allow (same logits)
        self.fused = FusedDecode.build(self)   # None: layer by layer (fused_decode.unsupported_reason)

    # ---- per-architecture hooks
    def read_args(self, gf: GGUFFile) -> Args:
        return Args.from_gguf(gf, self.arch)

    def rope_factors_for(self, gf: GGUFFile) -> np.ndarray | None:
        """Frequency divisors (n_rot/2,) or None. phi3: long when n_ctx > original context, else short."""
        a = self.args
        if "rope_freqs.weight" in gf.tensors:
            return vector(gf, "rope_freqs.weight", a.n_rot // 2)
        if not self.rope_factors:
            return None
        present = {n: optional_vector(gf, n, a.n_rot // 2)  # both validated, one used
                   for n in ("rope_factors_long.weight", "rope_factors_short.weight")}
        return present["rope_factors_long.weight" if self.n_ctx > a.n_ctx_orig else "rope_factors_short.weight"]

    def rope_tables(self, gf: GGUFFile) -> list[ops.RopeTable]:
        a = self.args
        ff = self.rope_freq_factors = self.rope_factors_for(gf)
        attn_factor = a.rope_attn_factor if self.rope_attn_factor else 1.0
        return [ops.RopeTable(self.n_ctx, a.n_rot, a.rope_base, ff, a.rope_freq_scale, attn_factor)] * a.n_layer

    def window(self, i: int) -> int:
        return 0

    def new_run_state(self, T: int) -> DenseRun:
        return DenseRun(T, self.args)

    def make_cache(self) -> list[Cache]:
        a = self.args
        return kv_block_caches(a.n_layer, self.n_ctx, a.n_head_kv, a.head_dim)   # one block: fused decode

    # ---- running
    def forward(self, tokens: Any, cache: list, logits: str = "last",
                token_exact: bool = False) -> np.ndarray | None:
        """Feed tokens (T,) at the cache's current position; return logits (n, V) or None.

        logits: "last" (the last position only), "all" (every position) or "none".
        token_exact: each row's logits bit-identical to feeding the tokens one at a time
        (decode's row kernels and single-query attention; speculative verification).
        """
        run = self.begin(tokens, cache, logits)
        # decode, and speculative verification (token-exact rows): one compiled call
        if self.fused is not None and ((run.T == 1 and logits == "last")
                                       or (token_exact and logits == "all" and run.T <= fused_decode.MAX_TOKENS)):
            return self.fused.step(run.tokens, cache)
        x = self.embed(run.tokens)                                       # (T, D)
        for i, (layer, kv) in enumerate(zip(self.layers, cache)):
            x += self.attention_block(i, layer, kv, x, run, token_exact)
            x += self.ffn_block(layer, x, run, token_exact)
        return self.head(x, logits, token_exact)

    def attention_block(self, i: int, layer: DenseLayer, kv: KVCache, x: np.ndarray, run: DenseRun,
                        token_exact: bool) -> np.ndarray:
        a, T, p0 = self.args, run.T, run.p0
        H, Hkv, hd, eps = a.n_head, a.n_head_kv, a.head_dim, a.norm_eps
        n = run.n
        ops.rmsnorm(x, layer.attn_norm, eps, n)
        if layer.w_qkv is not None:
            qkv = layer.w_qkv.matmul(n, token_exact=token_exact)
            if layer.bqkv is not None:
                qkv += layer.bqkv
            qd, kd = layer.q_dim, layer.kv_dim
            q, k, v = qkv[:, :qd], qkv[:, qd : qd + kd], qkv[:, qd + kd :]
        else:
            assert layer.qkv_group is not None
            q, k, v = layer.qkv_group.matmul(n, token_exact=token_exact)
            for out, b in ((q, layer.bq), (k, layer.bk), (v, layer.bv)):
                if b is not None:
                    out += b
        q = np.ascontiguousarray(q).reshape(T, H, hd)
        k = np.ascontiguousarray(k).reshape(T, Hkv, hd)
        v = np.ascontiguousarray(v).reshape(T, Hkv, hd)
        if layer.q_norm is not None and layer.k_norm is not None:
            ops.rmsnorm(q.reshape(T * H, hd), layer.q_norm, eps, q.reshape(T * H, hd))
            ops.rmsnorm(k.reshape(T * Hkv, hd), layer.k_norm, eps, k.reshape(T * Hkv, hd))
        cos, sin = self.rope[i].upto(p0 + T)
        att = run.att
        if self.attention_kernel == "attend":
            # RoPE, then q/k/v rounded to fp16 (llama.cpp's F16 cache); k, v appended to the cache
            ops.rope_and_store(q, k, v, cos, sin, a.n_rot, self.rope_neox, kv)
            if token_exact:  # decode's single-query path (fp16 accumulator), query by query
                for t in range(T):
                    ops.attend(q[t : t + 1], kv.keys, kv.values, p0 + t, self.scale, att[t : t + 1])
            else:
                ops.attend(q, kv.keys, kv.values, p0, self.scale, att)
        else:
            ops.rope_inplace(q, cos, sin, p0, a.n_rot, self.rope_neox)
            ops.rope_inplace(k, cos, sin, p0, a.n_rot, self.rope_neox)
            kv.write(k, v)   # rounded to fp16 as stored
            s: np.float32 = self.scale
            if self.q_prescale:
                q *= s
                s = np.float32(1.0)
            ops.attention_nofa(ops.to_f16_precision(q), kv.keys, kv.values, p0, s, self.window(i), att, F16_TO_F32)
        o = layer.wo.matmul(att.reshape(T, H * hd), run.o, token_exact)
        if layer.post_attn_norm is not None:
            ops.rmsnorm(o, layer.post_attn_norm, eps, o)
        return o

    def ffn_block(self, layer: DenseLayer, x: np.ndarray, run: DenseRun, token_exact: bool) -> np.ndarray:
        n = run.n
        ops.rmsnorm(x, layer.ffn_norm, self.args.norm_eps, n)
        if layer.w_gate_up is not None:
            gu = layer.w_gate_up.matmul(n, token_exact=token_exact)
            g = np.ascontiguousarray(gu[:, : self.args.n_ff])
            u = np.ascontiguousarray(gu[:, self.args.n_ff :])
        else:
            assert layer.gate_up_group is not None
            g, u = layer.gate_up_group.matmul(n, token_exact=token_exact)
        if self.activation == "gelu":
            ops.geglu(g, u, g)
        else:
            ops.swiglu(g, u, g)
        f = layer.w_down.matmul(g, run.f, token_exact)
        if layer.post_ffw_norm is not None:
            ops.rmsnorm(f, layer.post_ffw_norm, self.args.norm_eps, f)
        return f
