"""The thread policy (engine/threads.py) and its promise: output unchanged by the thread count.

The policy is driven here by a fake clock, run queue and step times (no timing is asserted);
the determinism tests run the real kernels at 1 and 2 threads and while the count changes.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from engine import threads
from engine.generate import stream_generate
from engine.loader import load_model
from engine.sampling import make_sampler
from engine.threads import PROBE_STEPS, QUIET_STEPS, ThreadGovernor


class Fake:
    def __init__(self, runnable=1):
        self.now, self.cpu, self.runnable_now, self.applied = 100.0, 0.0, runnable, []
        self.then, self.slept = None, []

    def governor(self, max_threads=2, adaptive=True) -> ThreadGovernor:
        return ThreadGovernor(max_threads, adaptive, cpus=max_threads, clock=lambda: self.now,
                              runnable=self.read_runnable, apply=self.applied.append,
                              cpu_clock=lambda: self.cpu, sleep=self.sleep)

    def read_runnable(self):
        now = self.runnable_now
        if self.then is not None:   # the next reading (after a sleep) sees the queue changed
            self.runnable_now, self.then = self.then, None
        return now

    def sleep(self, s):
        self.now += s
        self.slept.append(s)


def steps(g: ThreadGovernor, seconds: float, n: int):
    for _ in range(n):
        g.after_step(seconds)


def test_fixed_count_never_changes():
    f = Fake(runnable=5)
    g = f.governor(adaptive=False)
    assert g.before_work() == 2
    steps(g, 0.01, 10)
    steps(g, 1.0, 10)
    assert g.n == 2 and f.applied == [2] and g.summary()["steps_by_threads"] == {"2": 20}


def test_starved_steps_shrink_the_team_but_one_slow_step_does_not():
    f = Fake(runnable=2)        # another program runs
    g = f.governor()
    steps(g, 0.010, 10)
    g.after_step(0.5)           # one hiccup
    steps(g, 0.010, 3)
    assert g.n == 2
    steps(g, 0.5, 2)            # the team waits for a descheduled member, step after step
    assert g.n == 1 and f.applied[-1] == 1
    assert g.summary()["policy"] == "adaptive" and g.changes == 1


def test_slow_or_cpu_poor_steps_while_no_other_program_runs_keep_the_team():
    # our own UI thread rendering, or the GIL, slows a few steps: not a reason to give a core away
    f = Fake(runnable=1)
    g = f.governor()
    g.before_work()
    steps(g, 0.010, 10)         # (no CPU time passes on the fake clock: every step looks starved)
    steps(g, 0.5, 3)
    assert g.n == 2 and g.changes == 0


def test_a_team_starved_from_its_first_step_shrinks_by_its_cpu_share():
    f = Fake(runnable=1)
    g = f.governor()
    g.before_work()
    f.runnable_now = 2          # another program starts as the reply does

    def step(seconds, cores):   # every step equally slow: only the CPU share tells
        f.now += seconds
        f.cpu += seconds * cores
        g.after_step(seconds)

    for _ in range(5):
        step(0.5, 1.9)          # both threads had a core
    assert g.n == 2
    step(0.5, 1.0)              # the process got one core for its two threads
    assert g.n == 2             # ... once: the other program must be seen on a second such step
    step(0.5, 1.0)
    assert g.n == 1 and f.applied[-1] == 1


def test_a_task_runnable_for_a_moment_does_not_shrink_the_team():
    # in the TUI slow steps are common (its UI thread); a kernel worker that is runnable at
    # the instant the run queue is read must not cost the team a thread for a second
    f = Fake(runnable=1)
    g = f.governor()
    g.before_work()

    def step(seconds, cores, runnable):
        f.runnable_now = runnable
        f.now += seconds
        f.cpu += seconds * cores
        g.after_step(seconds)

    for _ in range(5):
        step(0.01, 1.9, 1)
    for busy in (2, 1, 1, 2, 1, 1, 2):   # starved steps, the queue busy on every third reading
        step(0.01, 1.0, busy)
    assert g.n == 2 and g.changes == 0


def test_grows_back_when_a_core_is_free_and_more_threads_are_faster():
    f = Fake(runnable=3)        # two others running: no probe
    g = f.governor()
    steps(g, 0.010, 5)
    steps(g, 0.5, 2)
    assert g.n == 1
    f.now += 60
    steps(g, 0.02, 3 * QUIET_STEPS)
    assert g.n == 1             # the run queue shows no free core
    f.runnable_now = 1          # only us
    steps(g, 0.02, QUIET_STEPS)
    assert g.n == 2             # probing
    steps(g, 0.011, PROBE_STEPS)
    assert g.n == 2 and f.applied[-1] == 2
    steps(g, 0.011, 20)
    assert g.n == 2


def test_a_failed_probe_goes_back_and_waits_longer():
    f = Fake(runnable=2)
    g = f.governor()
    steps(g, 0.010, 5)
    steps(g, 0.5, 2)
    assert g.n == 1
    f.runnable_now = 1          # the other program is gone
    f.now += 60
    steps(g, 0.02, QUIET_STEPS)
    assert g.n == 2
    g.after_step(0.02)          # the first probe step is not judged
    g.after_step(0.2)           # much slower than at one thread: abort at once
    assert g.n == 1
    steps(g, 0.02, QUIET_STEPS)
    assert g.n == 1             # the back-off (2 s now) has not passed on the fake clock
    f.now += 2.5
    steps(g, 0.02, 1)
    assert g.n == 2


def test_a_prompt_starts_with_no_more_threads_than_free_cores():
    f = Fake(runnable=2)        # us + one other on 2 cores
    g = f.governor()
    assert g.before_work() == 1 and f.applied == [1]
    f.runnable_now = None       # unknown (not Linux): keep the count
    g2 = f.governor()
    assert g2.before_work() == 2


def test_a_prompt_after_a_busy_spell_takes_the_freed_core_back():
    f = Fake(runnable=2)
    g = f.governor()
    assert g.before_work() == 1
    f.runnable_now = 1          # the other program finished: the next prompt (or chunk) gets 2
    assert g.before_work() == 2 and f.applied == [1, 2]


def test_a_task_that_is_just_ending_does_not_shrink_a_prompt():
    f = Fake(runnable=2)
    f.then = 1                  # busy at the first look, free 2 ms later
    g = f.governor()
    assert g.before_work() == 2 and f.slept == [threads.RECHECK_S]


def test_before_a_long_chunk_a_spinning_team_elsewhere_gets_longer_to_settle():
    f = Fake(runnable=2)        # busy at both quick looks: a short chunk starts with 1 thread
    g = f.governor()
    assert g.before_work() == 1 and f.slept == [threads.RECHECK_S]
    g.after_chunk(2 * threads.LONG_CHUNK_S)   # a big model: a chunk takes seconds
    f.runnable_now, f.slept = 2, []
    g.n = 2
    f.then = 2
    assert g.before_work() == 1 and f.slept == [threads.RECHECK_S, threads.RECHECK_LONG_S]
    g.n, f.slept = 2, []
    f.runnable_now, f.then = 2, 2

    def settle(s):              # the other team goes idle during the longer wait
        f.now += s
        f.slept.append(s)
        if s == threads.RECHECK_LONG_S:
            f.runnable_now = 1
    g._sleep = settle
    assert g.before_work() == 2 and f.slept == [threads.RECHECK_S, threads.RECHECK_LONG_S]


def test_prefill_sets_the_threads_at_every_chunk(tmp_path):
    from engine.generate import prefill
    from tests.tiny_models import write_tiny_llama

    model = load_model(write_tiny_llama(tmp_path / "m.gguf"), 64).model
    calls = []
    saved = threads._governor
    f = Fake(runnable=1)
    g = f.governor()
    g.before_work = lambda: calls.append(1) or 2   # type: ignore[method-assign]
    threads._governor = g
    try:
        prefill(model, model.make_cache(), list(range(1, 21)), chunk=8)
    finally:
        threads._governor = saved
    assert len(calls) == 3      # 20 tokens in chunks of 8


def test_default_threads_and_configure():
    assert 1 <= threads.default_threads() <= numba.config.NUMBA_NUM_THREADS
    try:
        g = threads.configure(1)
        assert (g.n, g.adaptive, numba.get_num_threads()) == (1, False, 1)
        g = threads.configure(None)
        assert g.adaptive == (threads.default_threads() > 1) and threads.governor() is g
    finally:
        threads.configure(None)


class Alternating(ThreadGovernor):
    """A policy that changes the count after every step: the worst case for determinism."""

    def after_step(self, seconds: float) -> int:
        self.n = 1 if self.n > 1 else self.max_threads
        return self.apply()


@pytest.fixture
def loaded(tiny_llama_path):
    return load_model(tiny_llama_path, n_ctx=128)


def _greedy(loaded, governor, monkeypatch):
    monkeypatch.setattr(threads, "_governor", governor)
    m = loaded.model
    prompt = list(range(1, 40))   # a multi-token prefill (the GEMM path), then decode
    out = list(stream_generate(m, loaded.tokenizer, prompt, m.make_cache(), make_sampler(0), max_tokens=12,
                               stop_ids=frozenset(), keep_logits=True))
    return [r.token for r in out], np.stack([r.logits for r in out])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
def test_greedy_output_is_the_same_for_1_2_and_changing_threads(loaded, monkeypatch):
    try:
        ids1, logits1 = _greedy(loaded, ThreadGovernor(1, adaptive=False), monkeypatch)
        ids2, logits2 = _greedy(loaded, ThreadGovernor(2, adaptive=False), monkeypatch)
        ids_alt, logits_alt = _greedy(loaded, Alternating(2, adaptive=True), monkeypatch)
        ids_ad, logits_ad = _greedy(loaded, ThreadGovernor(2, adaptive=True), monkeypatch)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert ids1 == ids2 == ids_alt == ids_ad
    # bit-identical: every kernel gives each row (token, head) to one thread
    np.testing.assert_array_equal(logits1, logits2)
    np.testing.assert_array_equal(logits1, logits_alt)
    np.testing.assert_array_equal(logits1, logits_ad)


def _fake_proc(tmp_path, running_total: int, own_states: str):
    (tmp_path / "loadavg").write_text(f"0.50 0.40 0.30 {running_total}/200 12345\n")
    tasks = tmp_path / "task"
    for i, state in enumerate(own_states):
        (tasks / str(100 + i)).mkdir(parents=True)
        # a thread name with a space and a parenthesis: the state is the field after the last ')'
        (tasks / str(100 + i) / "stat").write_text(f"{100 + i} (numba (w) {i}) {state} 1 2 3 4\n")
    return threads.RunQueue(str(tmp_path / "loadavg"), str(tasks))


def test_run_queue_does_not_take_our_own_spinning_workers_for_other_programs(tmp_path):
    # right after a parallel region the caller and its worker are both running ('R'): the
    # machine's 2 running tasks are all ours, so it counts as us alone (1), a core free
    assert _fake_proc(tmp_path, 2, "RRS").runnable() == 1


def test_run_queue_counts_other_programs(tmp_path):
    # 3 running, 1 of them ours (the caller): two others, counted with us as 3
    assert _fake_proc(tmp_path, 3, "RSS").runnable() == 3


def test_run_queue_without_a_task_list_counts_only_the_caller_as_ours(tmp_path):
    (tmp_path / "loadavg").write_text("0.1 0.1 0.1 2/90 1\n")
    assert threads.RunQueue(str(tmp_path / "loadavg"), str(tmp_path / "missing")).runnable() == 2
    assert threads.RunQueue(str(tmp_path / "missing-loadavg")).runnable() is None

