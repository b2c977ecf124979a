"""engine.bench: interleaved runs against a peer, the ratios it reports, what it measures."""

from __future__ import annotations

import statistics

from engine.bench import run_bench
from engine.loader import load_model


class FakePeer:
    """Answers like LlamaCppPeer, with a slow spell in the middle (a noisy machine)."""

    version = "test"
    peak_rss_bytes = 300_000_000
    baseline_rss_bytes = 100_000_000

    def __init__(self):
        self.calls = 0
        self.depths = []
        self.pp_depths = []

    def _tps(self, base):
        self.calls += 1
        return base * (0.5 if self.calls in (4, 5, 6) else 1.0)

    def prefill_tps(self, n, depth=0):
        self.pp_depths.append(depth)
        return self._tps(1000.0)

    def decode_tps(self, n, depth=0):
        self.depths.append(depth)
        return self._tps(100.0)


def test_ratios_are_medians_of_the_pairs_and_the_json_fields_are_there(tiny_llama_path):
    lm = load_model(tiny_llama_path, n_ctx=64)
    peer = FakePeer()
    res = run_bench(lm.model, pp=(16,), tg=8, repeats=5, bandwidth=False, peer=peer)
    assert peer.calls == 10   # one peer run after each of ours: pp16 and tg8, 5 times
    for k in ("pp16", "tg8"):
        ours = res["results"][k]["runs"]
        theirs = res["peer"]["results"][k]["runs"]
        assert len(ours) == len(theirs) == 5
        assert res["ratios"][k] == statistics.median(a / b for a, b in zip(ours, theirs))
    assert res["decode_ratio"] == res["ratios"]["tg8"] and res["prefill_ratio"] == res["ratios"]["pp16"]
    assert res["kv_state_bytes"] > 0 and res["peak_rss_bytes"] > 0
    assert res["kernel_family"] in ("avx-vnni", "avx2", "portable")
    assert res["peer"]["peak_rss_bytes"] == 300_000_000 and res["peer"]["baseline_rss_bytes"] == 100_000_000


def test_decode_at_depth_starts_that_deep_in_the_context_for_both_engines(tiny_llama_path):
    lm = load_model(tiny_llama_path, n_ctx=64)
    offsets = []
    forward = lm.model.forward

    def spy(tokens, cache, *a, **k):
        if len(tokens) == 1:
            offsets.append(cache[0].offset)
        return forward(tokens, cache, *a, **k)

    lm.model.forward = spy
    peer = FakePeer()
    res = run_bench(lm.model, pp=(), tg=6, repeats=2, bandwidth=False, peer=peer, depth=40)
    assert set(res["results"]) == {"tg6@d40"} and res["depth"] == 40
    assert res["decode_ratio"] == res["ratios"]["tg6@d40"]
    assert peer.depths == [40, 40]
    # each run: the untimed first token at position 40, then 6 timed steps from 41
    assert offsets == list(range(40, 47)) * 2


def test_prefill_at_depth_times_only_the_new_tokens_for_both_engines(tiny_llama_path):
    """pp8@d30: 30 tokens already in the context (not timed), then 8 timed, as a new turn's
    prompt deep in a chat; llama.cpp is asked for the same."""
    lm = load_model(tiny_llama_path, n_ctx=64)
    calls = []
    forward = lm.model.forward

    def spy(tokens, cache, *a, **k):
        calls.append((cache[0].offset, len(tokens)))
        return forward(tokens, cache, *a, **k)

    lm.model.forward = spy
    peer = FakePeer()
    res = run_bench(lm.model, pp=(8, 40), tg=0, repeats=2, bandwidth=False, peer=peer, depth=30)
    assert set(res["results"]) == {"pp8@d30"}   # 30 + 40 does not fit 64: left out
    assert res["prefill_ratio"] == res["ratios"]["pp8@d30"] and peer.pp_depths == [30, 30]
    # each run: the context from 0 (its chunks), then the 8 timed tokens from position 30
    assert [c for c in calls if c[0] == 30] == [(30, 8)] * 2
    assert sum(n for _, n in calls) == 2 * (30 + 8)


def test_bandwidth_is_probed_each_round_and_kept_out_of_the_peak_rss(tiny_llama_path):
    from engine import runtime

    lm = load_model(tiny_llama_path, n_ctx=64)
    supported = runtime.reset_peak_rss()   # earlier tests' peaks are not this bench's
    res = run_bench(lm.model, pp=(8,), tg=4, repeats=3)
    if not supported:
        assert len(res["bandwidth_runs"]) == 1
        return
    assert len(res["bandwidth_runs"]) == 3 and res["bandwidth_bytes_per_s"] == statistics.median(res["bandwidth_runs"])
    # the probe reads >= 256 MB; a tiny model's peak stays far below the probe's buffer
    assert res["peak_rss_bytes"] < runtime.current_rss_bytes() + (200 << 20)
    assert res["decode_bound_tps"] > 0


def test_the_probe_reads_twice_the_last_level_cache_so_it_measures_memory(tmp_path):
    from engine import runtime

    # sysfs as Linux lays it out: L1d, L1i, L2, L3 of cpu0
    for i, size in enumerate(["48K", "64K", "2048K", "491520K"]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")
    assert runtime.last_level_cache_bytes(str(tmp_path)) == 480 << 20
    assert runtime.last_level_cache_bytes(str(tmp_path / "missing")) is None
    (tmp_path / "index3" / "size").write_text("lots\n")
    assert runtime.last_level_cache_bytes(str(tmp_path)) is None
    assert runtime.probe_bytes(480 << 20) == 960 << 20          # a server VM's L3: read past it
    assert runtime.probe_bytes(32 << 20) == 256 << 20           # a laptop's: 256 MB as before
    assert runtime.probe_bytes(0) == 256 << 20                  # cache size unknown
    assert runtime.probe_bytes() == runtime.probe_bytes(runtime.last_level_cache_bytes() or 0)   # this machine's
    assert runtime.probe_bytes(4 << 30) == 1 << 30              # never more than 1 GiB


def test_busy_processes_run_in_their_own_sessions_and_are_always_killed():
    import os

    import pytest

    from engine.bench import busy_processes

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            return False

    with busy_processes(2) as pids:
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert all(os.getsid(p) == p != os.getsid(0) for p in pids)   # each leads its own session
    assert not any(alive(p) for p in pids)
    with pytest.raises(RuntimeError):
        with busy_processes(1) as pids:
            raise RuntimeError("a failed run")
    assert not alive(pids[0])
