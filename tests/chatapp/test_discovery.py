"""Model discovery: every source, read-only; one row per file with why-not for the unsupported."""

from __future__ import annotations


def test_discovery_finds_every_source_read_only(model_tree, home):
    from chatapp.discovery import candidates
    from chatapp.model_headers import describe
    from chatapp.paths import models_dir

    found = candidates(models_dir(), [], home=home / "home", env={})
    by_source = {(c.source, c.name) for c in found}
    assert ("models", "tiny-llama.gguf") in by_source
    assert ("models", "truncated.gguf") in by_source
    assert ("huggingface", "org/Tiny-GGUF/tiny-hf.Q8_0.gguf") in by_source
    assert ("lmstudio", "someone/tiny/tiny-lms.gguf") in by_source
    assert ("ollama", "tiny:latest") in by_source
    assert len(found) == 5            # the template blob is not a model
    rows = {c.name: describe(c) for c in found}
    tiny = rows["tiny-llama.gguf"]
    assert (tiny.arch, tiny.quant, tiny.context, tiny.supported) == ("llama", "Q8_0", 256, True)
    assert tiny.size == model_tree["tiny"].stat().st_size
    assert rows["tiny:latest"].supported
    bad = rows["truncated.gguf"]
    assert not bad.supported and bad.reason


def test_unsupported_architecture_says_why(home):
    import gguf

    p = home / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_context_length(1024)
    import numpy as np

    w.add_tensor("x.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from chatapp.discovery import Candidate
    from chatapp.model_headers import describe

    e = describe(Candidate(p, "models", p.name))
    assert not e.supported
    assert "mamba" in e.reason and "llama" in e.reason
    assert e.context == 1024
