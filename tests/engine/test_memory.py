"""Loading maps the weights instead of copying or expanding them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

# Run in a fresh process so nothing else in the test session pollutes RSS.
PROBE = textwrap.dedent("""
    import ctypes, gc, json, sys
    import numpy as np
    import engine.loader
    from engine.gguf_file import GGUFFile
    from engine.runtime import current_rss_bytes
    from engine.tokenizer import Tokenizer
    from tests.tiny_models import write_tiny_llama

    def settled_rss():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return current_rss_bytes()

    # numba's runtime and the cached kernels are a per-process cost, not the model's:
    # run a tiny model of the same kind first so they are loaded before measuring.
    tiny = engine.loader.load_model(write_tiny_llama(sys.argv[2] + "/tiny.gguf", weight_type=int(sys.argv[3])), n_ctx=256)
    c = tiny.model.make_cache(); tiny.model.forward([1, 2, 3], c); tiny.model.forward([4], c)

    # The vocabulary (token bytes, the BPE tables, the split regexes) is a fixed cost
    # that does not grow with the weights: measure it on its own.
    base = settled_rss()
    with GGUFFile(sys.argv[1]) as gf:
        tok = Tokenizer.from_metadata(gf.metadata)
        vocab_cost = settled_rss() - base
        del tok
    before = settled_rss()
    loaded = engine.loader.load_model(sys.argv[1], n_ctx=256)
    cache = loaded.model.make_cache()
    loaded.model.forward([1, 2, 3], cache)     # touches every weight page once
    loaded.model.forward([4], cache)
    after = settled_rss()
    floats = max((a.nbytes for l in loaded.model.layers for a in vars(l).values()
                  if isinstance(a, np.ndarray) and a.dtype == np.float32), default=0)
    print(json.dumps({"added": after - before, "vocab_cost": vocab_cost, "file": loaded.file_size,
                      "largest_f32": floats}))
""")


def test_loading_maps_weights_instead_of_copying(default_model_path, tmp_path):
    from gguf import GGMLQuantizationType as G

    args = [sys.executable, "-c", PROBE, str(default_model_path), str(tmp_path), str(int(G.Q4_1))]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    weights_added = r["added"] - r["vocab_cost"]
    assert weights_added <= 1.15 * r["file"], (
        f"loading added {r['added'] / 1e6:.1f} MB ({r['vocab_cost'] / 1e6:.1f} MB vocabulary) "
        f"for a {r['file'] / 1e6:.1f} MB file")
    # a 49K vocabulary in flat tables (engine.bpe): ~4 MB of arrays, plus the header's pages and
    # the BPE kernels' code, ~7 MB in all (with tokenizers' BPE: ~20 MB)
    assert r["vocab_cost"] < 12e6, f"the vocabulary costs {r['vocab_cost'] / 1e6:.1f} MB"
    # weights are used from the file: no layer keeps a float32 array larger than a norm vector
    assert r["largest_f32"] <= 4 * 4096


KV_CHURN = textwrap.dedent("""
    import numpy as np
    from engine.cache import KVCache
    from engine.runtime import current_rss_bytes, peak_rss_bytes
    base = current_rss_bytes()
    for _ in range(3):                      # as `bench` runs pp128, pp512, tg128 in rounds
        for n in (128, 512, 129):
            caches = [KVCache(8192, 3, 64) for _ in range(30)]   # SmolLM2 at 8K context
            x = np.ones((n, 3, 64), np.float32)
            work = [np.ones(n * 200) for _ in range(10)]
            for c in caches:
                c.write(x, x)
            del caches, x, work
    print(peak_rss_bytes() - base)
""")


def test_kv_cache_pages_become_resident_only_when_written():
    """A KV cache for a long context costs only the positions written. With np.zeros the
    caches of later rounds come from malloc's heap (glibc raises its mmap threshold after
    big frees) and calloc zero-fills them whole: this churn then peaks at +400 MB."""
    out = subprocess.run([sys.executable, "-c", KV_CHURN], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    # 512 positions x 30 layers x K+V in fp16 = 12 MB written, plus the work buffers
    assert grown < 60e6, f"peak RSS grew {grown / 1e6:.0f} MB"
