"""Qwen3.5's MTP block as a drafter (engine/mtp.py, `--speculate mtp`).

Fixture: tests/fixtures/qwen35_mtp/ (tools/make_qwen35_mtp_fixture.py): a tiny random Qwen3.5
Hugging Face checkpoint with `mtp.*` weights converted by llama.cpp's own converter (F32) and
quantized by its quantizer (Q8_0), with llama.cpp's outputs: the trunk's logits and output-normed
hidden rows, and its MTP context's logits and hidden rows for the pairs (h_{p-1}, x_p) of a
40-token prompt, then a 4-step chained draft.

Tolerances (max |ours - llama.cpp| over all rows; logits of std 0.44):
  F32:  measured 5.4e-4 (logits), 2.2e-4 (h): llama.cpp's fp16 rounding of q/K/V in its
        flash-attention tiles and float summation order; its own batch vs one-pair-at-a-time
        MTP runs differ by 7e-5. Tolerance 3e-3.
  Q8_0: measured 0.030 (logits), 0.0096 (h): activation quantization (Q8_0 blocks) flips a
        rounding here and there with any change of summation order, and the MTP block sees
        the trunk's h, which carries the trunk's own difference (0.019 on its logits). With the
        trunk's h perturbed by 1e-5 (relative; 8 seeds) the worst is 0.031. Tolerance 0.08.
Both are far below what a wrong wiring moves: an MTP block fed h = 0 instead of the trunk's
h differs by 1.45; the top-1 tokens are compared too wherever llama.cpp has no near tie.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from engine import ops
from engine.generate import stream_generate
from engine.loader import load_model
from engine.mtp import MTPDrafter, MTPHead
from tests.engine.greedy import assert_caches_equal, greedy, session_turns
from engine.sampling import make_sampler
from engine.speculative import DraftModelError, Speculator, make_speculator

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "qwen35_mtp"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
PROMPT = MANIFEST["prompt"]
TOL = {"f32": 3e-3, "q8_0": 0.08}


def _path(name: str) -> Path:
    return FIX / MANIFEST["files"][name]["file"]


_loaded: dict = {}


def _lm(name: str):
    if name not in _loaded:
        _loaded[name] = load_model(_path(name), n_ctx=256)
    return _loaded[name]


def _trunk_h(model, tokens):
    """The trunk's logits (all rows) and output-normed hidden rows, through the hidden sink."""
    rows = []
    model.hidden_sink = lambda cache, p0, toks, h: rows.append(h.copy())
    try:
        logits = model.forward(tokens, model.make_cache(), logits="all")
    finally:
        model.hidden_sink = None
    return logits, np.vstack(rows)


def _close(got, want, tol, what):
    d = float(np.abs(got - want).max())
    print(f"{what}: max |d| = {d:.3g} (tolerance {tol})")
    assert d <= tol, f"{what}: max |ours - llama.cpp| = {d:.4g} > {tol}"
    return d


def _same_top1(got, want, d):
    s = np.sort(want, axis=1)
    sure = s[:, -1] - s[:, -2] > 2 * d
    assert sure.sum() >= len(want) // 2
    assert np.array_equal(got.argmax(1)[sure], want.argmax(1)[sure])


def test_fixture_files_are_the_ones_llama_cpp_ran_on():
    for f in MANIFEST["files"].values():
        assert hashlib.sha256((FIX / f["file"]).read_bytes()).hexdigest() == f["sha256"], f["file"]


@pytest.mark.parametrize("name", ["f32", "q8_0"])
def test_trunk_hidden_rows_match_llama_cpp_h_nextn(name):
    logits, h = _trunk_h(_lm(name).model, PROMPT)
    _close(logits, np.load(FIX / f"{name}.trunk_logits.npy"), TOL[name], f"{name} trunk logits")
    _close(h, np.load(FIX / f"{name}.trunk_h.npy"), TOL[name] / 4, f"{name} trunk h")


@pytest.mark.parametrize("name", ["f32", "q8_0"])
def test_mtp_head_logits_match_llama_cpp(name):
    """Our trunk's h, our MTP block: llama.cpp's MTP context's logits and h for every pair."""
    lm = _lm(name)
    _, h = _trunk_h(lm.model, PROMPT)
    head = MTPHead(lm.model, lm.gguf)
    h_in = np.vstack([np.zeros((1, h.shape[1]), np.float32), h[:-1]])    # (h_{p-1}, x_p), h_{-1} = 0
    logits, out_h = head.forward(PROMPT, h_in, head.make_cache(), logits="all")
    want = np.load(FIX / f"{name}.mtp_logits.npy")
    d = _close(logits, want, TOL[name], f"{name} MTP logits")
    _same_top1(logits, want, d)
    _close(out_h, np.load(FIX / f"{name}.mtp_h.npy"), TOL[name] / 4, f"{name} MTP h")
    # the h input matters: the same block fed zeros is far off (what a wiring mistake would give)
    zero, _ = head.forward(PROMPT, np.zeros_like(h_in), head.make_cache(), logits="all")
    assert np.abs(zero - want).max() > 10 * TOL[name]


@pytest.mark.parametrize("name", ["f32", "q8_0"])
def test_mtp_chained_draft_matches_llama_cpp(name):
    """Four draft steps after the prompt, each fed the block's own h: llama.cpp's logits and tokens."""
    lm = _lm(name)
    _, h = _trunk_h(lm.model, PROMPT)
    head = MTPHead(lm.model, lm.gguf)
    cache = head.make_cache()
    head.forward(PROMPT, np.vstack([np.zeros((1, h.shape[1]), np.float32), h[:-1]]), cache, logits="none")
    ids = MANIFEST["files"][name]["chain_ids"]
    want_logits, want_h = np.load(FIX / f"{name}.chain_logits.npy"), np.load(FIX / f"{name}.chain_h.npy")
    hh = h[-1:]
    got_l, got_h = [], []
    for i in range(MANIFEST["n_chain"]):
        lg, hh = head.forward([ids[i]], hh, cache, logits="last")
        got_l.append(lg[0])
        got_h.append(hh[0])
    d = _close(np.stack(got_l), want_logits, TOL[name], f"{name} chained MTP logits")
    _close(np.stack(got_h), want_h, TOL[name] / 2, f"{name} chained MTP h")
    _same_top1(np.stack(got_l), want_logits, d)


def test_mtp_token_exact_batch_equals_one_pair_at_a_time():
    lm = _lm("q8_0")
    head = MTPHead(lm.model, lm.gguf)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, lm.model.n_vocab, 12)
    h = rng.standard_normal((12, lm.model.args.d_model)).astype(np.float32) * 0.2
    a, b = head.make_cache(), head.make_cache()
    head.forward(toks[:5], h[:5], a, logits="none")
    head.forward(toks[:5], h[:5], b, logits="none")
    batch, bh = head.forward(toks[5:], h[5:], a, logits="all", token_exact=True)
    steps = [head.forward(toks[i : i + 1], h[i : i + 1], b, logits="last") for i in range(5, 12)]
    assert np.array_equal(batch, np.vstack([s[0] for s in steps]))
    assert np.array_equal(bh, np.vstack([s[1] for s in steps]))
    assert a.offset == b.offset == 12


def test_drafter_keeps_true_pairs_only():
    """After a propose, the MTP cache holds exactly (h_{q-1}, x_q) for the whole context: the
    drafted positions are gone, and what remains equals one fresh pass over those pairs."""
    lm = _lm("f32")
    m = lm.model
    drafter = MTPDrafter(lm)
    try:
        cache = m.make_cache()
        ctx = PROMPT[:30]
        m.forward(ctx[:-1], cache, logits="none")        # the target holds all but the last token
        drafts = drafter.propose(ctx, 5)
        assert len(drafts) == 5 and drafter.cache.offset == len(ctx) and drafter.fed == ctx
        _, h = _trunk_h(m, ctx[:-1])
        fresh = drafter.head.make_cache()
        drafter.head.forward(ctx, np.vstack([np.zeros((1, h.shape[1]), np.float32), h]), fresh, logits="none")
        n = len(ctx)
        for got, want in ((drafter.cache.keys, fresh.keys), (drafter.cache.values, fresh.values)):
            assert np.abs(ops.f16_values_of(got[:n]) - ops.f16_values_of(want[:n])).max() < 1e-3
        # a shorter context (a regenerate): the cache goes back to its common prefix
        assert len(drafter.propose(ctx[:20], 2)) == 2 and drafter.cache.offset == 20
    finally:
        m.hidden_sink = None


class NoisyMTP(MTPDrafter):
    """The MTP drafter (its cache kept as usual) with some drafts replaced by the plain-decoding
    truth, so that both acceptances and rejections happen on a random-weight model."""

    def __init__(self, target, full):
        super().__init__(target)
        self.full, self.calls = full, 0

    def propose(self, context, k):
        drafts = super().propose(context, k)
        self.calls += 1
        n = len(context)
        truth = self.full[n : n + len(drafts)]
        return [t if (self.calls + i) % 3 else d for i, (d, t) in enumerate(zip(drafts, truth))]


@pytest.fixture(scope="module")
def writer_file(tmp_path_factory):
    """A qwen35 file with an MTP block from our own writer (tests/qwen35_models.py, nextn=1)."""
    from tests.qwen35_models import Qwen35Config, write_qwen35

    return write_qwen35(tmp_path_factory.mktemp("mtp") / "w.gguf", Qwen35Config(n_layer=4, nextn=1))


@pytest.mark.parametrize("which", ["converter-q8_0", "writer-f32"])
def test_greedy_ids_identical_with_mtp_and_rejections(which, writer_file):
    lm = _lm("q8_0") if which == "converter-q8_0" else load_model(writer_file, n_ctx=256)
    try:
        prompt = PROMPT[:24]
        plain, plain_logits, plain_cache = greedy(lm.model, lm.tokenizer, prompt, 40)
        # the real drafter: random weights, few acceptances, the same ids
        spec = make_speculator("mtp", lm, draft_max=3, adaptive=False)
        assert spec is not None and spec.mode == "mtp"
        ids, logits, cache = greedy(lm.model, lm.tokenizer, prompt, 40, spec)
        assert ids == plain and np.array_equal(logits, plain_logits)
        assert_caches_equal(cache, plain_cache)
        assert spec.stats.drafted > 0
        # acceptances and rejections forced
        noisy = Speculator(NoisyMTP(lm, list(prompt) + plain), draft_max=4, adaptive=False)
        ids, logits, cache = greedy(lm.model, lm.tokenizer, prompt, 40, noisy)
        assert ids == plain and np.array_equal(logits, plain_logits)
        assert_caches_equal(cache, plain_cache)
        assert 0 < noisy.stats.accepted < noisy.stats.drafted
    finally:
        lm.model.hidden_sink = None


def test_drafter_attached_mid_conversation_still_exact():
    """Rows it never saw (the first 20 positions) count as h = 0: worse drafts, the same tokens."""
    lm = _lm("f32")
    m = lm.model

    def run(spec_factory):
        cache = m.make_cache()
        m.forward(PROMPT[:20], cache, logits="none")       # fed before any drafter existed
        spec = spec_factory()
        rs = list(stream_generate(m, lm.tokenizer, PROMPT[20:24], cache, make_sampler(0.0), max_tokens=24,
                                  stop_ids=frozenset(), history=PROMPT[:20], speculator=spec))
        return [r.token for r in rs], spec

    try:
        plain, _ = run(lambda: None)
        ids, spec = run(lambda: Speculator(MTPDrafter(lm), draft_max=3, adaptive=False))
        assert ids == plain and spec.stats.drafted > 0
        assert spec.drafter.fed[:24] == PROMPT[:24]
    finally:
        m.hidden_sink = None


def test_session_regenerate_and_edit_identical_with_mtp():
    from engine.session import ChatSession

    lm = _lm("q8_0")

    def turns(session):
        return session_turns(session, "the wind and the sea", "the sea and the wind", 20, follow_up="again")

    try:
        plain = turns(ChatSession(lm))
        s = ChatSession(lm)
        s.speculator = make_speculator("mtp", lm, draft_max=3)
        assert turns(s) == plain
        assert s.speculator.stats.steps > 0 and s.speculator.stats.drafted > 0
    finally:
        lm.model.hidden_sink = None


def test_mtp_refused_for_a_file_without_the_block_or_another_architecture(writer_file, tmp_path):
    from tests.qwen35_models import write_qwen35
    from tests.tiny_models import write_tiny_llama

    no_block = load_model(write_qwen35(tmp_path / "plain.gguf"))
    with pytest.raises(DraftModelError, match="has no MTP block"):
        make_speculator("mtp", no_block)
    llama = load_model(write_tiny_llama(tmp_path / "l.gguf"))
    with pytest.raises(DraftModelError, match="needs a Qwen3.5 .* is llama"):
        make_speculator("mtp", llama)


def test_hidden_sink_changes_no_logits():
    lm = _lm("q8_0")
    m = lm.model
    a = m.forward(PROMPT, m.make_cache(), logits="all")
    b, _ = _trunk_h(m, PROMPT)
    assert np.array_equal(a, b)


def test_mtp_at_temperature_samples_and_counts():
    from engine.sampling import ChainSampler

    lm = _lm("q8_0")
    m = lm.model
    try:
        spec = make_speculator("mtp", lm, draft_max=3, adaptive=False)
        rs = list(stream_generate(m, lm.tokenizer, PROMPT[:16], m.make_cache(),
                                  ChainSampler(seed=3, temperature=0.8, top_k=20, top_p=0.95, min_p=0.0),
                                  max_tokens=30, stop_ids=frozenset(), speculator=spec))
        assert len(rs) == 30 and spec.stats.drafted > 0 and spec.stats.steps > 0
    finally:
        m.hidden_sink = None
