"""Quantization types the workbench supports, and their block layouts.

The block layout (elements per block, bytes per block) is taken from `gguf.GGML_QUANT_SIZES`, the
table gguf-py itself uses; nothing here restates it.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType

# Every tensor type the loader accepts; kernels and backends cover exactly this set.
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16,
    Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def block_layout(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``qtype``."""
    return GGML_QUANT_SIZES[qtype]


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes that one row of ``n_cols`` elements occupies in a GGUF file."""
    block, nbytes = block_layout(qtype)
    if n_cols % block:
        raise ValueError(
            f"{qtype.name} rows must hold a multiple of {block} elements, not {n_cols}"
        )
    return n_cols // block * nbytes
