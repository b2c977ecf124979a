"""`qwen35` architecture (Qwen3.5: Gated DeltaNet + gated attention hybrid), as llama.cpp runs it.

See shared/reference/qwen35-llama-phi3-gguf.md §1-§4. Shapes for one call of T tokens:

    x = embed(tokens)                                              (T, D)   dequantized rows, no scaling
    for each trunk layer i (MTP blocks past n_layer are never run, not even loaded):
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

`qwen3next` (Qwen3-Next) is not supported: its FFN is mixture-of-experts (and its V heads are
grouped, its beta/alpha fused); engine.deltanet already takes the grouped head order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import ops
from engine.cache import KVCache, RecurrentCache
from engine.deltanet import deltanet_mix
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.quants.linear import LinearGroup, QuantLinear, get_format


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
    recurrent: tuple        # per trunk layer: True = Gated DeltaNet, False = gated attention

    @property
    def head_v_dim(self) -> int:
        return self.d_inner // self.n_v_heads

    @property
    def conv_dim(self) -> int:
        return 2 * self.n_k_heads * self.head_k_dim + self.d_inner

    @classmethod
    def from_gguf(cls, gf: GGUFFile, arch: str = "qwen35") -> Args:
        def key(name, kind=int, default=None):
            full = f"{arch}.{name}"
            if default is None:
                return gf.require(full, kind)
            return gf.get(full, default, kind=kind)

        def bad(problem):
            raise ModelFileError(gf.path, problem)

        n_layer_all = key("block_count")
        nextn = key("nextn_predict_layers", default=0)
        n_layer = n_layer_all - nextn
        d_model = key("embedding_length")
        n_head = key("attention.head_count")
        head_dim = key("attention.key_length", default=d_model // max(n_head, 1))
        if key("attention.value_length", default=head_dim) != head_dim:
            bad("attention.value_length differs from key_length (not supported)")
        tok = gf.tensors.get("token_embd.weight")
        if tok is None:
            bad("tensor 'token_embd.weight' is missing")
        if len(tok.shape) != 2:
            bad(f"tensor 'token_embd.weight' has shape {list(tok.shape)}, expected 2 dimensions")
        if n_layer <= 0 or nextn < 0:
            bad(f"block_count {n_layer_all} with nextn_predict_layers {nextn} leaves no layers")

        # layer pattern: the explicit per-layer flags when present, else every interval-th layer is attention
        flags = gf.get(f"{arch}.attention.recurrent_layers", None)
        if flags is not None:
            flags = np.asarray(flags).reshape(-1)
            if flags.dtype.kind not in "biu" or len(flags) < n_layer:
                bad(f"{arch}.attention.recurrent_layers must hold a flag per layer ({n_layer}), "
                    f"got {len(flags)} of type {flags.dtype}")
            recurrent = tuple(bool(f) for f in flags[:n_layer])
        else:
            interval = key("full_attention_interval", default=4)
            if interval <= 0:
                bad(f"full_attention_interval {interval} is not positive")
            recurrent = tuple((i + 1) % interval != 0 for i in range(n_layer))

        n_v_heads = key("ssm.time_step_rank")
        args = cls(
            n_layer=n_layer, n_layer_all=n_layer_all, d_model=d_model,
            n_ff=key("feed_forward_length"),
            n_head=n_head, n_head_kv=key("attention.head_count_kv", default=n_head), head_dim=head_dim,
            n_rot=key("rope.dimension_count", default=head_dim),
            rope_base=float(key("rope.freq_base", (int, float), default=10000.0)),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", (int, float), default=1e-6)),
            n_vocab=tok.shape[1], n_ctx_train=key("context_length", default=4096),
            conv_kernel=key("ssm.conv_kernel"), head_k_dim=key("ssm.state_size"),
            n_k_heads=key("ssm.group_count"), n_v_heads=n_v_heads, d_inner=key("ssm.inner_size"),
            recurrent=recurrent,
        )
        if min(args.d_model, args.n_ff, args.n_head, args.n_head_kv, args.head_dim, args.n_ctx_train,
               args.conv_kernel, args.head_k_dim, args.n_k_heads, args.n_v_heads, args.d_inner, args.n_vocab) <= 0:
            bad(f"invalid hyperparameters {args}")
        if not np.isfinite(args.rope_base) or args.rope_base <= 0 or not 0 < args.norm_eps < 1:
            bad(f"invalid rope base / norm eps {args}")
        if args.n_head % args.n_head_kv or args.n_rot > args.head_dim or args.n_rot % 2 or args.n_rot < 0:
            bad(f"inconsistent attention shape {args}")
        if args.n_v_heads % args.n_k_heads or args.d_inner % args.n_v_heads:
            bad(f"inconsistent DeltaNet shape: Hv {args.n_v_heads}, Hk {args.n_k_heads}, d_inner {args.d_inner}")
        if args.conv_kernel > 64 or args.head_k_dim > 4096 or args.head_v_dim > 4096:
            bad(f"implausible DeltaNet sizes {args}")
        return args


def _tensor(gf: GGUFFile, name: str, shape: tuple):
    t = gf.tensors.get(name)
    if t is None:
        raise ModelFileError(gf.path, f"tensor {name!r} is missing")
    if t.shape != shape:
        raise ModelFileError(gf.path, f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def _linear(gf: GGUFFile, name: str, n_in: int, n_out: int) -> QuantLinear:
    t = _tensor(gf, name, (n_in, n_out))
    return QuantLinear(gf.tensor_bytes(name), t.ggml_type, n_in, n_out, name=name)


def _vector(gf: GGUFFile, name: str, n: int) -> np.ndarray:
    _tensor(gf, name, (n,))
    return gf.tensor_float(name)


class DeltaNetLayer:
    recurrent = True

    def __init__(self, gf: GGUFFile, a: Args, i: int):
        p = f"blk.{i}."
        D, Hv = a.d_model, a.n_v_heads
        self.attn_norm = _vector(gf, p + "attn_norm.weight", D)
        self.w_qkv = _linear(gf, p + "attn_qkv.weight", D, a.conv_dim)
        self.w_z = _linear(gf, p + "attn_gate.weight", D, a.d_inner)
        self.w_beta = _linear(gf, p + "ssm_beta.weight", D, Hv)
        self.w_alpha = _linear(gf, p + "ssm_alpha.weight", D, Hv)
        self.dt_bias = _vector(gf, p + "ssm_dt.bias", Hv)
        self.ssm_a = _vector(gf, p + "ssm_a", Hv)
        _tensor(gf, p + "ssm_conv1d.weight", (a.conv_kernel, a.conv_dim))
        # (K, conv_dim) taps-major float32: small (conv taps are never quantized by llama.cpp)
        self.conv_w = np.ascontiguousarray(gf.tensor_float(p + "ssm_conv1d.weight").T)
        self.ssm_norm = _vector(gf, p + "ssm_norm.weight", a.head_v_dim)
        self.w_out = _linear(gf, p + "ssm_out.weight", a.d_inner, D)
        self.w_in = LinearGroup([self.w_qkv, self.w_z, self.w_beta, self.w_alpha])   # one input
        _ffn(self, gf, a, p)


class AttentionLayer:
    recurrent = False

    def __init__(self, gf: GGUFFile, a: Args, i: int):
        p = f"blk.{i}."
        D, hd = a.d_model, a.head_dim
        if p + "ssm_a" in gf.tensors:
            raise ModelFileError(gf.path, f"layer {i} is marked full attention but has DeltaNet tensors")
        self.attn_norm = _vector(gf, p + "attn_norm.weight", D)
        if p + "attn_qkv.weight" in gf.tensors:  # fused [q/gate interleaved | k | v] (--fuse-qkv files)
            self.w_qkv = _linear(gf, p + "attn_qkv.weight", D, a.n_head * hd * 2 + 2 * a.n_head_kv * hd)
            self.wq = self.wk = self.wv = None
        else:
            self.w_qkv = None
            self.wq = _linear(gf, p + "attn_q.weight", D, a.n_head * hd * 2)
            self.wk = _linear(gf, p + "attn_k.weight", D, a.n_head_kv * hd)
            self.wv = _linear(gf, p + "attn_v.weight", D, a.n_head_kv * hd)
            self.wqkv = LinearGroup([self.wq, self.wk, self.wv])
        self.wo = _linear(gf, p + "attn_output.weight", a.n_head * hd, D)
        self.q_norm = _vector(gf, p + "attn_q_norm.weight", hd)
        self.k_norm = _vector(gf, p + "attn_k_norm.weight", hd)
        _ffn(self, gf, a, p)


def _ffn(layer, gf: GGUFFile, a: Args, p: str):
    layer.post_norm = _vector(gf, p + "post_attention_norm.weight", a.d_model)
    layer.w_gate = _linear(gf, p + "ffn_gate.weight", a.d_model, a.n_ff)
    layer.w_up = _linear(gf, p + "ffn_up.weight", a.d_model, a.n_ff)
    layer.w_down = _linear(gf, p + "ffn_down.weight", a.n_ff, a.d_model)
    layer.w_gate_up = LinearGroup([layer.w_gate, layer.w_up])


class Model:
    arch = "qwen35"
    tiled_v_heads = True  # qwen35: v-head h reads key head h % Hk

    def __init__(self, gf: GGUFFile, n_ctx: int | None = None):
        a = self.args = Args.from_gguf(gf, self.arch)
        self.n_ctx = int(n_ctx or min(a.n_ctx_train, 8192))
        if self.n_ctx <= 0:
            raise ModelFileError(gf.path, f"invalid context size {self.n_ctx}")
        D = a.d_model
        emb = _tensor(gf, "token_embd.weight", (D, a.n_vocab))
        self.token_embd = gf.tensor_bytes("token_embd.weight")  # (V, row_bytes) blocks
        self.embd_format = get_format(emb.ggml_type)
        for i in range(a.n_layer):  # the layer pattern must agree with the tensors present
            if (f"blk.{i}.ssm_a" in gf.tensors) != a.recurrent[i]:
                kind = "recurrent" if a.recurrent[i] else "full-attention"
                raise ModelFileError(gf.path, f"layer {i} is {kind} by the metadata but its tensors disagree")
        self.layers = [DeltaNetLayer(gf, a, i) if a.recurrent[i] else AttentionLayer(gf, a, i)
                       for i in range(a.n_layer)]
        self.output_norm = _vector(gf, "output_norm.weight", D)
        if "output.weight" in gf.tensors:
            self.output = _linear(gf, "output.weight", D, a.n_vocab)
        else:  # tied head: the embedding matrix, still quantized
            self.output = QuantLinear(self.token_embd, emb.ggml_type, D, a.n_vocab, name="token_embd.weight")
        self.rope = ops.RopeTable(self.n_ctx, a.n_rot, a.rope_base)
        # bytes read per token: the trunk and the head (MTP blocks are never read)
        skip = tuple(f"blk.{i}." for i in range(a.n_layer, a.n_layer_all))
        self.weight_bytes = sum(t.nbytes for n, t in gf.tensors.items() if not n.startswith(skip))

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    def make_cache(self) -> list:
        a = self.args
        return [RecurrentCache(a.conv_kernel, a.conv_dim, a.n_v_heads, a.head_v_dim, a.head_k_dim)
                if r else KVCache(self.n_ctx, a.n_head_kv, a.head_dim) for r in a.recurrent]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.embd_format.dequantize(self.token_embd[tokens]), dtype=np.float32)

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

        Hq, Hkv, hd = a.n_head, a.n_head_kv, a.head_dim
        eps = a.norm_eps
        scale = np.float32(1.0 / np.sqrt(hd))
        x = self.embed(tokens)                                           # (T, D)
        n = np.empty_like(x)
        for layer, c in zip(self.layers, cache):
            if c.offset != p0:
                raise ValueError("cache layers are at different positions")
            ops.rmsnorm(x, layer.attn_norm, eps, n)
            if layer.recurrent:
                # (T, conv_dim), (T, Hv*dv), (T, Hv), (T, Hv)
                qkv, z, b, al = layer.w_in.matmul(n, token_exact=token_exact)
                if c.trail is None:
                    y = deltanet_mix(qkv, z, al, b, c.conv, c.state, layer.conv_w, layer.dt_bias, layer.ssm_a,
                                     layer.ssm_norm, eps, a.n_k_heads, self.tiled_v_heads)   # (T, Hv*dv)
                    c.advance(T)
                else:  # a snapshot after each token (speculative verification rolls back to one)
                    y = np.empty((T, a.d_inner), dtype=np.float32)
                    for t in range(T):
                        y[t] = deltanet_mix(qkv[t : t + 1], z[t : t + 1], al[t : t + 1], b[t : t + 1], c.conv,
                                            c.state, layer.conv_w, layer.dt_bias, layer.ssm_a, layer.ssm_norm,
                                            eps, a.n_k_heads, self.tiled_v_heads)[0]
                        c.advance(1)
                        c.record()
                x += layer.w_out.matmul(y, token_exact=token_exact)
            else:
                if layer.w_qkv is not None:
                    qkv = layer.w_qkv.matmul(n, token_exact=token_exact)
                    nq = Hq * hd * 2
                    qg, k, v = qkv[:, :nq], qkv[:, nq : nq + Hkv * hd], qkv[:, nq + Hkv * hd :]
                else:
                    qg, k, v = layer.wqkv.matmul(n, token_exact=token_exact)
                qg = qg.reshape(T, Hq, 2, hd)
                q = np.ascontiguousarray(qg[:, :, 0, :])                 # (T, Hq, hd)
                gate = np.ascontiguousarray(qg[:, :, 1, :])              # (T, Hq, hd)
                k = np.ascontiguousarray(k).reshape(T, Hkv, hd)
                v = np.ascontiguousarray(v).reshape(T, Hkv, hd)
                ops.rmsnorm(q.reshape(T * Hq, hd), layer.q_norm, eps, q.reshape(T * Hq, hd))
                ops.rmsnorm(k.reshape(T * Hkv, hd), layer.k_norm, eps, k.reshape(T * Hkv, hd))
                # RoPE; q, k, v rounded to fp16 (llama.cpp's F16 cache); k, v appended to the cache
                cos, sin = self.rope.upto(c.offset + T)
                ops.rope_and_store(q, k, v, cos, sin, a.n_rot, True, c)
                att = np.empty((T, Hq, hd), dtype=np.float32)
                ops.attention(q, c.keys, c.values, p0, scale, att)
                att *= ops.sigmoid(gate)
                x += layer.wo.matmul(att.reshape(T, Hq * hd), token_exact=token_exact)

            ops.rmsnorm(x, layer.post_norm, eps, n)
            g, u = layer.w_gate_up.matmul(n, token_exact=token_exact)
            ops.swiglu(g, u, g)
            x += layer.w_down.matmul(g, token_exact=token_exact)

        if logits == "none":
            return None
        rows = x[-1:] if logits == "last" else x
        h = np.empty_like(rows)
        ops.rmsnorm(np.ascontiguousarray(rows), self.output_norm, eps, h)
        return self.output.matmul(h, token_exact=token_exact)
