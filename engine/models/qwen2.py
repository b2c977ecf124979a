"""`qwen2` architecture (Qwen2, Qwen2.5 dense), as llama.cpp runs it (src/models/qwen2.cpp).

As `llama` (engine/models/dense.py) but with biases on q, k and v and NEOX RoPE
(pairs (i, i + n_rot/2): the converter does not permute the q/k rows):

    q, k, v = W_q n + b_q, W_k n + b_k, W_v n + b_v
    q, k = RoPE_neox(q, k); x += W_o softmax(q k^T / sqrt(hd) + causal) v
    x += W_down(silu(W_gate m) * W_up m)
"""

from __future__ import annotations

from engine.models.base import Args
from engine.models.dense import DenseModel

__all__ = ["Args", "Model"]

EXAMPLES = "Qwen2.5-0.5B/1.5B/3B/7B-Instruct, Qwen2.5-Coder"


class Model(DenseModel):
    arch = "qwen2"
    qkv_bias = "required"
