"""What every architecture shares: reading its tensors and hyperparameters, the forward
preamble, the embedding, the output head and the per-forward work buffers.

An architecture module subclasses `BaseModel` (dense transformers go through
`engine.models.dense.DenseModel`, which adds the layer loop) and declares its numerics as
class fields; docs/models.md walks through each architecture and docs/ARCHITECTURE.md has
the table of which llama.cpp configuration each choice matches.

    forward(tokens, cache, logits)
        run = self.begin(tokens, cache, logits)     token range, logits mode, cache layers/positions,
                                                    context room; the RunState for this T
        x = self.embed(run.tokens)                  (T, D) dequantized rows [* sqrt(D)]
        ... the architecture's layers, writing into x ...
        return self.head(x, logits, token_exact)    RMSNorm * output_norm, W_out [+ output.bias]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

import numpy as np

from engine import ops
from engine.cache import Cache
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile, TensorInfo
from engine.quants.linear import QuantLinear, get_format

LOGITS_MODES = ("last", "all", "none")


# --------------------------------------------------------------------------- tensors
def tensor(gf: GGUFFile, name: str, shape: tuple[int, ...]) -> TensorInfo:
    """The tensor's header, checked to exist with this shape (GGUF order: [n_in, n_out])."""
    t = gf.tensors.get(name)
    if t is None:
        raise ModelFileError(gf.path, f"tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape):
        raise ModelFileError(gf.path, f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def linear(gf: GGUFFile, name: str, n_in: int, n_out: int) -> QuantLinear:
    """A weight matrix, kept in its file format (never expanded to float)."""
    t = tensor(gf, name, (n_in, n_out))
    return QuantLinear(gf.tensor_bytes(name), t.ggml_type, n_in, n_out, name=name)


def vector(gf: GGUFFile, name: str, n: int) -> np.ndarray:
    """A norm weight, bias or other small vector, as contiguous float32."""
    tensor(gf, name, (n,))
    return np.ascontiguousarray(gf.tensor_float(name), dtype=np.float32)


def optional_vector(gf: GGUFFile, name: str, n: int) -> np.ndarray | None:
    return vector(gf, name, n) if name in gf.tensors else None


# --------------------------------------------------------------------------- hyperparameters
class HParams:
    """Reads the `{arch}.*` metadata of one file; `bad()` raises the file's one-line error."""

    def __init__(self, gf: GGUFFile, arch: str):
        self.gf, self.arch = gf, arch

    def __call__(self, name: str, kind: Any = int, default: Any = None) -> Any:
        full = f"{self.arch}.{name}"
        if default is None:
            return self.gf.require(full, kind)
        return self.gf.get(full, default, kind=kind)

    def bad(self, problem: str) -> NoReturn:
        raise ModelFileError(self.gf.path, problem)

    def n_vocab(self) -> int:
        """Rows of token_embd.weight (the vocabulary the model scores)."""
        tok = self.gf.tensors.get("token_embd.weight")
        if tok is None:
            self.bad("tensor 'token_embd.weight' is missing")
        if len(tok.shape) != 2:
            self.bad(f"tensor 'token_embd.weight' has shape {list(tok.shape)}, expected 2 dimensions")
        return int(tok.shape[1])

    def attention(self, norm_eps: float, n_ctx_train: int) -> dict[str, Any]:
        """The keys every attention transformer has (defaults: llama.cpp's for this arch)."""
        d_model = self("embedding_length")
        n_head = self("attention.head_count")
        if not isinstance(n_head, int):
            self.bad(f"{self.arch}.attention.head_count must be one number (per-layer head counts are not supported)")
        head_dim = self("attention.key_length", default=d_model // max(n_head, 1))
        if self("attention.value_length", default=head_dim) != head_dim:
            self.bad("attention.value_length differs from key_length (not supported)")
        return dict(
            d_model=d_model, n_ff=self("feed_forward_length"), n_head=n_head,
            n_head_kv=self("attention.head_count_kv", default=n_head), head_dim=head_dim,
            n_rot=self("rope.dimension_count", default=head_dim),
            rope_base=float(self("rope.freq_base", (int, float), default=10000.0)),
            norm_eps=float(self("attention.layer_norm_rms_epsilon", (int, float), default=norm_eps)),
            n_vocab=self.n_vocab(), n_ctx_train=self("context_length", default=n_ctx_train))

    def check_attention(self, a: Any, min_rot: int = 2) -> None:
        """The checks every attention transformer's Args passes (before any buffer is shaped by it)."""
        if min(a.n_layer, a.d_model, a.n_ff, a.n_head, a.n_head_kv, a.head_dim, a.n_ctx_train, a.n_vocab) <= 0:
            self.bad(f"invalid hyperparameters {a}")
        if not np.isfinite(a.rope_base) or a.rope_base <= 0 or not 0 < a.norm_eps < 1:
            self.bad(f"invalid rope base / norm eps {a}")
        if a.n_head % a.n_head_kv or a.n_rot > a.head_dim or a.n_rot % 2 or a.n_rot < min_rot:
            self.bad(f"inconsistent attention shape {a}")
        if a.n_layer > 4096 or a.head_dim > 4096:
            self.bad(f"implausible sizes {a}")


@dataclass(frozen=True)
class Args:
    """Hyperparameters of a dense attention transformer (llama, phi3, qwen2, qwen3, gemma3)."""

    n_layer: int
    d_model: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_base: float
    rope_freq_scale: float
    norm_eps: float
    n_vocab: int
    n_ctx_train: int
    n_ctx_orig: int            # rope.scaling.original_context_length (phi3 long/short factors)
    rope_attn_factor: float    # rope.scaling.attn_factor (multiplies cos and sin)
    sliding_window: int = 0    # gemma3: keys within this many positions (0 = none)
    swa_layers: tuple[bool, ...] = field(default=())   # per layer: True = sliding-window layer
    rope_base_swa: float = 0.0  # gemma3: RoPE base of the sliding-window layers

    @classmethod
    def from_gguf(cls, gf: GGUFFile, arch: str) -> Args:
        r = HParams(gf, arch)
        common = r.attention(norm_eps=1e-5, n_ctx_train=2048)
        scaling = gf.get(f"{arch}.rope.scaling.type", "none", kind=str)
        freq_scale = 1.0
        if scaling == "linear":
            factor = float(gf.get(f"{arch}.rope.scaling.factor", 1.0, kind=(int, float)))
            if not factor > 0:
                r.bad(f"rope.scaling.factor {factor} is not positive")
            freq_scale = 1.0 / factor
        elif scaling not in ("none", ""):
            raise ModelFileError(gf.path, f"rope scaling {scaling!r} is not supported", "none, linear")
        args = cls(
            n_layer=r("block_count"), rope_freq_scale=float(freq_scale),
            n_ctx_orig=r("rope.scaling.original_context_length", default=common["n_ctx_train"]),
            rope_attn_factor=float(r("rope.scaling.attn_factor", (int, float), default=1.0)), **common)
        r.check_attention(args)
        if args.n_ctx_orig <= 0:
            r.bad(f"invalid rope.scaling.original_context_length {args.n_ctx_orig}")
        if not np.isfinite(args.rope_attn_factor) or not 0 < args.rope_attn_factor < 100:
            r.bad(f"invalid rope.scaling.attn_factor {args.rope_attn_factor}")
        return args


# --------------------------------------------------------------------------- running
class RunState:
    """Work buffers of one forward call of T tokens, reused by the next call of the same T
    (every decode step has T == 1): no per-layer allocation for them. A model runs one
    forward at a time (on the kernel thread), so one set per T is enough. Each architecture
    subclasses it with its buffers as fields (llama2.c's RunState, per T)."""

    def __init__(self, T: int):
        self.T = T
        self.tokens = np.empty(0, dtype=np.int64)   # this call's tokens (T,)
        self.p0 = 0                                 # this call's first position

    @staticmethod
    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)


R = TypeVar("R", bound=RunState)


class BaseModel(Generic[R]):
    """Embedding, output head and the checks of every forward; subclasses add the layers."""

    arch: ClassVar[str] = "?"
    embd_scale: ClassVar[bool] = False   # embeddings * sqrt(D) (gemma3)
    head_bias: ClassVar[bool] = False    # accept output.bias [V] (phi3's graph adds it when present)
    MAX_RUN_STATES: ClassVar[int] = 4    # T values kept (decode's 1, the prefill chunk, a few more)

    args: Any       # the architecture's Args
    layers: list    # the architecture's layer objects, in order

    def __init__(self, gf: GGUFFile, n_ctx: int | None, args: Any):
        self.args = args
        self.n_ctx = int(n_ctx or min(args.n_ctx_train, 8192))
        if self.n_ctx <= 0:
            raise ModelFileError(gf.path, f"invalid context size {self.n_ctx}")
        D, V = args.d_model, args.n_vocab
        emb = tensor(gf, "token_embd.weight", (D, V))
        self.token_embd = gf.tensor_bytes("token_embd.weight")  # (V, row_bytes) blocks
        self.embd_format = get_format(emb.ggml_type)
        self.output_norm = vector(gf, "output_norm.weight", D)
        if "output.weight" in gf.tensors:
            self.output = linear(gf, "output.weight", D, V)
        else:  # tied head: the embedding matrix, still quantized
            self.output = QuantLinear(self.token_embd, emb.ggml_type, D, V, name="token_embd.weight")
        self.output_bias = optional_vector(gf, "output.bias", V) if self.head_bias else None
        self.weight_bytes = sum(t.nbytes for t in gf.tensors.values())
        self._runs: dict[int, R] = {}

    @property
    def n_vocab(self) -> int:
        return int(self.args.n_vocab)

    def make_cache(self) -> list[Cache]:
        """A fresh cache, one entry per layer, for `n_ctx` positions."""
        raise NotImplementedError

    def forward(self, tokens: Any, cache: list, logits: str = "last",
                token_exact: bool = False) -> np.ndarray | None:
        """Feed tokens (T,) at the cache's current position; return logits (n, V) or None."""
        raise NotImplementedError

    def new_run_state(self, T: int) -> R:
        """The architecture's work buffers for calls of T tokens."""
        raise NotImplementedError

    def begin(self, tokens: Any, cache: list, logits: str) -> R:
        """Check one forward's input against the model and the cache; its RunState."""
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if T == 0:
            raise ValueError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= a.n_vocab:
            raise ValueError(f"token id out of range 0..{a.n_vocab - 1}")
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be 'last', 'all' or 'none', not {logits!r}")
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        p0 = cache[0].offset
        if any(c.offset != p0 for c in cache):
            raise ValueError("cache layers are at different positions")
        if p0 + T > self.n_ctx:
            raise ValueError(f"context full: {p0} + {T} tokens > {self.n_ctx}")
        run = self._runs.pop(T, None)
        if run is None:
            run = self.new_run_state(T)
        run.tokens, run.p0 = tokens, p0
        self._runs[T] = run   # most recently used last
        while len(self._runs) > self.MAX_RUN_STATES:
            del self._runs[next(iter(self._runs))]
        return run

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(self.embd_format.dequantize(self.token_embd[tokens]), dtype=np.float32)
        if self.embd_scale:
            x *= np.float32(np.sqrt(np.float32(self.args.d_model)))
        return x

    def head(self, x: np.ndarray, logits: str, token_exact: bool) -> np.ndarray | None:
        """Logits (n, V) of the positions asked for: W_out RMSNorm(x) * output_norm [+ output.bias]."""
        if logits == "none":
            return None
        rows = x[-1:] if logits == "last" else x
        h = np.empty_like(rows)
        ops.rmsnorm(np.ascontiguousarray(rows), self.output_norm, self.args.norm_eps, h)
        out = self.output.matmul(h, token_exact=token_exact)
        if self.output_bias is not None:
            out += self.output_bias
        return out
