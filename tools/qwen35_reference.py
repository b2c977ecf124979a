"""A plain numpy qwen35 forward pass that emulates llama.cpp's CPU arithmetic (tools only).

Independent of the engine's model code and kernels (it shares only the numpy twins in
engine/deltanet.py and engine/ops.py): weights are fully dequantized with the gguf package,
activations are quantized the way llama.cpp does before each quantized matmul (Q8_K for
K-quants, Q8_0 for Q8_0/Q4_0/Q5_0, F16 for F16 weights), K/V and q are rounded to fp16 and
the softmax probabilities are rounded to fp16 before they multiply V (llama.cpp's non-flash
attention path with an F16 cache).

It is slow and memory-hungry (every weight in float32) and meant for tiny fixtures:
`tools/make_qwen35_fixtures.py` uses it to pick fixtures whose comparison with llama.cpp is
well conditioned, and it answers "is the engine or the fixture wrong?" when a parity test fails.
"""

from __future__ import annotations

import numpy as np

from engine.deltanet import deltanet_mix_ref
from engine.ops import rmsnorm_ref, rope_ref, rope_tables


def q8_0_act(X):
    """Quantize-dequantize rows like ggml quantize_row_q8_0 (d = amax/127 stored fp16, round half even)."""
    X = np.asarray(X, np.float32)
    T, K = X.shape
    B = X.reshape(T, K // 32, 32)
    amax = np.abs(B).max(-1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    idv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.round((B * idv).astype(np.float32))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(T, K).astype(np.float32)


def q8_k_act(X):
    """Quantize-dequantize rows like ggml quantize_row_q8_K (signed max, iscale = -127/max, d = 1/iscale)."""
    X = np.asarray(X, np.float32)
    T, K = X.shape
    B = X.reshape(T, K // 256, 256)
    idx = np.abs(B).argmax(-1)[..., None]
    mx = np.take_along_axis(B, idx, -1)
    iscale = np.where(mx != 0, np.float32(-127) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
    q = np.minimum(np.round((iscale * B).astype(np.float32)), 127)
    d = np.where(iscale != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    return (q * d).reshape(T, K).astype(np.float32)


_ACT = {"Q8_0": q8_0_act, "Q4_0": q8_0_act, "Q5_0": q8_0_act,
        "Q2_K": q8_k_act, "Q3_K": q8_k_act, "Q4_K": q8_k_act, "Q5_K": q8_k_act, "Q6_K": q8_k_act,
        "F16": lambda X: X.astype(np.float16).astype(np.float32), "F32": lambda X: X}


class RefLinear:
    def __init__(self, reader_tensor):
        import gguf

        t = reader_tensor
        self.type = t.tensor_type.name
        if self.type not in _ACT:
            raise NotImplementedError(f"reference: {self.type}")
        self.w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            int(t.shape[1]), int(t.shape[0]))  # (out, in)

    noise = None  # (rng, relative std): perturb outputs like a different summation order would

    def __call__(self, X):
        Xq = _ACT[self.type](np.asarray(X, np.float32))
        y = (Xq.astype(np.float64) @ self.w.T.astype(np.float64)).astype(np.float32)
        if self.noise is not None:
            rng, rel = self.noise
            y = (y * (1.0 + rel * rng.standard_normal(y.shape))).astype(np.float32)
        return y


def _attention_f16p(q, K, V, p0, scale):
    """q (T, Hq, hd) fp16-rounded; K, V (n, Hkv, hd) fp16-rounded; probabilities rounded to fp16."""
    T, Hq, hd = q.shape
    rep = Hq // K.shape[1]
    out = np.empty((T, Hq, hd), np.float32)
    for t in range(T):
        n = p0 + t + 1
        for h in range(Hq):
            s = (K[:n, h // rep].astype(np.float64) @ q[t, h].astype(np.float64)).astype(np.float32) * np.float32(scale)
            p = np.exp((s - s.max()).astype(np.float64))
            p = (p / p.sum()).astype(np.float32).astype(np.float16).astype(np.float64)
            out[t, h] = (p @ V[:n, h // rep].astype(np.float64)).astype(np.float32)
    return out


def _f16(a):
    return a.astype(np.float16).astype(np.float32)


class Qwen35Reference:
    """forward(tokens) -> logits of every position, keeping state across calls like the engine."""

    def __init__(self, path, n_ctx: int = 256):
        import gguf

        r = gguf.GGUFReader(str(path))
        self.meta = {f.name: f for f in r.fields.values()}
        T = {t.name: t for t in r.tensors}

        def kv(k, default=None):
            f = self.meta.get("qwen35." + k)
            if f is None:
                return default
            v = f.contents()
            return v

        def vec(name):
            return np.asarray(T[name].data, np.float32).reshape(-1).copy()

        self.D = kv("embedding_length")
        self.n_layer = kv("block_count") - (kv("nextn_predict_layers", 0) or 0)
        flags = kv("attention.recurrent_layers")
        interval = kv("full_attention_interval", 4)
        self.recurrent = [bool(flags[i]) if flags is not None else (i + 1) % interval != 0 for i in range(self.n_layer)]
        self.Hq, self.Hkv = kv("attention.head_count"), kv("attention.head_count_kv")
        self.hd = kv("attention.key_length")
        self.n_rot = kv("rope.dimension_count")
        self.eps = kv("attention.layer_norm_rms_epsilon")
        self.Hk, self.Hv, self.dk = kv("ssm.group_count"), kv("ssm.time_step_rank"), kv("ssm.state_size")
        self.dv = kv("ssm.inner_size") // self.Hv
        self.K = kv("ssm.conv_kernel")
        self.cos, self.sin = rope_tables(n_ctx, self.n_rot, kv("rope.freq_base"))
        emb = T["token_embd.weight"]
        self.embd = RefLinear(emb)
        self.head = RefLinear(T["output.weight"]) if "output.weight" in T else self.embd
        self.out_norm = vec("output_norm.weight")
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            L = {"attn_norm": vec(p + "attn_norm.weight"), "post_norm": vec(p + "post_attention_norm.weight"),
                 "gate": RefLinear(T[p + "ffn_gate.weight"]), "up": RefLinear(T[p + "ffn_up.weight"]),
                 "down": RefLinear(T[p + "ffn_down.weight"])}
            if self.recurrent[i]:
                L.update(qkv=RefLinear(T[p + "attn_qkv.weight"]), z=RefLinear(T[p + "attn_gate.weight"]),
                         beta=RefLinear(T[p + "ssm_beta.weight"]), alpha=RefLinear(T[p + "ssm_alpha.weight"]),
                         out=RefLinear(T[p + "ssm_out.weight"]), dt=vec(p + "ssm_dt.bias"), a=vec(p + "ssm_a"),
                         conv=np.asarray(T[p + "ssm_conv1d.weight"].data, np.float32).reshape(-1, self.K).T.copy(),
                         norm=vec(p + "ssm_norm.weight"))
            else:
                L.update(q=RefLinear(T[p + "attn_q.weight"]), k=RefLinear(T[p + "attn_k.weight"]),
                         v=RefLinear(T[p + "attn_v.weight"]), o=RefLinear(T[p + "attn_output.weight"]),
                         qn=vec(p + "attn_q_norm.weight"), kn=vec(p + "attn_k_norm.weight"))
            self.layers.append(L)
        self.reset()

    def set_noise(self, rel: float, seed: int = 0):
        """Perturb every matmul output by a relative N(0, rel): how fragile is the comparison?"""
        rng = np.random.default_rng(seed)
        for lin in [self.embd, self.head] + [v for L in self.layers for v in L.values() if isinstance(v, RefLinear)]:
            lin.noise = (rng, rel) if rel else None

    def reset(self):
        self.pos = 0
        self.state = []
        for r in self.recurrent:
            if r:
                self.state.append([np.zeros((self.K - 1, 2 * self.Hk * self.dk + self.Hv * self.dv), np.float32),
                                   np.zeros((self.Hv, self.dv, self.dk), np.float32)])
            else:
                self.state.append([np.zeros((0, self.Hkv, self.hd), np.float32)] * 2)

    def forward(self, tokens):
        tokens = np.asarray(tokens, np.int64)
        T, D, hd = len(tokens), self.D, self.hd
        p0 = self.pos
        x = self.embd.w[tokens].copy()
        for L, st, rec in zip(self.layers, self.state, self.recurrent):
            n = rmsnorm_ref(x, L["attn_norm"], self.eps)
            if rec:
                y, st[0], st[1] = deltanet_mix_ref(L["qkv"](n), L["z"](n), L["alpha"](n), L["beta"](n), st[0], st[1],
                                                   L["conv"], L["dt"], L["a"], L["norm"], self.eps, self.Hk, True)
                x = x + L["out"](y)
            else:
                qg = L["q"](n).reshape(T, self.Hq, 2, hd)
                q, gate = qg[:, :, 0].copy(), qg[:, :, 1].copy()
                k = L["k"](n).reshape(T, self.Hkv, hd)
                v = L["v"](n).reshape(T, self.Hkv, hd)
                q = rmsnorm_ref(q.reshape(-1, hd), L["qn"], self.eps).reshape(T, self.Hq, hd)
                k = rmsnorm_ref(k.reshape(-1, hd), L["kn"], self.eps).reshape(T, self.Hkv, hd)
                q = rope_ref(q, self.cos, self.sin, p0, self.n_rot, True)
                k = rope_ref(k, self.cos, self.sin, p0, self.n_rot, True)
                st[0] = np.concatenate([st[0], _f16(k)])
                st[1] = np.concatenate([st[1], _f16(v)])
                att = _attention_f16p(_f16(q), st[0], st[1], p0, 1.0 / np.sqrt(hd))
                att = (att * (1.0 / (1.0 + np.exp(-gate.astype(np.float64))))).astype(np.float32)
                x = x + L["o"](att.reshape(T, self.Hq * hd))
            n = rmsnorm_ref(x, L["post_norm"], self.eps)
            g = L["gate"](n).astype(np.float64)
            x = x + L["down"]((g / (1.0 + np.exp(-g)) * L["up"](n)).astype(np.float32))
        self.pos += T
        return self.head(rmsnorm_ref(x, self.out_norm, self.eps))
