"""`phi3` architecture (Phi-3-mini, Phi-3.5-mini-instruct), as llama.cpp runs it (src/models/phi3.cpp).

See docs/models.md (phi3) and engine/models/dense.py for the pass:

    n = RMSNorm(x) * attn_norm
    q, k, v = split(W_qkv n, [D, Hkv*hd, Hkv*hd])      fused rows Q | K | V (or separate q/k/v tensors)
    q, k = RoPE_neox(q, k) over the head, theta_i = p * base^(-2i/n_rot) / f_i,
           cos and sin multiplied by rope.scaling.attn_factor (always, as llama.cpp)
           f = rope_factors_long if n_ctx > rope.scaling.original_context_length else _short,
               chosen once from the configured context
    q *= 1/sqrt(hd); x += W_o softmax(q k^T + causal) v
    m = RMSNorm(x) * ffn_norm; [g | u] = W_up m; x += W_down(silu(g) * u)
    logits = W_out RMSNorm(x) * output_norm

Phi-3's sliding window (`phi3.attention.sliding_window`) is ignored, as llama.cpp ignores it.
"""

from __future__ import annotations

from engine.models.base import Args
from engine.models.dense import DenseModel

__all__ = ["Args", "Model"]

EXAMPLES = "Phi-3-mini-4k/128k-instruct, Phi-3.5-mini-instruct"


class Model(DenseModel):
    arch = "phi3"
    fused_qkv_ok = True
    fused_gate_up = True
    qkv_bias = "none"
    q_prescale = True
    rope_factors = True

    @property
    def rope_factors_kind(self) -> str:
        """"long", "short" or "none": which factors this context selected."""
        if self.rope_freq_factors is None:
            return "none"
        return "long" if self.n_ctx > self.args.n_ctx_orig else "short"
