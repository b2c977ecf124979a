"""Qwen3.5's multi-token-prediction (MTP, "nextn") block as a speculative drafter.

A Qwen3.5 file may carry one extra block after the trunk, `blk.{n_layer}.*` (`nextn_predict_layers`
= 1), trained to guess the token after next. As llama.cpp runs it (src/models/qwen35.cpp,
graph_mtp), for the pair (h_{p-1}, x_p) at position p:

    e = embed(x_p)                                  token_embd (or nextn.embed_tokens)   (T, D)
    h = h_{p-1}                                     the target's output-normed final hidden state
    x = W_eh [RMSNorm(e) * enorm ; RMSNorm(h) * hnorm]                  nextn.eh_proj  (2D -> D)
    x += gated attention (attn_norm, q/gate, k, v, q/k norms, RoPE at p, sigmoid gate, W_o)
                                                    its own KV cache (one attention layer)
    x += SwiGLU FFN (post_attention_norm)
    h' = RMSNorm(x) * shared_head_norm              (else output_norm): its own h_nextn
    logits = W_out h'                               shared_head_head (else the target's head)

The logits guess x_{p+1}: the same token the target's logits at p predict, from one position
less of the trunk. Chained drafting feeds the block its own h' with the drafted token at p+1.

Which pairs go where (as common/speculative.cpp's draft-mtp keeps them): the MTP cache holds,
at every position q of the conversation, the pair (h_{q-1}, x_q) made with the *target's* h
(h_{-1} = 0). A drafting step for `context` (its last token x_P sampled, not yet in the target
cache) catches the MTP cache up to P-1 from the target's hidden rows, then feeds (h_{P-1}, x_P)
(a true pair, kept) and the drafted tokens with the block's own h' (dropped afterwards: their
positions are rewritten with the target's h once the verification has run).

The target's h rows: the qwen35 model calls `hidden_sink(cache, p0, tokens, h)` after every
forward (prefill chunks, decode steps, verification passes); the drafter keeps them by position
(n_ctx x D float32, in pages touched only as the conversation grows) with the token each was made
for. A row is used only while its token still matches the context at that position; rows that
are missing (a chat state restored from disk, a drafter attached mid-conversation) count as 0,
as llama.cpp's first pair does: the drafts get worse, the output does not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine import ops
from engine.cache import KVCache, lazy_zeros
from engine.errors import DeltatalkError, ModelFileError
from engine.gguf_file import GGUFFile
from engine.models.base import linear, optional_vector, tensor, vector
from engine.models.qwen35 import AttentionLayer, Qwen35Run
from engine.quants.linear import QuantLinear, get_format

CATCH_UP_CHUNK = 128   # pairs per forward when the MTP cache catches up (a prefill's chunk)


class MTPUnavailableError(DeltatalkError):
    """A model that has no MTP block this engine can run (the message says why; make_speculator
    raises it as engine.speculative.DraftModelError)."""


def nextn_layers(loaded) -> int:
    """How many MTP blocks the file declares (qwen35: `qwen35.nextn_predict_layers`)."""
    n = loaded.gguf.get(f"{loaded.arch}.nextn_predict_layers", 0)
    return int(n) if isinstance(n, int) else 0


class MTPHead:
    """The MTP block's weights (mapped, in their file formats) and its forward pass."""

    def __init__(self, model, gf: GGUFFile):
        self.model = model
        a = model.args
        self.args = a
        i = a.n_layer                       # the first (only) block after the trunk
        p = f"blk.{i}.nextn."
        D, V = a.d_model, a.n_vocab
        if p + "eh_proj.weight" not in gf.tensors:
            raise ModelFileError(gf.path, f"the MTP block's tensor {p}eh_proj.weight is missing")
        self.layer = AttentionLayer(gf, a, i)   # attention + FFN tensors, as a trunk attention layer
        self.eh_proj = linear(gf, p + "eh_proj.weight", 2 * D, D)
        self.enorm = vector(gf, p + "enorm.weight", D)
        self.hnorm = vector(gf, p + "hnorm.weight", D)
        self.head_norm = optional_vector(gf, p + "shared_head_norm.weight", D)
        if self.head_norm is None:
            self.head_norm = model.output_norm
        self.head: QuantLinear = model.output
        if p + "shared_head_head.weight" in gf.tensors:
            self.head = linear(gf, p + "shared_head_head.weight", D, V)
        self.embd, self.embd_format = model.token_embd, model.embd_format
        if p + "embed_tokens.weight" in gf.tensors:
            t = tensor(gf, p + "embed_tokens.weight", (D, V))
            self.embd, self.embd_format = gf.tensor_bytes(p + "embed_tokens.weight"), get_format(t.ggml_type)
        self._runs: dict[int, Qwen35Run] = {}
        # bytes read per drafted token: the block, eh_proj and the head (the embedding: one row)
        self.weight_bytes = sum(t.nbytes for n, t in gf.tensors.items() if n.startswith(f"blk.{i}.")) \
            + self.head.weights.nbytes

    def make_cache(self) -> KVCache:
        a = self.args
        return KVCache(self.model.n_ctx, a.n_head_kv, a.head_dim)

    def _run(self, T: int) -> Qwen35Run:
        run = self._runs.pop(T, None)
        if run is None:
            run = Qwen35Run(T, self.args)
        self._runs[T] = run
        while len(self._runs) > 4:
            del self._runs[next(iter(self._runs))]
        return run

    def forward(self, tokens, h: np.ndarray, cache: KVCache, logits: str = "last",
                token_exact: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
        """Feed the pairs (h[t], tokens[t]) at the cache's next positions: (logits or None, h') where
        logits are (1, V) for "last", (T, V) for "all"; h' (T, D) is the block's normed output."""
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T, D = tokens.shape[0], a.d_model
        if T == 0:
            raise ValueError("MTP forward needs at least one pair")
        if tokens.min() < 0 or tokens.max() >= a.n_vocab:
            raise ValueError(f"token id out of range 0..{a.n_vocab - 1}")
        if h.shape != (T, D):
            raise ValueError(f"MTP hidden input of shape {h.shape}, expected {(T, D)}")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', not {logits!r}")
        if cache.offset + T > cache.n_ctx:
            raise ValueError(f"MTP cache full: {cache.offset} + {T} > {cache.n_ctx}")
        run = self._run(T)
        run.tokens, run.p0 = tokens, cache.offset
        eps = a.norm_eps
        e = np.ascontiguousarray(self.embd_format.dequantize(self.embd[tokens]), dtype=np.float32)
        en, hn = np.empty_like(e), np.empty_like(e)
        ops.rmsnorm(e, self.enorm, eps, en)
        ops.rmsnorm(np.ascontiguousarray(h, dtype=np.float32), self.hnorm, eps, hn)
        x = self.eh_proj.matmul(np.concatenate([en, hn], axis=1), token_exact=token_exact)   # (T, D)
        layer, n = self.layer, run.n
        ops.rmsnorm(x, layer.attn_norm, eps, n)
        x += self.model.attention_block(layer, cache, n, run, token_exact)
        ops.rmsnorm(x, layer.post_norm, eps, n)
        g, u = layer.w_gate_up.matmul(n, token_exact=token_exact)
        ops.swiglu(g, u, g)
        x += layer.w_down.matmul(g, run.f, token_exact)
        out_h = np.empty_like(x)
        ops.rmsnorm(x, self.head_norm, eps, out_h)
        if logits == "none":
            return None, out_h
        rows = out_h[-1:] if logits == "last" else out_h
        return self.head.matmul(np.ascontiguousarray(rows), token_exact=token_exact), out_h


def check_mtp_capable(target) -> None:
    """MTPUnavailableError unless `target` (a LoadedModel) is a qwen35 file with one MTP block."""
    name = target.path.name
    if target.arch != "qwen35":
        raise MTPUnavailableError(f"--speculate mtp needs a Qwen3.5 (qwen35) file with its MTP block; "
                              f"{name} is {target.arch}")
    n = nextn_layers(target)
    if n == 0:
        raise MTPUnavailableError(f"--speculate mtp: {name} has no MTP block (qwen35.nextn_predict_layers is 0; "
                              "convert the model with its mtp.* weights, or use --speculate lookup)")
    if n != 1:
        raise MTPUnavailableError(f"--speculate mtp: {name} has {n} MTP blocks; only one is supported")


class MTPDrafter:
    """Drafts with the target's own MTP block (see the module docstring for which pairs go where)."""

    name = "mtp"

    def __init__(self, target, chunk: int = CATCH_UP_CHUNK):
        check_mtp_capable(target)
        self.target = target.model
        self.head = MTPHead(target.model, target.gguf)
        self.cache = self.head.make_cache()
        n_ctx, D = self.target.n_ctx, self.target.args.d_model
        self._fed = lazy_zeros((n_ctx,), dtype=np.int64)   # x_q of the pairs in the MTP cache (0..n_fed-1)
        self.n_fed = 0
        self.hist_h = lazy_zeros((n_ctx, D))                       # the target's h by position
        self.hist_tok = lazy_zeros((n_ctx,), dtype=np.int64)       # token + 1 it was made for (0: none)
        self.chunk = chunk
        self.target.hidden_sink = self._take   # the newest drafter of a model gets its rows

    def _take(self, cache, p0: int, tokens: np.ndarray, h: np.ndarray) -> None:
        T = h.shape[0]
        if p0 < 0 or p0 + T > self.hist_h.shape[0] or h.shape[1] != self.hist_h.shape[1]:
            return   # not this model's shape: nothing to keep
        self.hist_h[p0 : p0 + T] = h
        self.hist_tok[p0 : p0 + T] = np.asarray(tokens, dtype=np.int64) + 1

    def _h_rows(self, context: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """h_{q-1} for q in lo..hi-1 (rows of the target whose token still matches the context; else 0)."""
        out = np.zeros((hi - lo, self.hist_h.shape[1]), dtype=np.float32)
        a = max(lo - 1, 0)
        if hi - 1 > a:
            ok = self.hist_tok[a : hi - 1] == context[a : hi - 1] + 1
            off = a - (lo - 1)
            out[off : off + (hi - 1 - a)][ok] = self.hist_h[a : hi - 1][ok]
        return out

    @property
    def fed(self) -> list[int]:
        """The tokens whose pairs the MTP cache holds, position by position."""
        return self._fed[: self.n_fed].tolist()

    def _keep(self, n: int) -> None:
        self.cache.trim(self.cache.offset - n)
        self.n_fed = n

    def reset(self) -> None:
        self._keep(0)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        L = len(context)
        P = L - 1                      # position of the last token (sampled, not in the target cache)
        k = min(k, self.cache.n_ctx - P)
        if k <= 0 or L == 0:
            return []
        ctx = np.asarray(context, dtype=np.int64)
        # keep the pairs whose token still matches; then (h_{q-1}, x_q) for q up to P-1
        n = min(self.n_fed, P)
        same = self._fed[:n] == ctx[:n]
        self._keep(n if same.all() else int(np.argmin(same)))
        for s in range(self.n_fed, P, self.chunk):
            e = min(s + self.chunk, P)
            self.head.forward(ctx[s:e], self._h_rows(ctx, s, e), self.cache, logits="none")
            self._fed[s:e] = ctx[s:e]
            self.n_fed = e
        # draft: (h_{P-1}, x_P) -- a true pair, kept -- then each drafted token with the block's own h
        tok, h = int(ctx[P]), self._h_rows(ctx, P, P + 1)
        drafts: list[int] = []
        for _ in range(k):
            logits, h = self.head.forward([tok], h, self.cache, logits="last")
            assert logits is not None
            tok = int(np.argmax(logits[-1]))
            drafts.append(tok)
        self._fed[P] = ctx[P]
        self._keep(P + 1)   # drafted positions go: the verification's rows rewrite them next time
        return drafts
