"""Sampling: a function built once from the settings, applied to one logits row.

The chain follows llama.cpp's default order: repetition penalty, top-k, top-p, min-p,
temperature, then a draw. temperature <= 0 is greedy (argmax, ties to the lowest id).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from engine.errors import InvalidSettingError, ModelOutputError

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


@dataclass
class SamplingSettings:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> SamplingSettings:
        """Raise InvalidSettingError (a ValueError) naming the first value out of its range."""
        def bad(msg):
            raise InvalidSettingError(msg)

        values = asdict(self)
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        for name in ("top_k", "repeat_last_n"):
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f"{name} must be an integer, got {v!r}")
        if self.temperature < 0:
            bad("temperature must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            bad("top_k must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            bad("min_p must be in [0, 1)")
        if self.repeat_penalty <= 0:
            bad("repeat_penalty must be > 0 (1 disables it)")
        if self.repeat_last_n < 0:
            bad("repeat_last_n must be >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            bad(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        return self


def finite_candidates(logits: np.ndarray) -> np.ndarray | None:
    """The ids a sampler may draw from when `logits` holds non-finite values, or None if all are finite.

    NaN and -inf are never drawn; if any logit is +inf, only those are (they dominate every finite
    value). Nothing left -> ModelOutputError: the numbers are garbage, usually damaged weights.
    """
    finite = np.isfinite(logits)
    if finite.all():
        return None
    pos_inf = np.flatnonzero(np.isposinf(logits))
    if len(pos_inf):
        return pos_inf
    ids = np.flatnonzero(finite)
    if len(ids) == 0:
        raise ModelOutputError("the model produced no finite logits (all NaN or infinite): "
                               "its weights are probably damaged")
    return ids


def greedy_token(logits: np.ndarray) -> int:
    """argmax (ties to the lowest id) over the drawable logits."""
    logits = np.asarray(logits)
    ids = finite_candidates(logits)
    if ids is None:
        return int(np.argmax(logits))
    return int(ids[np.argmax(logits[ids])])  # all +inf: the lowest id, as argmax would


def chain_distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                       min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The chain top-k, top-p, min-p, temperature: (token ids, their probabilities), sorted by
    logit. What a draw samples from (and speculative acceptance reads). temperature > 0."""
    logits = np.asarray(logits, dtype=np.float64)
    ids = np.arange(logits.shape[0])
    masked = finite_candidates(logits)
    if masked is not None:
        # +inf logits: equal among themselves; otherwise the finite ones only
        ids = masked
        logits = np.zeros(len(ids)) if np.isposinf(logits[ids[0]]) else logits[ids]
    if 0 < top_k < logits.shape[0]:
        keep = np.argpartition(-logits, top_k - 1)[:top_k]
        ids, logits = ids[keep], logits[keep]
    order = np.argsort(-logits, kind="stable")
    ids, logits = ids[order], logits[order]
    probs = np.exp(logits - logits[0])
    probs /= probs.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        ids, logits, probs = ids[:cut], logits[:cut], probs[:cut]
    if min_p > 0.0:
        keep = probs >= min_p * probs[0]
        ids, logits = ids[keep], logits[keep]
    scaled = (logits - logits[0]) / temperature  # <= 0: no overflow even at a tiny temperature
    p = np.exp(scaled)
    p /= p.sum()
    return ids, p


class ChainSampler:
    """A Sampler (callable on one logits row) that also exposes its distribution and random
    generator, for speculative decoding's acceptance rule. temperature <= 0: greedy."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None):
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.greedy = temperature <= 0
        self.rng = np.random.default_rng(seed)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.greedy:  # a point mass on the argmax (ties to the lowest id)
            return np.array([greedy_token(logits)]), np.array([1.0])
        return chain_distribution(logits, self.temperature, self.top_k, self.top_p, self.min_p)

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return greedy_token(logits)
        ids, p = self.distribution(logits)
        return int(ids[self.rng.choice(len(ids), p=p)])


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> ChainSampler:
    return ChainSampler(temperature, top_k, top_p, min_p, seed)


def make_repetition_penalty(penalty: float, last_n: int = 64) -> LogitsProcessor:
    """llama.cpp's rule: a seen token's logit is divided by the penalty if positive, else multiplied."""

    def process(history: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if last_n <= 0:
            return logits
        recent = np.unique(np.asarray(history[-last_n:], dtype=np.int64))
        if len(recent) == 0:
            return logits
        logits = logits.copy()
        vals = logits[recent]
        logits[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits

    return process


def make_logits_processors(repeat_penalty: float = 1.0, repeat_last_n: int = 64) -> list[LogitsProcessor]:
    procs: list[LogitsProcessor] = []
    if repeat_penalty != 1.0:
        procs.append(make_repetition_penalty(repeat_penalty, repeat_last_n))
    return procs


def from_settings(s: SamplingSettings) -> tuple[Sampler, list[LogitsProcessor]]:
    s.validate()
    return (make_sampler(s.temperature, s.top_k, s.top_p, s.min_p, s.seed),
            make_logits_processors(s.repeat_penalty, s.repeat_last_n))
