"""`qwen35` architecture (Qwen3.5: Gated DeltaNet + gated attention hybrid), as llama.cpp runs it.

See docs/models.md (qwen35). Shapes for one call of T tokens:

    x = embed(tokens)                                              (T, D)   dequantized rows, no scaling
    for each trunk layer i (the MTP block past n_layer is run only by engine.mtp, the drafter):
        n = RMSNorm(x) * attn_norm                                 (+1 already folded into the weight)
        if recurrent[i]:  Gated DeltaNet                           state: conv (K-1, conv_dim), S (Hv, dv, dk)
            qkv = W_qkv n                                          (T, 2*Hk*dk + Hv*dv)  V heads in tiled order
            z   = W_gate n                                         (T, Hv*dv)
            b, a = W_beta n, W_alpha n                             (T, Hv) x2
            y   = deltanet_mix(...)                                (T, Hv*dv)  conv+silu, l2norm, delta rule,
                                                                               RMSNorm*ssm_norm*silu(z)
            x  += W_ssm_out y
        else:             gated attention                          KV cache (grows with the context)
            qg  = W_q n -> (T, Hq, 2, hd)                          q and gate interleaved per head
            q, gate = qg[:, :, 0], qg[:, :, 1]                     (T, Hq, hd) x2
            k, v = W_k n, W_v n                                    (T, Hkv, hd) x2
            q, k = RMSNorm(q) * q_norm, RMSNorm(k) * k_norm        per head, over hd
            q, k = RoPE_neox(q, k) on the first n_rot dims         text positions: IMROPE == NEOX
            att = softmax(q k^T / sqrt(hd) + causal) v             K/V (and q) at fp16 precision
            x  += W_o (att * sigmoid(gate))                        (T, Hq*hd) -> (T, D)
        n  = RMSNorm(x) * post_attention_norm
        x += W_down(silu(W_gate n) * W_up n)
    logits = W_out RMSNorm(x) * output_norm                        only the positions asked for;
                                                                   W_out = output.weight or token_embd
    hidden_sink(cache, p0, tokens, RMSNorm(x) * output_norm)       every row, when a sink is set (the
                                                                   MTP drafter's input h, engine.mtp)

`qwen3next` (Qwen3-Next) is not supported: its FFN is mixture-of-experts (and its V heads are
grouped, its beta/alpha fused); engine.deltanet already takes the grouped head order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np

from engine import ops
from engine.cache import Cache, KVCache, RecurrentCache
from engine.deltanet import deltanet_mix
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.models.base import BaseModel, HParams, RunState, linear, tensor, vector
from engine.quants.common import F16_TO_F32
from engine.quants.linear import LinearGroup, QuantLinear

EXAMPLES = "Qwen3.5 (DeltaNet hybrid) 0.8B-9B"


@dataclass(frozen=True)
class Args:
    n_layer: int            # trunk layers that run: block_count - nextn_predict_layers
    n_layer_all: int        # block_count (includes MTP blocks)
    d_model: int            # D
    n_ff: int
    n_head: int             # Hq
    n_head_kv: int          # Hkv
    head_dim: int           # hd
    n_rot: int              # rotated dims per head (partial RoPE)
    rope_base: float
    norm_eps: float
    n_vocab: int
    n_ctx_train: int
    conv_kernel: int        # K
    head_k_dim: int         # dk (ssm.state_size)
    n_k_heads: int          # Hk (ssm.group_count)
    n_v_heads: int          # Hv (ssm.time_step_rank)
    d_inner: int            # Hv * dv (ssm.inner_size)
    recurrent: tuple[bool, ...]   # per trunk layer: True = Gated DeltaNet, False = gated attention

    @property
    def head_v_dim(self) -> int:
        return self.d_inner // self.n_v_heads

    @property
    def conv_dim(self) -> int:
        return 2 * self.n_k_heads * self.head_k_dim + self.d_inner

    @classmethod
    def from_gguf(cls, gf: GGUFFile, arch: str = "qwen35") -> Args:
        r = HParams(gf, arch)
        n_layer_all = r("block_count")
        nextn = r("nextn_predict_layers", default=0)
        n_layer = n_layer_all - nextn
        if n_layer <= 0 or nextn < 0:
            r.bad(f"block_count {n_layer_all} with nextn_predict_layers {nextn} leaves no layers")
        common = r.attention(norm_eps=1e-6, n_ctx_train=4096)

        # layer pattern: the explicit per-layer flags when present, else every interval-th layer is attention
        flags = gf.get(f"{arch}.attention.recurrent_layers", None)
        if flags is not None:
            flags = np.asarray(flags).reshape(-1)
            if flags.dtype.kind not in "biu" or len(flags) < n_layer:
                r.bad(f"{arch}.attention.recurrent_layers must hold a flag per layer ({n_layer}), "
                      f"got {len(flags)} of type {flags.dtype}")
            recurrent = tuple(bool(f) for f in flags[:n_layer])
        else:
            interval = r("full_attention_interval", default=4)
            if interval <= 0:
                r.bad(f"full_attention_interval {interval} is not positive")
            recurrent = tuple((i + 1) % interval != 0 for i in range(n_layer))

        args = cls(
            n_layer=n_layer, n_layer_all=n_layer_all, **common,
            conv_kernel=r("ssm.conv_kernel"), head_k_dim=r("ssm.state_size"),
            n_k_heads=r("ssm.group_count"), n_v_heads=r("ssm.time_step_rank"), d_inner=r("ssm.inner_size"),
            recurrent=recurrent,
        )
        r.check_attention(args, min_rot=0)
        if min(args.conv_kernel, args.head_k_dim, args.n_k_heads, args.n_v_heads, args.d_inner) <= 0:
            r.bad(f"invalid hyperparameters {args}")
        if args.n_v_heads % args.n_k_heads or args.d_inner % args.n_v_heads:
            r.bad(f"inconsistent DeltaNet shape: Hv {args.n_v_heads}, Hk {args.n_k_heads}, d_inner {args.d_inner}")
        if args.conv_kernel > 64 or args.head_k_dim > 4096 or args.head_v_dim > 4096:
            r.bad(f"implausible DeltaNet sizes {args}")
        return args


class FFNLayer:
    """post_attention_norm and the SwiGLU feed-forward every layer ends with."""

    def load_ffn(self, gf: GGUFFile, a: Args, p: str) -> None:
        self.post_norm = vector(gf, p + "post_attention_norm.weight", a.d_model)
        self.w_gate = linear(gf, p + "ffn_gate.weight", a.d_model, a.n_ff)
        self.w_up = linear(gf, p + "ffn_up.weight", a.d_model, a.n_ff)
        self.w_down = linear(gf, p + "ffn_down.weight", a.n_ff, a.d_model)
        self.w_gate_up = LinearGroup([self.w_gate, self.w_up])


class DeltaNetLayer(FFNLayer):
    recurrent = True

    def __init__(self, gf: GGUFFile, a: Args, i: int):
        p = f"blk.{i}."
        D, Hv = a.d_model, a.n_v_heads
        self.attn_norm = vector(gf, p + "attn_norm.weight", D)
        self.w_qkv = linear(gf, p + "attn_qkv.weight", D, a.conv_dim)
        self.w_z = linear(gf, p + "attn_gate.weight", D, a.d_inner)
        self.w_beta = linear(gf, p + "ssm_beta.weight", D, Hv)
        self.w_alpha = linear(gf, p + "ssm_alpha.weight", D, Hv)
        self.dt_bias = vector(gf, p + "ssm_dt.bias", Hv)
        self.ssm_a = vector(gf, p + "ssm_a", Hv)
        tensor(gf, p + "ssm_conv1d.weight", (a.conv_kernel, a.conv_dim))
        # (K, conv_dim) taps-major float32: small (conv taps are never quantized by llama.cpp)
        self.conv_w = np.ascontiguousarray(gf.tensor_float(p + "ssm_conv1d.weight").T)
        self.ssm_norm = vector(gf, p + "ssm_norm.weight", a.head_v_dim)
        self.w_out = linear(gf, p + "ssm_out.weight", a.d_inner, D)
        self.w_in = LinearGroup([self.w_qkv, self.w_z, self.w_beta, self.w_alpha])   # one input
        self.load_ffn(gf, a, p)


class AttentionLayer(FFNLayer):
    recurrent = False

    def __init__(self, gf: GGUFFile, a: Args, i: int):
        p = f"blk.{i}."
        D, hd = a.d_model, a.head_dim
        if p + "ssm_a" in gf.tensors:
            raise ModelFileError(gf.path, f"layer {i} is marked full attention but has DeltaNet tensors")
        self.attn_norm = vector(gf, p + "attn_norm.weight", D)
        self.w_qkv: QuantLinear | None = None
        self.wqkv: LinearGroup | None = None
        if p + "attn_qkv.weight" in gf.tensors:  # fused [q/gate interleaved | k | v] (--fuse-qkv files)
            self.w_qkv = linear(gf, p + "attn_qkv.weight", D, a.n_head * hd * 2 + 2 * a.n_head_kv * hd)
            self.wq = self.wk = self.wv = None
        else:
            self.wq = linear(gf, p + "attn_q.weight", D, a.n_head * hd * 2)
            self.wk = linear(gf, p + "attn_k.weight", D, a.n_head_kv * hd)
            self.wv = linear(gf, p + "attn_v.weight", D, a.n_head_kv * hd)
            self.wqkv = LinearGroup([self.wq, self.wk, self.wv])
        self.wo = linear(gf, p + "attn_output.weight", a.n_head * hd, D)
        self.q_norm = vector(gf, p + "attn_q_norm.weight", hd)
        self.k_norm = vector(gf, p + "attn_k_norm.weight", hd)
        self.load_ffn(gf, a, p)


class Qwen35Run(RunState):
    def __init__(self, T: int, a: Args):
        super().__init__(T)
        self.n = self.zeros(T, a.d_model)                       # normed input of a block
        self.o = self.zeros(T, a.d_model)                       # a mixer's output projection
        self.f = self.zeros(T, a.d_model)                       # W_down(...)
        self.q = self.zeros(T, a.n_head, a.head_dim)            # attention: q, gate, output
        self.gate = self.zeros(T, a.n_head, a.head_dim)
        self.att = self.zeros(T, a.n_head, a.head_dim)


class Model(BaseModel[Qwen35Run]):
    arch = "qwen35"
    tiled_v_heads: ClassVar[bool] = True  # qwen35: v-head h reads key head h % Hk
    # numerics (docs/ARCHITECTURE.md): float32 attention over fp16-rounded q, K, V (llama.cpp's
    # flash-attention tiles, also for one query), NEOX RoPE on the first n_rot dims
    rope_neox: ClassVar[bool] = True

    # Called after every forward with (cache, p0, tokens, h): h (T, D) the output-normed final hidden
    # rows of all T positions (llama.cpp's h_nextn). Set by engine.mtp.MTPDrafter; None costs nothing.
    hidden_sink: Callable[[list, int, np.ndarray, np.ndarray], None] | None = None

    def __init__(self, gf: GGUFFile, n_ctx: int | None = None):
        super().__init__(gf, n_ctx, Args.from_gguf(gf, self.arch))
        a = self.args
        for i in range(a.n_layer):  # the layer pattern must agree with the tensors present
            if (f"blk.{i}.ssm_a" in gf.tensors) != a.recurrent[i]:
                kind = "recurrent" if a.recurrent[i] else "full-attention"
                raise ModelFileError(gf.path, f"layer {i} is {kind} by the metadata but its tensors disagree")
        self.layers: list[DeltaNetLayer | AttentionLayer] = [
            DeltaNetLayer(gf, a, i) if a.recurrent[i] else AttentionLayer(gf, a, i) for i in range(a.n_layer)]
        self.rope = ops.RopeTable(self.n_ctx, a.n_rot, a.rope_base)
        self.scale = np.float32(1.0 / np.sqrt(a.head_dim))
        # bytes read per token: the trunk and the head (MTP blocks are never read)
        skip = tuple(f"blk.{i}." for i in range(a.n_layer, a.n_layer_all))
        self.weight_bytes = sum(t.nbytes for n, t in gf.tensors.items() if not n.startswith(skip))

    def new_run_state(self, T: int) -> Qwen35Run:
        return Qwen35Run(T, self.args)

    def make_cache(self) -> list[Cache]:
        a = self.args
        return [RecurrentCache(a.conv_kernel, a.conv_dim, a.n_v_heads, a.head_v_dim, a.head_k_dim)
                if r else KVCache(self.n_ctx, a.n_head_kv, a.head_dim) for r in a.recurrent]

    def forward(self, tokens: Any, cache: list, logits: str = "last",
                token_exact: bool = False) -> np.ndarray | None:
        """Feed tokens (T,) at the cache's current position; return logits (n, V) or None.

        logits: "last" (the last position only), "all" (every position) or "none".
        token_exact: each row's logits bit-identical to feeding the tokens one at a time
        (decode's row kernels instead of the GEMM; speculative verification).
        """
        run = self.begin(tokens, cache, logits)
        x = self.embed(run.tokens)                                       # (T, D)
        n = run.n
        for layer, c in zip(self.layers, cache):
            ops.rmsnorm(x, layer.attn_norm, self.args.norm_eps, n)
            if isinstance(layer, DeltaNetLayer):
                x += self.deltanet_block(layer, c, n, run, token_exact)
            else:
                x += self.attention_block(layer, c, n, run, token_exact)
            ops.rmsnorm(x, layer.post_norm, self.args.norm_eps, n)
            g, u = layer.w_gate_up.matmul(n, token_exact=token_exact)
            ops.swiglu(g, u, g)
            x += layer.w_down.matmul(g, run.f, token_exact)
        if self.hidden_sink is not None:
            h = np.empty_like(x)
            ops.rmsnorm(x, self.output_norm, self.args.norm_eps, h)
            self.hidden_sink(cache, run.p0, run.tokens, h)
        return self.head(x, logits, token_exact)

    def deltanet_block(self, layer: DeltaNetLayer, c: RecurrentCache, n: np.ndarray, run: Qwen35Run,
                       token_exact: bool) -> np.ndarray:
        # (T, conv_dim), (T, Hv*dv), (T, Hv), (T, Hv)
        qkv, z, b, al = layer.w_in.matmul(n, token_exact=token_exact)
        if c.trail is not None:   # a speculative pass: a rejection replays the accepted tokens
            c.trail.add(partial(self.deltanet_feed, layer), qkv, z, al, b)
        return layer.w_out.matmul(self.deltanet_feed(layer, c, qkv, z, al, b), run.o, token_exact)

    def deltanet_feed(self, layer: DeltaNetLayer, c: RecurrentCache, qkv, z, al, b) -> np.ndarray:
        """The mixer between the projections for T tokens: y (T, Hv*dv); c advances by T."""
        a = self.args
        y = deltanet_mix(qkv, z, al, b, c.conv, c.state, layer.conv_w, layer.dt_bias, layer.ssm_a,
                         layer.ssm_norm, a.norm_eps, a.n_k_heads, self.tiled_v_heads)
        c.advance(qkv.shape[0])
        return y

    def attention_block(self, layer: AttentionLayer, c: KVCache, n: np.ndarray, run: Qwen35Run,
                        token_exact: bool) -> np.ndarray:
        a, T = self.args, run.T
        Hq, Hkv, hd, eps = a.n_head, a.n_head_kv, a.head_dim, a.norm_eps
        if layer.w_qkv is not None:
            qkv = layer.w_qkv.matmul(n, token_exact=token_exact)
            nq = Hq * hd * 2
            qg, k, v = qkv[:, :nq], qkv[:, nq : nq + Hkv * hd], qkv[:, nq + Hkv * hd :]
        else:
            assert layer.wqkv is not None
            qg, k, v = layer.wqkv.matmul(n, token_exact=token_exact)
        qg = qg.reshape(T, Hq, 2, hd)
        q, gate = run.q, run.gate
        q[...] = qg[:, :, 0, :]                                              # q and gate interleaved per head
        gate[...] = qg[:, :, 1, :]
        k = np.ascontiguousarray(k).reshape(T, Hkv, hd)
        v = np.ascontiguousarray(v).reshape(T, Hkv, hd)
        ops.rmsnorm(q.reshape(T * Hq, hd), layer.q_norm, eps, q.reshape(T * Hq, hd))
        ops.rmsnorm(k.reshape(T * Hkv, hd), layer.k_norm, eps, k.reshape(T * Hkv, hd))
        # RoPE; q, k, v rounded to fp16 (llama.cpp's F16 cache); k, v appended to the cache
        cos, sin = self.rope.upto(c.offset + T)
        ops.rope_and_store(q, k, v, cos, sin, a.n_rot, self.rope_neox, c)
        att = run.att
        ops.attention(q, c.keys, c.values, run.p0, self.scale, att, F16_TO_F32)
        att *= ops.sigmoid(gate)
        return layer.wo.matmul(att.reshape(T, Hq * hd), run.o, token_exact)
