"""The tensor types we read: ggml type id, name, block layout, activation type.

No numba here: reading a GGUF header (engine/gguf_file.py, the model picker's discovery)
needs this table only, not the kernels. engine/quants/__init__.py adds each format's
numerics (reference dequantization, kernel) to make `quants.FORMATS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as G


@dataclass(frozen=True)
class BlockFormat:
    """One ggml tensor type's layout: block_size values stored in type_size bytes.

    act: how llama.cpp quantizes the activation for this weight type (its vec_dot_type).
    """

    name: str
    ggml_type: int
    block_size: int
    type_size: int
    act: str  # "q8_0" | "q8_1" | "q8_k" | "f32" | "f16" | "bf16"

    def row_bytes(self, n_cols: int) -> int:
        if n_cols % self.block_size:
            raise ValueError(f"{self.name} rows must be a multiple of {self.block_size} values, got {n_cols}")
        return n_cols // self.block_size * self.type_size


_B = BlockFormat
BLOCK_FORMATS: dict[int, BlockFormat] = {
    f.ggml_type: f
    for f in [
        _B("F32", int(G.F32), 1, 4, "f32"),
        _B("F16", int(G.F16), 1, 2, "f16"),
        _B("BF16", int(G.BF16), 1, 2, "bf16"),
        _B("Q4_0", int(G.Q4_0), 32, 18, "q8_0"),
        _B("Q4_1", int(G.Q4_1), 32, 20, "q8_1"),
        _B("Q5_0", int(G.Q5_0), 32, 22, "q8_0"),
        _B("Q5_1", int(G.Q5_1), 32, 24, "q8_1"),
        _B("Q8_0", int(G.Q8_0), 32, 34, "q8_0"),
        _B("IQ4_NL", int(G.IQ4_NL), 32, 18, "q8_0"),
        _B("Q2_K", int(G.Q2_K), 256, 84, "q8_k"),
        _B("Q3_K", int(G.Q3_K), 256, 110, "q8_k"),
        _B("Q4_K", int(G.Q4_K), 256, 144, "q8_k"),
        _B("Q5_K", int(G.Q5_K), 256, 176, "q8_k"),
        _B("Q6_K", int(G.Q6_K), 256, 210, "q8_k"),
        _B("IQ4_XS", int(G.IQ4_XS), 256, 136, "q8_k"),
    ]
}
SUPPORTED_TYPE_NAMES = tuple(f.name for f in BLOCK_FORMATS.values())


def type_name(ggml_type: int) -> str:
    """ggml's name of a type id (supported or not), or "type id N" for an unknown one."""
    try:
        return G(int(ggml_type)).name
    except ValueError:
        return f"type id {int(ggml_type)}"
