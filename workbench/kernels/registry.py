"""The kernel registry: one entry per kernel source, beside its Python wrapper.

An entry names the source file in `kernels/`, its entry symbols (extern "C" names or C++ name
expressions such as ``matvec<GGML_Q4_1>``), compile-time defines, the launch geometry computed from
shapes, the NumPy reference, and a bytes/FLOPs cost model (the profiler and roofline use it).
Modules that define kernels call `register`; `all_kernels` imports them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modules whose import registers kernels. Each owns its own sources.
KERNEL_MODULES = (
    "workbench.kernels.quant_kernels",
    "workbench.kernels.ops_kernels",
    "workbench.kernels.paged_kernels",
    "workbench.kernels.fused_kernels",
)


@dataclass(frozen=True)
class Launch:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0  # dynamic shared memory bytes


@dataclass(frozen=True)
class Cost:
    bytes: int  # bytes moved to and from global memory
    flops: int  # floating-point operations


@dataclass(frozen=True)
class KernelSpec:
    name: str  # registry key, e.g. "rmsnorm" or "matvec_q4_1"
    source: str  # file name in kernels/, e.g. "rmsnorm.hip"
    symbol: str  # the entry symbol or name expression this entry launches
    launch: Callable[..., Launch]  # (**shape) -> geometry
    reference: Callable[..., Any]  # NumPy reference with the kernel's semantics
    cost: Callable[..., Cost]  # (**shape) -> bytes and flops
    description: str = ""
    defines: Mapping[str, int | str] = field(default_factory=dict)
    shapes: tuple[Mapping[str, int], ...] = ()  # representative shapes (benchmarks, checks)

    @property
    def path(self) -> Path:
        return kernels_dir() / self.source

    @property
    def options(self) -> tuple[str, ...]:
        """Compiler options: the defines and the include directory of wb.h."""
        return (*(f"-D{k}={v}" for k, v in self.defines.items()), f"-I{kernels_dir()}")


_REGISTRY: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    """Add a kernel; a second entry under the same name is a bug and is refused."""
    if spec.name in _REGISTRY:
        raise ValueError(f"kernel {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def all_kernels() -> dict[str, KernelSpec]:
    for module in KERNEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return dict(_REGISTRY)


def get(name: str) -> KernelSpec:
    from workbench.errors import UserError

    kernels = all_kernels()
    if name not in kernels:
        raise UserError(
            "user.unknown_kernel", f"no kernel named {name!r} (known: {', '.join(sorted(kernels))})"
        )
    return kernels[name]


def kernels_dir() -> Path:
    """The HIP sources and the emulator's headers: `workbench/_kernels` in an installed wheel,
    `kernels/` in a source checkout."""
    from workbench.errors import BackendError

    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_kernels", here.parent / "kernels"):
        if (candidate / "wb.h").is_file() and (candidate / "emulator" / "wb_emu.h").is_file():
            return candidate
    raise BackendError(
        "backend.kernels_missing",
        "the HIP kernel sources (kernels/wb.h, kernels/emulator/) are not installed with the "
        "workbench; reinstall it from a source checkout or a wheel",
    )
