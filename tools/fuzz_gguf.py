"""Fuzz the GGUF path: mutated files through the loader, describe() and a 2-token generation.

    .venv/bin/python tools/fuzz_gguf.py                 # 10,000 cases, 2 workers, 10 s per case
    .venv/bin/python tools/fuzz_gguf.py -n 500 --json   # a quick run, counts as JSON

Each case runs in a worker process watched by this one: over the time limit it counts as a
hang, over the worker's baseline RSS + file + 300 MB as a memory blow-up (the worker is killed
and replaced). The mutation and worker logic lives in tests/gguf_fuzz.py (the test suite runs a
subset of it). Exit status 1 if any case gave a traceback, a crash, a hang or a memory blow-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.gguf_fuzz import run_cases, seed_files  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the workers")
    ap.add_argument("--keep", type=Path, default=None, help="save the files of bad cases here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gguf-fuzz-seeds-") as tmp:
        seeds = seed_files(Path(tmp))
        progress = None if args.json else (
            lambda done, rep: print(f"{done:6d} cases  {dict(rep.counts)}", file=sys.stderr, flush=True))
        report = run_cases(seeds, args.cases, seed=args.seed, workers=args.workers, time_limit=args.time_limit,
                           nice=args.nice, progress=progress, keep_dir=args.keep)
    summary = report.summary()
    summary["seeds"] = [p.name for p in seeds]
    bad = report.bad()
    summary["bad_examples"] = {k: report.examples[k][0] + " :: " + report.examples[k][1][:600] for k in bad}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
