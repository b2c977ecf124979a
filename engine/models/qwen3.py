"""`qwen3` architecture (Qwen3 dense), as llama.cpp runs it (src/models/qwen3.cpp).

As `qwen2` (engine/models/dense.py) without the biases and with a per-head RMSNorm of q and k
(weights attn_q_norm / attn_k_norm, [hd]) before NEOX RoPE. hd comes from
`qwen3.attention.key_length` (Hq*hd may differ from D).
"""

from __future__ import annotations

from engine.models.base import Args
from engine.models.dense import DenseModel

__all__ = ["Args", "Model"]

EXAMPLES = "Qwen3-0.6B/1.7B/4B/8B"


class Model(DenseModel):
    arch = "qwen3"
    qk_norm = True
