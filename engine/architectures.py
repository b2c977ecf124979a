"""The architectures the engine runs (GGUF `general.architecture` values), as names only.

The model picker checks a header against this list without importing the models (and so
numba); engine/models/__init__.py maps each name to its module, and
tests/test_import_graph.py keeps the two equal.
"""

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "phi3", "qwen2", "qwen3", "qwen35")
