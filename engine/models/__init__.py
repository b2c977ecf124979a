"""Architecture registry: general.architecture -> the module that runs it.

Each module has `Args.from_gguf(gguf_file)`, `Model(gguf_file, n_ctx)` with
`forward(tokens, cache, logits=...)` and `make_cache()`.
"""

from __future__ import annotations

from engine.errors import ModelFileError
from engine.models import llama, qwen35

ARCHITECTURES = {
    "llama": llama,
    "qwen35": qwen35,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))


def model_module(gguf_file):
    arch = gguf_file.architecture
    mod = ARCHITECTURES.get(arch)
    if mod is None:
        raise ModelFileError(gguf_file.path, f"architecture {arch!r} is not supported",
                             "architectures " + ", ".join(SUPPORTED_ARCHITECTURES))
    return mod
