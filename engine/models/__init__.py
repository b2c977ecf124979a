"""Architecture registry: general.architecture -> the module that runs it.

Each module has `Args.from_gguf(gguf_file)`, `Model(gguf_file, n_ctx)` (an
engine.models.base.BaseModel) with `forward(tokens, cache, logits=...)` and `make_cache()`,
and `EXAMPLES` (model names for the README's table). docs/models.md describes each one.
"""

from __future__ import annotations

from types import ModuleType

from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.models import gemma3, llama, phi3, qwen2, qwen3, qwen35

ARCHITECTURES = {
    "gemma3": gemma3,
    "llama": llama,
    "phi3": phi3,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "qwen35": qwen35,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))


def model_module(gguf_file: GGUFFile) -> ModuleType:
    arch = gguf_file.architecture
    mod = ARCHITECTURES.get(arch)
    if mod is None:
        raise ModelFileError(gguf_file.path, f"architecture {arch!r} is not supported",
                             "architectures " + ", ".join(SUPPORTED_ARCHITECTURES))
    return mod


# What each architecture has been checked against; rendered into README.md by support_table_markdown().
TESTED = {
    "gemma3": ("real Gemma 3 270M Q4_K_M (PyPI), fetched and cached as the app would: prompt ids and 24-token "
               "greedy replies token-exact with llama.cpp on 3 prompts through the Gemma turn format "
               "(tests/engine/test_arch_gemma3.py, slow; fixtures by tools/make_arch_fixtures.py --gemma3)"),
    "llama": ("SmolLM2-135M Q4_1 vs stored llama.cpp outputs: exact greedy reply, logits within llama.cpp's own "
              "spread; numpy reference forward (tests/engine/test_llamacpp_parity.py, test_llama_model.py)"),
    "phi3": ("tiny fixtures (F32, Q8_0, Q4_K_M by llama.cpp's quantizer; short and long rope factors) vs "
             "llama.cpp logits, batch and token by token: max abs Δ ≤ 0.02 F32 / 0.1 quantized, same greedy "
             "tokens (tests/engine/test_arch_parity.py)"),
    "qwen2": ("tiny fixtures (F32, Q8_0, Q4_K_M by llama.cpp's quantizer) vs llama.cpp logits, batch and token "
              "by token: max abs Δ ≤ 0.02 F32 / 0.1 quantized, same greedy tokens (tests/engine/test_arch_parity.py)"),
    "qwen3": ("tiny fixtures (F32, Q8_0, Q4_K_M by llama.cpp's quantizer) vs llama.cpp logits, batch and token "
              "by token: max abs Δ ≤ 0.02 F32 / 0.1 quantized, same greedy tokens (tests/engine/test_arch_parity.py)"),
    "qwen35": ("tiny fixtures (F32, Q8_0, Q4_K_M mix) vs llama.cpp logits in 3 feeding modes, max abs Δ ≤ 0.02 / 0.1; "
               "4B-shaped load/speed test (tests/engine/test_qwen35.py)"),
}
NOT_SUPPORTED = "qwen3moe, qwen3next, gemma2, gemma3n, phi2, mistral3 (and any architecture not listed)"


def support_table_markdown() -> str:
    """The README's supported-architecture table, generated from the registry."""
    from engine.quants.formats import SUPPORTED_TYPE_NAMES

    types = ", ".join(SUPPORTED_TYPE_NAMES)
    rows = ["| Architecture | Example models | Tensor types | Tested against llama.cpp |",
            "|---|---|---|---|"]
    for arch in SUPPORTED_ARCHITECTURES:
        mod = ARCHITECTURES[arch]
        rows.append(f"| `{arch}` | {mod.EXAMPLES} | any of: {types} | {TESTED.get(arch, 'untested')} |")
    rows.append("")
    rows.append(f"Not supported: {NOT_SUPPORTED}.")
    return "\n".join(rows)
