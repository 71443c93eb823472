"""Kernel parameters as the emulator passes them: the signature codes of wb_emu.h, the C types
they name, where each argument's bytes go, and the launch geometry limits of a GPU."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import UserError

# Signature codes (see wb_emu.h) -> struct format for values passed by value.
_SCALAR_FORMATS = {
    "i8": "b",
    "i16": "h",
    "i32": "i",
    "i64": "q",
    "u8": "B",
    "u16": "H",
    "u32": "I",
    "u64": "Q",
    "f32": "f",
    "f64": "d",
    "bool": "?",
}
_DTYPES = {
    "i8": np.dtype(np.int8),
    "i16": np.dtype(np.int16),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "u8": np.dtype(np.uint8),
    "u16": np.dtype(np.uint16),
    "u32": np.dtype(np.uint32),
    "u64": np.dtype(np.uint64),
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    "bool": np.dtype(np.bool_),
}
_C_NAMES = {
    "i8": "int8_t",
    "i16": "int16_t",
    "i32": "int32_t",
    "i64": "int64_t",
    "u8": "uint8_t",
    "u16": "uint16_t",
    "u32": "uint32_t",
    "u64": "uint64_t",
    "f32": "float",
    "f64": "double",
    "bool": "bool",
    "void": "void",
}


def _c_name(code: str) -> str:
    if code.startswith("p:c:"):
        return "const " + _c_name(code[4:]) + "*"
    if code.startswith("p:"):
        return _c_name(code[2:]) + "*"
    if code.startswith("b") and code[1:].isdigit():
        return f"<{code[1:]}-byte struct>"
    return _C_NAMES.get(code, code)


@dataclass(frozen=True)
class _Param:
    index: int
    code: str
    offset: int  # where its bytes go in the argument buffer
    size: int
    const: bool = False  # a pointer to const: the kernel cannot write through it


def _params(codes: Sequence[str]) -> tuple[list[_Param], int]:
    params, offset = [], 0
    for i, raw in enumerate(codes):
        const = raw.startswith("p:c:")
        code = "p:" + raw[4:] if const else raw
        if code.startswith("p:"):
            size = struct.calcsize("P")
        elif code in _SCALAR_FORMATS:
            size = struct.calcsize(_SCALAR_FORMATS[code])
        elif code.startswith("b") and code[1:].isdigit():
            size = int(code[1:])
        else:
            raise UserError(
                "kernel.bad_signature",
                f"parameter {i} has a type the emulator cannot pass ({code})",
            )
        params.append(_Param(i, code, offset, size, const))
        offset += (size + 15) // 16 * 16
    return params, max(offset, 16)


# The GPU's limits, enforced so a launch that works here also works there.
_MAX_GRID = (2**31 - 1, 65535, 65535)
_MAX_BLOCK = (1024, 1024, 64)


def _dims(value: Any, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else value
    ok = (
        isinstance(dims, (tuple, list))
        and 1 <= len(dims) <= 3
        and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims)
    )
    if ok:
        full = (*(int(d) for d in dims), *(1,) * (3 - len(dims)))
        if all(1 <= d <= lim for d, lim in zip(full, limits)):
            return full  # type: ignore[return-value]
    raise UserError(
        "kernel.bad_launch",
        f"{what} must be a positive int or a tuple of 1 to 3 positive ints within {limits}, "
        f"not {value!r}",
    )
