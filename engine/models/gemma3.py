"""`gemma3` architecture (Gemma 3 text models, e.g. gemma-3-270m), as llama.cpp runs it
(its iswa graph; docs/models.md):

    x = embed(tokens) * sqrt(D)
    for each layer i:                          sliding-window layer unless i % pattern == pattern-1
        n = RMSNorm(x) * attn_norm             (norm weights hold 1 + w: the converter folded the +1)
        q, k, v = W_q n, W_k n, W_v n          hd = attention.key_length (Hq*hd != D)
        q, k = RMSNorm(q) * q_norm, RMSNorm(k) * k_norm       per head
        q, k = RoPE_neox(q, k)                 base 10000 on sliding-window layers, rope.freq_base
                                               (and linear rope scaling) on global layers
        q *= 1/sqrt(hd)
        att = softmax(q k^T + causal [+ window: keys with p - j < sliding_window]) v
        x += RMSNorm(W_o att) * post_attention_norm
        m = RMSNorm(x) * ffn_norm
        x += RMSNorm(W_down(gelu_tanh(W_gate m) * W_up m)) * post_ffw_norm
    logits = W_out RMSNorm(x) * output_norm    (tied to token_embd; no final soft-capping in the
                                               iswa graph)

llama.cpp fixes the pattern (6) and the local RoPE base (10000) in code; a file may carry
`gemma3.attention.sliding_window_pattern`, which is read when present.
"""

from __future__ import annotations

from dataclasses import replace

from engine import ops
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.models.base import Args
from engine.models.dense import DenseModel

__all__ = ["Args", "Model"]

EXAMPLES = "gemma-3-270m(-it), gemma-3-1b-it, gemma-3-4b-it (text)"
SWA_PATTERN = 6
ROPE_BASE_SWA = 10000.0


class Model(DenseModel):
    arch = "gemma3"
    qk_norm = True
    post_norms = True
    embd_scale = True
    activation = "gelu"
    q_prescale = True
    scale_in_f32 = True
    rope_attn_factor = False   # its own tables below: global and sliding-window bases

    def read_args(self, gf: GGUFFile) -> Args:
        a = Args.from_gguf(gf, self.arch)
        window = gf.get("gemma3.attention.sliding_window", 0, kind=int)
        pattern = gf.get("gemma3.attention.sliding_window_pattern", SWA_PATTERN, kind=int)
        if window < 0 or pattern < 0:
            raise ModelFileError(gf.path, f"invalid sliding window {window} / pattern {pattern}")
        swa = tuple(window > 0 and (pattern == 0 or i % pattern < pattern - 1) for i in range(a.n_layer))
        return replace(a, sliding_window=int(window), swa_layers=swa, rope_base_swa=ROPE_BASE_SWA)

    def rope_tables(self, gf: GGUFFile) -> list[ops.RopeTable]:
        a = self.args
        self.rope_freq_factors = None
        glob = ops.RopeTable(self.n_ctx, a.n_rot, a.rope_base, None, a.rope_freq_scale)
        local = ops.RopeTable(self.n_ctx, a.n_rot, a.rope_base_swa, None, 1.0) if any(a.swa_layers) else glob
        return [local if s else glob for s in a.swa_layers]

    def window(self, i: int) -> int:
        return int(self.args.sliding_window) if self.args.swa_layers[i] else 0
