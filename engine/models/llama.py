"""`llama` architecture (SmolLM2, Llama 2/3 style files), as llama.cpp runs it.

The dense forward of engine/models/dense.py with no biases, no q/k norms and SwiGLU:

    n  = RMSNorm(x) * attn_norm
    q, k, v = Wq n, Wk n, Wv n                              (T, Hq*hd), (T, Hkv*hd) x2
    q, k = RoPE(q), RoPE(k)        adjacent pairs (2i, 2i+1): the converter permuted rows
    x += Wo · softmax(q k^T / sqrt(hd) + causal) v          grouped-query: h -> h // (Hq/Hkv)
    m  = RMSNorm(x) * ffn_norm
    x += Wdown (silu(Wgate m) * Wup m)

Numerics (docs/models.md): llama.cpp with flash attention, as the stored SmolLM2 outputs were
made: one query accumulates in fp16, a batch in float32 tiles (`ops.attend`).
"""

from __future__ import annotations

from engine.models.base import Args
from engine.models.dense import DenseModel

__all__ = ["Args", "Model"]

EXAMPLES = "SmolLM2-135M/360M/1.7B-Instruct, Llama 3.x"


class Model(DenseModel):
    arch = "llama"
    attention_kernel = "attend"
    rope_neox = False
    rope_attn_factor = False
    head_bias = False
