"""Speculative decoding changes nothing but the speed: greedy ids identical to plain decoding
(every architecture, rejections forced), the cache left exactly as plain decoding leaves it,
and at temperature > 0 the same output distribution."""

from __future__ import annotations

import numpy as np
import pytest

from engine import cache as cache_mod
from engine.generate import stream_generate
from engine.loader import load_model
from tests.engine.greedy import assert_caches_equal, greedy, session_turns
from engine.sampling import ChainSampler
from engine.speculative import (DraftModelError, LookupDrafter, ModelDrafter, Speculator,
                                check_draft_compatible, DraftPolicy, tile_fit)


class NoisyOracleDrafter:
    """Test drafter: proposes the plain-decoding continuation (known in advance) with some
    drafted tokens replaced by wrong ones, so both acceptance and rejection happen."""

    name = "oracle"

    def __init__(self, full: list[int], n_vocab: int, wrong_every: int = 3, seed: int = 0):
        self.full, self.n_vocab, self.wrong_every = full, n_vocab, wrong_every
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def propose(self, context, k):
        self.calls += 1
        n = len(context)
        truth = self.full[n : n + k]
        out = []
        for i, t in enumerate(truth):
            if (self.calls + i) % self.wrong_every == 0:
                out.append(int((t + 1 + self.rng.integers(self.n_vocab - 1)) % self.n_vocab))
            else:
                out.append(int(t))
        return out


def _check_identity(lm, prompt, n=40, draft_max=5):
    m, tok = lm.model, lm.tokenizer
    plain, plain_logits, plain_cache = greedy(m, tok, prompt, n)
    oracle = NoisyOracleDrafter(list(prompt) + plain, m.n_vocab)
    spec = Speculator(oracle, draft_max=draft_max, adaptive=False)
    ids, logits, cache = greedy(m, tok, prompt, n, spec)
    assert ids == plain
    assert np.array_equal(logits, plain_logits)   # bit for bit: the verification pass is token-exact
    assert_caches_equal(cache, plain_cache)
    assert 0 < spec.stats.accepted < spec.stats.drafted   # both acceptances and rejections happened
    return spec


@pytest.fixture(scope="module")
def arch_files(tmp_path_factory):
    from tests.arch_models import CONFIGS, write_arch
    from tests.qwen35_models import Qwen35Config, write_qwen35
    from tests.tiny_models import write_tiny_llama

    d = tmp_path_factory.mktemp("spec")
    files = {"llama": write_tiny_llama(d / "llama.gguf"),
             "qwen35": write_qwen35(d / "qwen35.gguf", Qwen35Config(n_layer=4))}
    for name, cfg in CONFIGS.items():
        files[name] = write_arch(d / f"{name}.gguf", cfg)
    return files


@pytest.mark.parametrize("arch", ["llama", "qwen35", "phi3", "qwen2", "qwen3"])
def test_token_exact_batch_equals_single_steps(arch_files, arch):
    lm = load_model(arch_files[arch])
    m = lm.model
    toks = np.random.default_rng(1).integers(0, m.n_vocab, 20).tolist()
    for T in (2, 5, 9):
        a, b = m.make_cache(), m.make_cache()
        m.forward(toks[:8], a, "none")
        m.forward(toks[:8], b, "none")
        batch = m.forward(toks[8 : 8 + T], a, "all", token_exact=True)
        steps = np.stack([m.forward([t], b, "last")[-1] for t in toks[8 : 8 + T]])
        assert np.array_equal(batch, steps), (arch, T)


@pytest.mark.parametrize("arch", ["llama", "qwen35", "phi3", "qwen2", "qwen3"])
def test_greedy_ids_identical_with_rejections(arch_files, arch):
    lm = load_model(arch_files[arch])
    prompt = np.random.default_rng(2).integers(0, lm.model.n_vocab, 12).tolist()
    _check_identity(lm, prompt)


def test_recurrent_rollback_restores_the_state_after_the_last_accepted_token(arch_files):
    lm = load_model(arch_files["qwen35"])
    m = lm.model
    toks = np.random.default_rng(3).integers(0, m.n_vocab, 16).tolist()
    a, b = m.make_cache(), m.make_cache()
    m.forward(toks[:6], a, "none")
    cache_mod.start_trail(a)
    m.forward(toks[6:14], a, "all", token_exact=True)
    cache_mod.rewind(a, 9)
    m.forward(toks[:9], b, "none")
    assert_caches_equal(a, b)
    assert all(c.trail is None for c in a if c.kind == "recurrent")
    with pytest.raises(cache_mod.CacheTrimError):
        cache_mod.rewind(a, 7)   # the trail is gone: no snapshot there any more


def test_a_pass_rewinds_to_every_position_it_fed_by_replaying_the_recurrence(arch_files):
    """A pass of 8 tokens keeps one start state per recurrent layer and its inputs (no copy per
    token); a rewind to any position from the pass's start to its end lands on the state plain
    feeding gives; the next pass reuses the start-state buffers; before the start: refused."""
    lm = load_model(arch_files["qwen35"])
    m = lm.model
    toks = np.random.default_rng(4).integers(0, m.n_vocab, 16).tolist()

    def plain(n):
        c = m.make_cache()
        m.forward(toks[:n], c, "none")
        return c

    for keep in (6, 7, 10, 13, 14):
        a = plain(6)
        cache_mod.start_trail(a)
        m.forward(toks[6:14], a, "all", token_exact=True)
        rec = [c for c in a if c.kind == "recurrent"]
        assert rec and all(c.trail.offset == 6 and c.trail.inputs[0][0].shape[0] == 8 for c in rec)
        assert all(c.nbytes == 2 * (c.conv.nbytes + c.state.nbytes) for c in rec)   # the kept start state counts
        cache_mod.rewind(a, keep)
        assert_caches_equal(a, plain(keep))
    # a second pass from where the first one stopped: the same start-state buffers, no new ones
    a = plain(6)
    cache_mod.start_trail(a)
    rec = [c for c in a if c.kind == "recurrent"]
    buffers = [id(c.trail.state) for c in rec]
    m.forward(toks[6:12], a, "all", token_exact=True)
    cache_mod.rewind(a, 9)
    cache_mod.start_trail(a)
    assert [id(c.trail.state) for c in rec] == buffers
    m.forward(toks[9:14], a, "all", token_exact=True)
    cache_mod.rewind(a, 12)
    assert_caches_equal(a, plain(12))
    cache_mod.start_trail(a)
    m.forward(toks[12:14], a, "all", token_exact=True)
    with pytest.raises(cache_mod.CacheTrimError):
        cache_mod.rewind(a, 11)   # before the pass: not kept



def test_lookup_drafter_continues_the_longest_recent_match():
    d = LookupDrafter(max_ngram=3, min_ngram=2)
    ctx = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # last 3 tokens [1, 2, 3] occurred at the start: continue with 4, 5, 9
    assert d.propose(ctx, 3) == [4, 5, 9]
    assert d.propose([5, 6, 7, 8], 4) == []          # no earlier match of 2 tokens
    assert d.propose([5, 6, 5, 6], 4) == [5, 6]      # stops at the end of the context
    assert d.propose([1, 2, 1, 2, 1, 2], 2) == [1, 2]   # most recent match first


def _lookup_reference(ctx: list[int], k: int, max_ngram: int, min_ngram: int) -> tuple[list[int], int]:
    """Brute force: of the earlier positions j (something follows) whose last n tokens equal the
    context's last n, the longest n (capped at max_ngram, at least min_ngram), most recent j."""
    L = len(ctx)
    best, best_n = -1, 0
    for j in range(L - 1):
        n = 0
        while n < max_ngram and j - n >= 0 and ctx[j - n] == ctx[L - 1 - n]:
            n += 1
        if n >= min_ngram and n >= best_n:
            best, best_n = j, n
    return (ctx[best + 1 : best + 1 + k], best_n) if best >= 0 else ([], 0)


@pytest.mark.parametrize("vocab", [2, 5, 50])
def test_lookup_drafter_index_matches_a_scan_of_the_whole_context(vocab):
    """The n-gram index gives what scanning the context gives, as the context grows token by
    token and by whole drafts, and after it is replaced (a rewind, another conversation)."""
    rng = np.random.default_rng(vocab)
    d = LookupDrafter(max_ngram=5, min_ngram=2)
    for _ in range(3):
        ctx = [int(t) for t in rng.integers(0, vocab, 8)]
        for _ in range(60):
            k = int(rng.integers(1, 9))
            assert (d.propose(ctx, k), d.evidence) == _lookup_reference(ctx, k, 5, 2)
            ctx += [int(t) for t in rng.integers(0, vocab, int(rng.integers(1, 4)))]
        cut = int(rng.integers(1, len(ctx)))
        ctx = ctx[:cut] + [vocab + 1]          # a rewind to an earlier point, then something new
        assert (d.propose(ctx, 4), d.evidence) == _lookup_reference(ctx, 4, 5, 2)


def test_bench_pass_costs_are_the_policys_timings_over_a_plain_step():
    from engine.bench import pass_costs

    spec = Speculator(LookupDrafter())
    assert pass_costs(spec) == {} and pass_costs(None) == {}    # nothing timed yet
    spec.policy.timed(1, 0.010)
    spec.policy.timed(2, 0.013)
    spec.policy.timed(8, 0.037)
    assert pass_costs(spec) == pytest.approx({2: 1.3, 8: 3.7})


def test_an_error_during_a_pass_ends_the_trail(arch_files):
    """A pass that fails on the way (here a logits processor) leaves no trail behind: the
    session's next forwards would otherwise keep adding their inputs to it."""
    from engine.sampling import make_sampler

    lm = load_model(arch_files["qwen35"])
    m = lm.model
    cache = m.make_cache()
    toks = [5, 6, 7, 8] * 4
    m.forward(toks, cache, "none")
    spec = Speculator(LookupDrafter(min_ngram=1), draft_max=3, adaptive=False)

    def failing(hist, row):
        raise RuntimeError("processor failed")

    with pytest.raises(RuntimeError, match="processor failed"):
        spec.step(m, cache, 5, toks, make_sampler(0.0), processors=(failing,))
    assert spec.last_fed == 4   # it was a pass: the token and a draft of 3
    assert all(c.trail is None for c in cache if c.kind == "recurrent")


def test_tile_fit_leaves_no_lone_token_after_whole_tiles():
    # a pass feeds k + 1 tokens: never 5, 9, 13 (a tile + one token decoded alone); never lengthened
    assert [tile_fit(k) for k in range(14)] == [0, 1, 2, 3, 3, 5, 6, 7, 7, 9, 10, 11, 11, 13]
    assert tile_fit(-1) == 0


def _policy(step_ms: dict[int, float], k_max: int = 8) -> DraftPolicy:
    pol = DraftPolicy(k_max)
    for T, ms in step_ms.items():
        pol.timed(T, ms / 1e3)
    return pol


# pass costs measured on the two machines the policy was tuned on (SmolLM2-135M Q4_1, ms)
XEON = {1: 8.4, 2: 11.3, 3: 13.5, 4: 16.4, 6: 22.8, 7: 25.3, 8: 28.3}
EPYC = {1: 5.8, 2: 9.9, 3: 12.8, 4: 15.8, 6: 22.1, 7: 24.8, 8: 27.5}


def test_draft_policy_weighs_acceptance_against_this_machines_pass_costs():
    for costs in (XEON, EPYC):
        pol = _policy(costs)
        for _ in range(20):                    # a text being copied: every draft taken whole
            pol.judged(6, 7, rejected=False)
        assert pol.choose(6, 8) == 7           # the longest draft that fills whole tiles
        assert pol.choose(6, 2) == 2           # never more than the drafter has
        for _ in range(20):                    # free prose: 3-token matches rejected at once
            pol.judged(3, 0, rejected=True)
        assert pol.choose(3, 8) == 0           # a plain step
    # half of the drafted tokens taken: worth a short draft where a pass of 2 is cheap (1.35
    # steps on the Xeon) and not where it costs 1.7 (the EPYC's compute-bound kernels)
    xeon, epyc = _policy(XEON), _policy(EPYC)
    for pol in (xeon, epyc):
        for _ in range(20):
            pol.judged(4, 1, rejected=True)
    assert xeon.choose(4, 8) >= 1 and epyc.choose(4, 8) == 0


def test_draft_policy_costs_come_from_timed_steps():
    pol = DraftPolicy(8)
    assert pol.cost(1) == 1.0 and pol.cost(3) == pytest.approx(1 + 2 * DraftPolicy.PRIOR_SLOPE)  # nothing timed
    pol.timed(1, 0.010)
    pol.timed(4, 0.030)
    assert pol.cost(4) == pytest.approx(3.0)
    assert pol.cost(7) == pytest.approx(1 + 6 * (2.0 / 3))    # untimed: the slope of the nearest timed length
    pol.timed(2, 0.018)   # a tie: the longer timed length speaks for 3
    assert pol.cost(3) == pytest.approx(1 + 2 * (2.0 / 3)) and pol.cost(8) == pytest.approx(1 + 7 * (2.0 / 3))
    pol.timed(8, 1.0)                  # a first timing slowed by the machine: at most 8 plain steps
    assert pol.cost(8) == pytest.approx(8.0)
    pol.timed(1, 1.0)                  # one step slowed by the machine counts at most double
    assert pol.step_seconds[1] == pytest.approx(0.010 + DraftPolicy.EMA * 0.010)


def test_draft_policy_tries_rejected_evidence_again_after_a_while():
    pol = _policy(EPYC)
    for _ in range(4):
        pol.judged(3, 0, rejected=True)
    got = [pol.choose(3, 8) for _ in range(2 * DraftPolicy.EXPLORE_AFTER)]
    # one one-token probe every EXPLORE_AFTER steps: text changes within a reply
    assert got.count(1) == 2 and set(got) == {0, 1}
    assert got.index(1) == DraftPolicy.EXPLORE_AFTER - 1
    pol.judged(3, 1, rejected=False)    # a probe that was taken lifts the estimate
    assert pol.p(3) < pol.p(6)


def test_lookup_prior_trusts_longer_matches():
    # before anything is seen: on the EPYC's costs a 3-token match is not worth a pass, a
    # 6-token one is (an untouched copy of earlier text)
    pol = DraftPolicy(8, prior=LookupDrafter.prior)
    for T, ms in EPYC.items():
        pol.timed(T, ms / 1e3)
    assert pol.choose(3, 8) == 0 and pol.choose(6, 8) >= 3


def test_draft_policy_times_a_plain_step_first_and_again_after_many_passes():
    pol = DraftPolicy(8)
    assert pol.choose(None, 8) == 0            # nothing to price drafts against yet
    pol.timed(1, 0.005)
    for _ in range(20):
        pol.judged(None, 7, rejected=False)
    assert pol.choose(None, 8) == 7
    for _ in range(DraftPolicy.YARDSTICK_AFTER):
        pol.timed(8, 0.020)
    assert pol.choose(None, 8) == 0            # a plain step again: is the yardstick still true?
    pol.timed(1, 0.005)
    assert pol.choose(None, 8) == 7


def test_draft_policy_stops_drafting_when_the_drafter_costs_more_than_it_saves():
    # a draft model as big as the target: 7 drafted tokens + the pass take 11 plain steps
    pol = _policy({1: 5.0, 8: 55.0})
    for _ in range(20):
        pol.judged(None, 6, rejected=True)     # 6 of 7 taken, every time
    assert [pol.choose(None, 8) for _ in range(3 * DraftPolicy.EXPLORE_AFTER)].count(1) == 3   # lookup probes
    costly = _policy({1: 5.0, 8: 55.0})
    costly.explore = False     # a draft model: a probe would first catch its cache up
    for _ in range(20):
        costly.judged(None, 6, rejected=True)
    assert set(costly.choose(None, 8) for _ in range(3 * DraftPolicy.EXPLORE_AFTER)) == {0}


def test_draft_policy_fixed_length_when_not_adaptive():
    pol = DraftPolicy(5, adaptive=False)
    pol.judged(None, 0, rejected=True)
    assert pol.choose(None, 8) == 5 and pol.choose(None, 3) == 3
    with pytest.raises(ValueError):
        DraftPolicy(0)


def test_default_model_lookup_identical_to_plain(default_model_path):
    lm = load_model(default_model_path)
    msgs = [{"role": "user", "content": "Repeat this function exactly, adding a docstring:\n\n"
             "def area(w, h):\n    if w < 0 or h < 0:\n        raise ValueError('negative')\n    return w * h\n"}]
    prompt = lm.tokenizer.encode(lm.template.render(msgs, add_generation_prompt=True), add_special=False)
    m, tok = lm.model, lm.tokenizer
    plain, plain_logits, plain_cache = greedy(m, tok, prompt, 60, stop_ids=tok.eog_ids)
    spec = Speculator(LookupDrafter(), draft_max=8)
    ids, logits, cache = greedy(m, tok, prompt, 60, spec, stop_ids=tok.eog_ids)
    assert ids == plain
    assert np.array_equal(logits, plain_logits)
    assert_caches_equal(cache, plain_cache)
    assert spec.stats.accepted > 0
    _check_identity(lm, prompt, n=30)   # and with rejections forced


def test_default_model_session_regenerate_and_edit_identical(default_model_path):
    from engine.session import ChatSession

    lm = load_model(default_model_path)

    def turns(session):
        return session_turns(session, "List three fruits, then list them again.",
                             "List three colours, then list them again.", 24)

    plain = turns(ChatSession(lm))
    s = ChatSession(lm)
    s.speculator = Speculator(LookupDrafter(min_ngram=2))   # short turns: 2-token matches make drafts
    assert turns(s) == plain
    assert s.speculator.stats.steps > 0 and s.speculator.stats.drafted > 0


def test_draft_model_q4_1_for_q8_0_identical(default_model_path, tmp_path):
    from tests.requantize_model import requantize_q8_0

    target = load_model(requantize_q8_0(default_model_path, tmp_path / "smollm2-q8_0.gguf"))
    draft = load_model(default_model_path)
    msgs = [{"role": "user", "content": "Write a haiku about the sea."}]
    prompt = target.tokenizer.encode(target.template.render(msgs, add_generation_prompt=True), add_special=False)
    plain, plain_logits, _ = greedy(target.model, target.tokenizer, prompt, 40)
    # drafting every step (the policy would stop: this pair's draft model costs what the target
    # does), so rejections and rollbacks happen
    spec = Speculator(ModelDrafter(target, draft), draft_max=4, adaptive=False)
    ids, logits, _ = greedy(target.model, target.tokenizer, prompt, 40, spec)
    assert ids == plain and np.array_equal(logits, plain_logits)
    assert spec.stats.accepted > 0 and spec.stats.drafted > spec.stats.accepted


def test_draft_model_with_another_vocabulary_is_refused(arch_files):
    a, b = load_model(arch_files["llama"]), load_model(arch_files["qwen35"])
    with pytest.raises(DraftModelError, match="vocabulary sizes differ|token"):
        check_draft_compatible(a, b)


def test_draft_model_drafter_identity_on_tiny_recurrent_pair(arch_files, tmp_path):
    """A qwen35 drafting for another qwen35 with the same vocabulary (different weights):
    the drafter's recurrent cache follows the context through its own trail."""
    from tests.qwen35_models import Qwen35Config, write_qwen35

    target = load_model(arch_files["qwen35"])
    draft = load_model(write_qwen35(tmp_path / "d.gguf", Qwen35Config(n_layer=4), seed=1))
    prompt = np.random.default_rng(4).integers(0, target.model.n_vocab, 10).tolist()
    plain, _, plain_cache = greedy(target.model, target.tokenizer, prompt, 30)
    spec = Speculator(ModelDrafter(target, draft), draft_max=3, adaptive=False)
    ids, _, cache = greedy(target.model, target.tokenizer, prompt, 30, spec)
    assert ids == plain
    assert_caches_equal(cache, plain_cache)
    assert spec.stats.drafted > 0


def _empirical(lm, prompt, spec_factory, n_runs, settings):
    """Counts of the first three sampled tokens' (pair) outcomes over n_runs seeds."""
    m, tok = lm.model, lm.tokenizer
    counts = {}
    for seed in range(n_runs):
        s = ChainSampler(seed=seed, **settings)
        rs = list(stream_generate(m, tok, prompt, m.make_cache(), s, max_tokens=3, stop_ids=frozenset(),
                                  speculator=spec_factory()))
        key = tuple(r.token for r in rs[1:3])
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_temperature_distribution_unchanged(arch_files):
    """Speculative sampling: the joint distribution of tokens 2-3 (both drafted and verified)
    matches the exact distribution computed from the model's own probabilities (chi-square)."""
    lm = load_model(arch_files["llama"])
    m = lm.model
    settings = dict(temperature=1.5, top_k=4, top_p=1.0, min_p=0.0)
    prompt = [5, 17, 40, 5, 17]
    # exact joint distribution of (t2, t3) given t1, by enumeration, for each t1
    ref = ChainSampler(**settings)
    c = m.make_cache()
    row0 = m.forward(prompt, c, "last")[-1]
    ids1, p1 = ref.distribution(row0)
    exact = {}
    for t1, q1 in zip(ids1, p1):
        c1 = m.make_cache()
        r1 = m.forward(prompt + [int(t1)], c1, "last")[-1]
        ids2, p2 = ref.distribution(r1)
        for t2, q2 in zip(ids2, p2):
            c2 = m.make_cache()
            r2 = m.forward(prompt + [int(t1), int(t2)], c2, "last")[-1]
            ids3, p3 = ref.distribution(r2)
            for t3, q3 in zip(ids3, p3):
                key = (int(t2), int(t3))
                exact[key] = exact.get(key, 0.0) + q1 * q2 * q3

    class Fixed:   # drafts a fixed guess: accepted only as often as the model picks it
        name = "fixed"

        def propose(self, context, k):
            return [int(ids1[0]), int(ids1[1])][:k]

    n = 1500
    got = _empirical(lm, prompt, lambda: Speculator(Fixed(), draft_max=2, adaptive=False), n, settings)
    keys = [k for k, p in exact.items() if p * n >= 5]
    chi2 = sum((got.get(k, 0) - exact[k] * n) ** 2 / (exact[k] * n) for k in keys)
    rest_exp = n - sum(exact[k] * n for k in keys)
    rest_got = n - sum(got.get(k, 0) for k in keys)
    if rest_exp >= 5:
        chi2 += (rest_got - rest_exp) ** 2 / rest_exp
    dof = len(keys) - (0 if rest_exp >= 5 else 1)
    # 99.9% quantile of chi-square ~ dof + 3.1*sqrt(2 dof) + 10 (loose Wilson-Hilferty bound)
    assert chi2 < dof + 3.1 * np.sqrt(2 * dof) + 10, (chi2, dof)
    # and a drafter whose guesses ignore the rule would fail: the counts must not be the draft's
    assert got.get((int(ids1[0]), int(ids1[1])), 0) < 0.9 * n
