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

    # The vocabulary (Python strings + the tokenizers BPE and its regexes) is a fixed cost
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
    assert r["vocab_cost"] < 64e6  # a 49K vocabulary: strings, maps and the BPE
    # weights are used from the file: no layer keeps a float32 array larger than a norm vector
    assert r["largest_f32"] <= 4 * 4096
