"""Speculative decoding: a cheap drafter guesses the next tokens, the model checks them all in
one forward pass, and the output is exactly what plain decoding would have produced.

Exactness. A batch through the prefill GEMM sums in another order than decode's row kernels,
so its logits differ from one-token steps in the last bits, and greedy ids can differ. The
verification pass therefore runs `model.forward(..., token_exact=True)`: decode's row kernels
(each weight row read once for all drafted tokens, every token in its own accumulator, in
decode's order) and decode's single-query attention, query by query. Its rows equal T
one-token steps bit for bit (tests/engine/test_speculative.py checks every architecture).

Rollback. The pass feeds [the last sampled token, d1..dk]. When d_{m+1} is rejected the cache
must hold the state after d_m exactly: attention KV is trimmed; DeltaNet layers keep their
state from before the pass and the pass's inputs to the recurrence (engine.cache.start_trail /
rewind, cache.Replay): a rejection restores that state and feeds the accepted tokens' inputs
again, the conv and the delta rule only (no weight is read again; a snapshot after every
token copied 2 MB a layer per token).

Sampling (temperature > 0). Drafts are deterministic (a point mass q = 1 on the drafted
token), so the standard rule min(1, p/q) becomes: accept d with probability p(d), where p is
the model's distribution after the same sampler chain (penalties, top-k, top-p, min-p,
temperature); on rejection sample from p with d removed. Each output token is then
distributed exactly as plain sampling would draw it.

Drafters:
- LookupDrafter: prompt lookup, the longest recent n-gram of the context that occurred
  before, continued by what followed it then (no second model).
- ModelDrafter: a small model with the same vocabulary, greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import time

import numpy as np

from engine.cache import CacheTrimError, rewind, start_trail, stop_trail
from engine.errors import DeltatalkError

MODES = ("off", "lookup", "draft", "mtp")
DEFAULT_DRAFT_MAX = 8


class DraftModelError(DeltatalkError):
    """A draft model that cannot draft for this model (the message says why)."""


@dataclass
class SpeculationStats:
    drafted: int = 0        # draft tokens checked
    accepted: int = 0       # of those, accepted
    steps: int = 0          # verification passes (a pass with no draft is a plain decode step)
    tokens: int = 0         # tokens produced by those passes (accepted + the model's own)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance": round(self.acceptance, 4),
                "steps": self.steps, "tokens_per_step": round(self.tokens_per_step, 3)}


class LookupDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens
    (the longest n up to max_ngram, at least min_ngram) and propose the tokens that followed it.

    At least 3 tokens must match: drafts from 2-token matches were accepted 29% of the time on
    the bench's code prompt against 65% from longer ones (2-vCPU Xeon). The match length is
    the draft's `evidence`: the policy learns how far each length is trusted (text being
    copied matches long; free prose matches 3 tokens of a common phrase).

    The context's min_ngram-grams are kept in an index (n-gram -> where each one ends), grown
    as the context grows, so a step looks up its last min_ngram tokens and extends the few
    matches backwards instead of scanning the whole context: on free prose, where most steps
    draft nothing, the scan cost 1-2% of decode (SmolLM2-135M, 2-vCPU Xeon)."""

    name = "lookup"
    free = True   # proposing costs no forward pass: propose the most, let the policy trim

    def __init__(self, max_ngram: int = 6, min_ngram: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._ctx: list[int] = []
        self._ends: dict[tuple, list[int]] = {}   # min_ngram-gram -> positions of its last token
        self.evidence = 0   # the last proposal's match length (0: none)

    @staticmethod
    def prior(match: int) -> float:
        """How likely a draft token from a match of this length is taken, before any is seen:
        3 tokens are often a common phrase, 6 most often a copy."""
        return min(0.85, 0.3 + 0.1 * match)

    def _sync(self, context: Sequence[int]) -> list[int]:
        """The context, with the index grown by what was appended since the last call (started
        over when it is not a continuation: another conversation, or a rewind)."""
        ctx, L = self._ctx, len(context)
        n = len(ctx)
        if n > L or (n and ctx[n - 1] != int(context[n - 1])):
            ctx.clear()
            self._ends.clear()
            n = 0
        m = self.min_ngram
        for p in range(n, L):
            ctx.append(int(context[p]))
            if p >= m - 1:
                self._ends.setdefault(tuple(ctx[p - m + 1 : p + 1]), []).append(p)
        return ctx

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = self._sync(context)
        L = len(ctx)
        self.evidence = 0
        if k <= 0 or self.min_ngram + 1 > L:
            return []
        m, top = self.min_ngram, self.max_ngram
        ends = self._ends.get(tuple(ctx[L - m :]), ())
        best, best_n = -1, 0
        for j in reversed(ends):      # most recent first: a longer match must beat it strictly
            if j >= L - 1:            # the context's own end (nothing follows it)
                continue
            n = m
            while n < top and j - n >= 0 and ctx[j - n] == ctx[L - 1 - n]:
                n += 1
            if n > best_n:
                best, best_n = j, n
                if n == top:
                    break
        if best < 0:
            return []
        self.evidence = best_n
        return ctx[best + 1 : best + 1 + k]


def check_draft_compatible(target, draft) -> None:
    """Raise DraftModelError unless `draft` (a LoadedModel) can draft for `target`: the same
    vocabulary (size and every token's text) and the same end-of-generation tokens."""
    tt, dt = target.tokenizer, draft.tokenizer
    if target.model.n_vocab != draft.model.n_vocab or tt.vocab_size != dt.vocab_size:
        raise DraftModelError(f"{draft.path.name} cannot draft for {target.path.name}: vocabulary sizes differ "
                              f"({dt.vocab_size} tokens / {draft.model.n_vocab} logits vs "
                              f"{tt.vocab_size} / {target.model.n_vocab})")
    ids = np.arange(tt.vocab_size)
    for lo in range(0, tt.vocab_size, 4096):
        part = ids[lo : lo + 4096].tolist()
        a, b = [tt.token_text(i) for i in part], [dt.token_text(i) for i in part]
        if a != b:
            i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y) + lo
            raise DraftModelError(f"{draft.path.name} cannot draft for {target.path.name}: token {i} is "
                                  f"{dt.token_text(i)!r} there but {tt.token_text(i)!r} here")
    if tt.eog_ids != dt.eog_ids:
        raise DraftModelError(f"{draft.path.name} cannot draft for {target.path.name}: end-of-generation "
                              f"tokens differ ({sorted(dt.eog_ids)} vs {sorted(tt.eog_ids)})")


class ModelDrafter:
    """A small model with the same vocabulary drafts greedily. Its cache follows the
    context by common prefix: trimmed (KV) or restored from its trail (recurrent layers)
    to the accepted part, then fed what is new."""

    name = "draft"

    def __init__(self, target, draft, prefill_chunk: int = 128):
        check_draft_compatible(target, draft)
        self.loaded = draft
        self.model = draft.model
        self.cache = self.model.make_cache()
        self.fed: list[int] = []
        self.chunk = prefill_chunk

    def _rewind(self, keep: int) -> int:
        try:
            rewind(self.cache, keep)
        except CacheTrimError:  # no snapshot there (another conversation): start over
            stop_trail(self.cache)
            for c in self.cache:
                c.trim(c.offset)
            keep = 0
        del self.fed[keep:]
        return keep

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not context:
            return []
        room = self.model.n_ctx - len(context)
        k = min(k, room)
        if k <= 0:
            return []
        keep = 0
        n = min(len(self.fed), len(context) - 1)   # feed >= 1 token: its logits start the draft
        while keep < n and self.fed[keep] == context[keep]:
            keep += 1
        self._rewind(keep)
        new = list(context[len(self.fed):])
        logits = None
        for i in range(0, len(new), self.chunk):
            part = new[i : i + self.chunk]
            last = i + self.chunk >= len(new)
            logits = self.model.forward(part, self.cache, logits="last" if last else "none")
            self.fed.extend(part)
        assert logits is not None   # keep < len(context): at least one token was fed
        start_trail(self.cache)   # the drafted positions can be rolled back next time
        drafts = []
        for i in range(k):
            tok = int(np.argmax(logits[-1]))
            drafts.append(tok)
            if i < k - 1:
                logits = self.model.forward([tok], self.cache, logits="last")
                self.fed.append(tok)
        return drafts


class DraftPolicy:
    """How many tokens to draft: the k that maximises expected tokens per second, from two
    things measured as the reply runs.

    - Cost: seconds per step by tokens fed T (1 = a plain step; T > 1 includes drafting and
      verification), kept as ratios c(T) to the plain step. What a pass of T costs differs by
      machine far more than by model size: a pass of 2 was 1.33 steps on a 2-vCPU Xeon
      (AVX-512 with VNNI) but 1.74 on a 2-vCPU EPYC (Zen 4, avx2 kernels), where the 135M
      model's decode step is bound by compute, not by reading its weights.
    - Acceptance: per-token probability p that a draft continues to be accepted, by evidence
      (for lookup, the length of the n-gram match it came from: a text being copied matches
      long, free prose matches 3 tokens of a common phrase), from counts that decay so the
      estimate follows the text. Before anything is seen, the drafter's prior for its evidence
      (lookup: the longer the match, the likelier a copy), worth PRIOR_WEIGHT drafts.

    A draft of k accepted token by token with probability p yields E(k) = 1 + p + ... + p^k
    tokens for c(k + 1) steps; k = 0 (a plain step) yields 1 for 1. Drafting needs a margin
    over that. With `explore` (a free drafter: lookup), evidence not drafted from for
    EXPLORE_AFTER proposals gets a one-token draft, so the estimate can recover when the text
    changes within a reply (a pass of 2 per EXPLORE_AFTER proposals where every such draft
    fails: well under 1% of free prose's time, where few steps find a match at all). The Speculator adds to the drafter's evidence
    whether the step before took a whole draft (see Speculator.STREAK_PRIOR).

    Costs are relative to a plain step, so the first step of a policy is plain, and so is one
    after YARDSTICK_AFTER passes in a row (a draft model that always has a draft would
    otherwise be priced by the prior alone).

    Replaced a fixed rule (double k while drafts are taken whole, pause after misses) that
    cost free prose 7% on the EPYC (0.93x plain), where this policy keeps it at 1.00x."""

    PRIOR_WEIGHT = 3.0    # pseudo-drafts behind the prior
    DEFAULT_PRIOR = 2 / 3
    DECAY = 0.8           # per draft from the same evidence: about the last five count
    EXPLORE_AFTER = 8
    PRIOR_SLOPE = 0.35    # c(T) = 1 + slope (T - 1) until a pass of T has been timed
    MARGIN = 1.05         # drafting must promise 5% more tokens per second than a plain step
    EMA = 0.2
    YARDSTICK_AFTER = 32  # passes in a row before a plain step is timed again

    def __init__(self, k_max: int, adaptive: bool = True, prior=None, explore: bool = True):
        if k_max < 1:
            raise ValueError(f"--draft-max must be >= 1, got {k_max}")
        self.k_max, self.adaptive, self.explore = k_max, adaptive, explore
        self.prior = prior or (lambda evidence: self.DEFAULT_PRIOR)   # evidence -> p before any draft
        self.step_seconds: dict[int, float] = {}        # T -> EMA of a step's seconds
        self.counts: dict[object, list[float]] = {}     # evidence -> [accepted, rejected] (decayed)
        self.skipped: dict[object, int] = {}            # evidence -> proposals passed over since its last draft
        self.passes_since_plain = 0

    def cost(self, T: int) -> float:
        """A step feeding T tokens, in plain steps."""
        if T <= 1:
            return 1.0
        one = self.step_seconds.get(1)
        if not one:
            return 1.0 + self.PRIOR_SLOPE * (T - 1)
        t = self.step_seconds.get(T)
        if t:
            return max(1.0, t / one)
        # not timed yet: the slope of the nearest length that was (this machine, not the prior;
        # longer passes cost less per token, as the 4-token tiles fill)
        timed = [n for n in self.step_seconds if n > 1]
        if not timed:
            return 1.0 + self.PRIOR_SLOPE * (T - 1)
        n = min(timed, key=lambda n: (abs(n - T), -n))
        slope = (self.step_seconds[n] / one - 1.0) / (n - 1)
        return 1.0 + max(0.0, slope) * (T - 1)

    def p(self, evidence) -> float:
        a, r = self.counts.get(evidence, (0.0, 0.0))
        return (a + self.PRIOR_WEIGHT * self.prior(evidence)) / (a + r + self.PRIOR_WEIGHT)

    def choose(self, evidence, k_avail: int) -> int:
        """The draft length (0: a plain step) for up to k_avail drafted tokens on this evidence."""
        k_avail = min(k_avail, self.k_max)
        if not self.adaptive or k_avail <= 0:
            return max(0, k_avail)
        # every cost is relative to a plain step: time one first, and again now and then (the
        # thread count and the machine's load change); a drafter that always has a draft (a
        # model) would otherwise be priced by the prior forever
        if 1 not in self.step_seconds or self.passes_since_plain >= self.YARDSTICK_AFTER:
            return 0
        p = self.p(evidence)
        best_k, best = 0, self.MARGIN
        expected, pk = 1.0, 1.0
        for k in range(1, k_avail + 1):
            pk *= p
            expected += pk
            if tile_fit(k) != k:
                continue
            rate = expected / self.cost(k + 1)
            if rate > best:
                best_k, best = k, rate
        if best_k == 0:
            self.skipped[evidence] = self.skipped.get(evidence, 0) + 1
            if not self.explore or self.skipped[evidence] < self.EXPLORE_AFTER:
                return 0
            best_k = 1
        self.skipped[evidence] = 0
        return best_k

    def timed(self, fed: int, seconds: float) -> None:
        """A step that fed `fed` tokens took `seconds` (drafting and verification)."""
        if seconds <= 0:
            return
        self.passes_since_plain = 0 if fed == 1 else self.passes_since_plain + 1
        old, one = self.step_seconds.get(fed), self.step_seconds.get(1)
        if old is None:
            # a pass of T never costs more than T plain steps: a first timing slowed by the
            # machine would otherwise keep that length from being drafted (and timed) again
            self.step_seconds[fed] = min(seconds, fed * one) if one and fed > 1 else seconds
        else:   # a step slowed by the machine (another process, a page fault) counts at most double
            self.step_seconds[fed] = old + self.EMA * (min(seconds, 2 * old) - old)

    def judged(self, evidence, accepted: int, rejected: bool) -> None:
        """A draft from `evidence`: its first `accepted` tokens were taken, then one was
        rejected (or not: the draft ran out, or a stop id or the token limit cut it)."""
        c = self.counts.setdefault(evidence, [0.0, 0.0])
        c[0] = c[0] * self.DECAY + accepted
        c[1] = c[1] * self.DECAY + (1.0 if rejected else 0.0)


# The row kernels decode each weight block once per 4-token tile and once for the 2 or 3
# tokens left after the tiles, but a single token left after them takes a row pass of its own:
# a pass of T = 5 costs a pass of 4 plus most of a decode step. Measured (SmolLM2-135M Q4_1,
# 2 threads, Xeon with AVX-512, ms): T = 1..9 -> 8.4, 11.3, 13.5, 16.4, 20.2, 22.8, 25.3, 28.3,
# 31.8. A draft of k tokens is verified in a pass of k + 1.
TILE = 4


def tile_fit(k: int) -> int:
    """The draft length to use for at most k: k, one fewer where k + 1 would leave a lone
    token after whole tiles (k + 1 = 5, 9, 13, ...)."""
    if k <= 0:
        return 0
    return k - 1 if k + 1 > TILE and (k + 1) % TILE == 1 else k


class Speculator:
    """Drafter + draft policy + verification; one per generation setting (it keeps stats,
    the policy's measurements and, for a draft model, that model's cache)."""

    STREAK_PRIOR = 0.9   # after a draft taken whole, before the policy has seen any such

    def __init__(self, drafter, draft_max: int = DEFAULT_DRAFT_MAX, adaptive: bool = True):
        self.drafter = drafter
        self.free = getattr(drafter, "free", False)   # proposing costs no forward pass (lookup)
        drafter_prior = getattr(drafter, "prior", lambda e: DraftPolicy.DEFAULT_PRIOR)
        # evidence: (the drafter's own, whether the step before took a whole draft): a text
        # being copied is taken draft after draft, then fails where it diverges. Probes only
        # where proposing is free: a draft model's probe first catches its cache up on
        # everything since its last draft (a prompt's worth, the first time).
        self.policy = DraftPolicy(draft_max, adaptive,
                                  lambda ev: self.STREAK_PRIOR if ev[1] else drafter_prior(ev[0]),
                                  explore=self.free)
        self.streak = False   # the last step's draft was taken whole
        self.stats = SpeculationStats()
        self.last_fed = 0   # tokens the last step fed (1: it was a plain step)

    @property
    def mode(self) -> str:
        return self.drafter.name

    def _draft(self, context: list[int], k_cap: int) -> tuple[list[int], object]:
        """The draft for this step and the evidence it came from. A free drafter (lookup)
        proposes first and the policy trims by how far its evidence is trusted; a drafter
        that costs a forward pass per token is asked only for what the policy wants."""
        if k_cap <= 0:
            return [], None
        if self.free:
            draft = self.drafter.propose(context, k_cap)
            evidence = (self.drafter.evidence, self.streak)
            k = self.policy.choose(evidence, len(draft)) if draft else 0
        else:
            evidence = (None, self.streak)
            k = self.policy.choose(evidence, k_cap)
            draft = self.drafter.propose(context, k) if k > 0 else []
        return [int(d) for d in draft[: tile_fit(k)]], evidence

    def step(self, model, cache, token: int, seen: list[int], sampler, processors=(), limit: int = 1 << 30,
             stop_ids: frozenset = frozenset()) -> list[tuple[int, np.ndarray]]:
        """Feed `token` (sampled, not yet in the cache) and a draft; return the tokens sampled
        after it with their logits rows: the accepted drafts, then the model's own token
        (1 to k+1 tokens, at most `limit`, ending at a stop id). The cache then holds `token`
        and every returned token but the last, exactly as plain decoding would have left it."""
        t0 = time.perf_counter()
        p0 = cache[0].offset
        k_cap = tile_fit(min(self.policy.k_max, limit - 1, model.n_ctx - p0 - 1))
        context = list(seen) + [token]
        draft, evidence = self._draft(context, k_cap)
        self.stats.steps += 1
        self.last_fed = 1 + len(draft)
        if not draft:
            self.streak = False
            row = model.forward([token], cache, logits="last")[-1]
            self.policy.timed(1, time.perf_counter() - t0)
            out = [(_sample(sampler, processors, context, row), row)]
            self.stats.tokens += 1
            return out
        start_trail(cache)
        try:
            rows = model.forward([token] + draft, cache, logits="all", token_exact=True)
            self.policy.timed(1 + len(draft), time.perf_counter() - t0)
            out = []
            accepted, rejected = 0, False
            hist = context
            for i, d in enumerate(draft):
                t = _accept(sampler, processors, hist, rows[i], d)
                out.append((t, rows[i]))
                if t != d:
                    rejected = True
                    break
                accepted += 1
                if t in stop_ids or len(out) >= limit:
                    break
                hist = hist + [t]
            else:
                out.append((_sample(sampler, processors, hist, rows[len(draft)]), rows[len(draft)]))
            rewind(cache, p0 + len(out))   # token + all returned but the last
        finally:   # rewind ended the trail; on an error on the way, end it here (or every later
            stop_trail(cache)   # forward would keep adding its inputs to it)
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted
        self.stats.tokens += len(out)
        self.policy.judged(evidence, accepted, rejected)
        self.streak = not rejected
        return out


def _processed(processors, hist, row):
    for proc in processors:
        row = proc(hist, row)
    return row


def _sample(sampler, processors, hist, row) -> int:
    return sampler(_processed(processors, hist, row))


def _accept(sampler, processors, hist, row, d: int) -> int:
    """The token at this position given draft d: d itself, or the model's own choice."""
    row = _processed(processors, hist, row)
    if sampler.greedy:
        return int(np.argmax(row))
    ids, p = sampler.distribution(row)
    at = ids == d
    p_d = float(p[at].sum())
    if sampler.rng.random() < p_d:
        return d
    rest = np.where(at, 0.0, p)
    total = rest.sum()
    if total <= 0.0:   # p_d rounds to 1 but the draw fell above it
        return d
    return int(ids[sampler.rng.choice(len(ids), p=rest / total)])


def make_speculator(mode: str, target, draft=None, draft_max: int = DEFAULT_DRAFT_MAX,
                    adaptive: bool = True) -> Speculator | None:
    """The Speculator for a --speculate mode ("off" -> None). target, draft: LoadedModel."""
    if mode not in MODES:
        raise ValueError(f"--speculate must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return None
    if mode == "lookup":
        return Speculator(LookupDrafter(), draft_max, adaptive)
    if mode == "draft":
        if draft is None:
            raise DraftModelError("--speculate draft needs --draft MODEL (a small model with the same vocabulary)")
        return Speculator(ModelDrafter(target, draft), draft_max, adaptive)
    if mode == "mtp":
        from engine.mtp import MTPDrafter, MTPUnavailableError

        try:
            return Speculator(MTPDrafter(target), draft_max, adaptive)
        except MTPUnavailableError as e:
            raise DraftModelError(str(e)) from None
    raise DeltatalkError(f"--speculate {mode} is not handled")   # unreachable: MODES is checked above
