"""`deltatalk bench`: the table (or JSON) around engine.bench."""

from __future__ import annotations

import json
import statistics
import sys

# The decided memory line (#7, #13): the model's share of peak RSS <= file x 1.1 + KV/state +
# this much for fixed costs (compiled kernels, vocabulary tables, prefill buffers).
MEMORY_FIXED_BYTES = 25_000_000
W = 12   # the test column: pp512, tg128, tg128@d4096


def cmd_bench(args) -> int:
    from chatapp.cli_common import open_model
    from engine import loader, runtime  # noqa: F401  (imported before the baseline is read)
    from engine.bench import busy_processes, run_bench
    from engine.peer import LlamaCppPeer, PeerError

    # RSS of the runtime alone, before the model: Python, numpy, tokenizers, jinja2, and numba
    # started (LLVM, the OpenMP thread team: one parallel kernel run, as any model's first call)
    runtime.threading_layer()
    baseline_rss = runtime.current_rss_bytes()
    loaded, warm_s = open_model(args, quiet=args.json)
    pp = args.pp
    say = None if args.json else (lambda s: print("  " + s, file=sys.stderr, flush=True))
    if args.speculate != "off":
        return _bench_speculate(args, loaded, say)
    peer = None
    if args.peer:
        import numba

        try:
            peer = LlamaCppPeer(str(loaded.path), numba.get_num_threads(), n_ctx=loaded.model.n_ctx,
                                python=args.peer_python)
        except PeerError as e:
            print(f"deltatalk: {e}", file=sys.stderr)
            return 2
    if args.depth + args.tg >= loaded.model.n_ctx:
        what = f"--depth {args.depth} + --tg {args.tg}" if args.depth else f"--tg {args.tg}"
        print(f"deltatalk: {what} does not fit the context of {loaded.model.n_ctx} tokens "
              f"(raise --ctx or lower {'--depth or ' if args.depth else ''}--tg)", file=sys.stderr)
        if peer is not None:
            peer.close()
        return 2
    busy = None
    try:
        res = run_bench(loaded.model, pp=pp, tg=args.tg, repeats=args.repeats, progress=say, peer=peer,
                        depth=args.depth, pages=loaded.gguf.pages)
        if args.busy:
            if say:
                say(f"again with {args.busy} CPU-bound process(es) in other sessions"
                    + (" (llama.cpp's fixed thread team may slow to ~1 tok/s: minutes per run)" if peer else ""))
            runtime.set_threads(args.threads)   # a fresh thread policy for the busy runs
            with busy_processes(args.busy):
                busy = run_bench(loaded.model, pp=pp, tg=args.tg, repeats=args.repeats, progress=say, peer=peer,
                                 bandwidth=False, depth=args.depth)
    except PeerError as e:   # llama.cpp's own crash: say how it ended, not a traceback of ours
        print(f"deltatalk: {e}", file=sys.stderr)
        return 1
    finally:
        if peer is not None:
            peer.close()
    res.update(model=str(loaded.path), arch=loaded.arch, file_size_bytes=loaded.file_size, warmup_s=warm_s,
               baseline_rss_bytes=baseline_rss)
    # the memory target: what the model adds to the runtime <= file x 1.1 + KV cache + state
    res["model_rss_bytes"] = res["peak_rss_bytes"] - baseline_rss
    res["memory_bound_bytes"] = int(loaded.file_size * 1.1) + res["kv_state_bytes"] + MEMORY_FIXED_BYTES
    if busy is not None:
        res["busy"] = {"processes": args.busy, **busy}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"model   {loaded.path.name} ({loaded.arch}, {loaded.file_size / 1e6:.1f} MB)")
    print(f"threads {res['threads']} ({res['thread_policy']['policy']}, {res['threading_layer']}), cpu {' '.join(res['cpu_features'])}, "
          f"kernels {res.get('kernel_family', '?')}" + (f", {res['cpu_target']}" if res.get("cpu_target") else ""))
    if busy is not None:
        _print_busy(res, busy, args.busy)
    elif peer is None:
        print(f"{'test':>{W}} {'tok/s (median)':>15}   runs")
        for k, v in res["results"].items():
            runs = " ".join(f"{x:.1f}" for x in v["runs"])
            print(f"{k:>{W}} {v['median_tps']:15.1f}   {runs}")
    else:
        print(f"{'test':>{W}} {'deltatalk':>10} {'llama.cpp':>10} {'ratio':>7}   (tok/s, medians of "
              f"{args.repeats} interleaved runs; ratio: median of the pairs' ratios; {res['peer']['engine']})")
        for k, v in res["results"].items():
            theirs = res["peer"]["results"][k]["median_tps"]
            print(f"{k:>{W}} {v['median_tps']:10.1f} {theirs:10.1f} {res['ratios'][k]:7.2f}")
    if res.get("decode_bound_tps"):
        tg = next((v["median_tps"] for k, v in res["results"].items() if k.startswith("tg")), None)
        share = f", decode at {100 * tg / res['decode_bound_tps']:.0f}% of it" if tg else ""
        if tg and args.depth:
            share += f" (the bound counts weights only; at depth {args.depth} the KV cache is read too)"
        pages = "2 MB" if res.get("bandwidth_huge_pages") else "4 KB"
        print(f"memory read {res['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({pages} pages) -> decode bound "
              f"{res['decode_bound_tps']:.1f} tok/s for {res['weight_bytes'] / 1e6:.1f} MB of weights{share}")
    if res.get("weight_pages"):
        print(res["weight_pages"])
    ok = "within" if res["model_rss_bytes"] <= res["memory_bound_bytes"] else "OVER"
    print(f"peak RSS {res['peak_rss_bytes'] / 1e6:.1f} MB = runtime {baseline_rss / 1e6:.1f} MB (before the model) "
          f"+ model {res['model_rss_bytes'] / 1e6:.1f} MB, {ok} the bound file x 1.1 + KV/state + 25 MB = "
          f"{res['memory_bound_bytes'] / 1e6:.1f} MB; warm-up {warm_s:.2f} s")
    if warm_s > 2.0:
        print("(the kernels were compiled in this run: the peak RSS includes the compiler's memory; "
              "run again for the cached figure)")
    theirs = res.get("peer", {})
    if theirs.get("peak_rss_bytes") and theirs.get("baseline_rss_bytes"):
        model = theirs["peak_rss_bytes"] - theirs["baseline_rss_bytes"]
        print(f"llama.cpp peak RSS {theirs['peak_rss_bytes'] / 1e6:.1f} MB = runtime "
              f"{theirs['baseline_rss_bytes'] / 1e6:.1f} MB + model {model / 1e6:.1f} MB (its KV cache is "
              f"F16, allocated and cleared for the whole context: {loaded.model.n_ctx} positions)")
    return 0


def _print_busy(idle: dict, busy: dict, n: int):
    """Idle and busy figures side by side (and llama.cpp's, when it ran)."""
    peer = "peer" in idle
    head = f"{'test':>{W}} {'idle':>8} {f'busy x{n}':>8} {'kept':>6}"
    if peer:
        head += f" | {'llama.cpp idle':>14} {'busy':>8} {'kept':>6}"
    print(head + "   (tok/s, medians)")
    for k, v in idle["results"].items():
        a, b = v["median_tps"], busy["results"][k]["median_tps"]
        line = f"{k:>{W}} {a:8.1f} {b:8.1f} {b / a:6.2f}"
        if peer:
            pa, pb = idle["peer"]["results"][k]["median_tps"], busy["peer"]["results"][k]["median_tps"]
            line += f" | {pa:14.1f} {pb:8.1f} {pb / pa:6.2f}"
        print(line)
    pol = busy["thread_policy"]
    print(f"busy runs: thread policy {pol['policy']}, decode steps per thread count {pol['steps_by_threads']}")


def _bench_speculate(args, loaded, say) -> int:
    """--speculate MODE: decode tok/s plain and speculative on the same prompts, and the ratio."""
    from chatapp.cli_common import speculator_factory
    from engine.bench import run_speculate_bench

    make = speculator_factory(args, loaded)   # refuses a bad pair before any timing
    res = run_speculate_bench(loaded, make, tg=args.tg,
                              repeats=args.repeats, progress=say)
    if args.json:
        print(json.dumps({"model": str(loaded.path), "speculate": args.speculate, "draft": args.draft,
                          "draft_max": args.draft_max, "results": res}))
        return 0
    print(f"model   {loaded.path.name} ({loaded.arch}); --speculate {args.speculate}"
          + (f" --draft {args.draft}" if args.draft else "") + f", draft max {args.draft_max}, tg{args.tg} greedy")
    print(f"{'prompt':>7} {'plain':>8} {'specul.':>8} {'ratio':>6} {'accept':>7} {'tok/step':>8}  same ids"
          f"   (tok/s, medians of {args.repeats} interleaved runs; ratio: median of the pairs' ratios)")
    for name, v in res.items():
        sp = v["speculation"] or {}
        print(f"{name:>7} {v['plain_tps']:8.1f} {v['speculative_tps']:8.1f} {v['ratio']:6.2f} "
              f"{100 * sp.get('acceptance', 0):6.0f}% {sp.get('tokens_per_step', 0):8.2f}  {v['identical_ids']}")
    costs: dict[int, list[float]] = {}
    for v in res.values():
        for T, c in v["pass_cost"].items():
            costs.setdefault(T, []).append(c)
    if costs:   # what decides whether drafting pays on this machine (engine/speculative.py, DraftPolicy)
        print("a step feeding T tokens (drafting + verification) costs, in plain steps: "
              + ", ".join(f"T={T} {statistics.median(c):.2f}" for T, c in sorted(costs.items())))
    return 0
