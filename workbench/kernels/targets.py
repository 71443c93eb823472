"""One way to get a launchable kernel from a registry entry, on the GPU (CuPy) or the CPU emulator.

Both targets give a callable with CuPy's signature ``kernel(grid, block, args, shared_mem=0)``.
Modules are cached per (source text, options, target, warp size); below this, each target keeps
its own caches keyed by the included headers too (see `cupy_target` and `emulator`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from workbench.errors import UserError
from workbench.kernels.registry import KernelSpec

TARGETS = ("emulator", "cupy")
# The emulator's default warp width: a CDNA wavefront (gfx908/gfx90a/gfx940), the main target.
EMULATOR_WARP_SIZE = 64

KernelFn = Callable[..., Any]

_modules: dict[tuple, Any] = {}
_lock = threading.Lock()


def get_function(
    spec: KernelSpec, target: str = "emulator", warp_size: int | None = None
) -> KernelFn:
    """The kernel ``spec.symbol`` built for ``target``: ``kernel(grid, block, args, shared_mem=)``.

    ``warp_size``: the emulator's warp width (32 or 64, default 64). On ``cupy`` the hardware
    decides; a value other than the device's is refused.
    """
    from workbench.kernels.cupy_target import spec_name_expressions

    if target not in TARGETS:
        raise UserError(
            "user.bad_target", f"unknown target {target!r} (known: {', '.join(TARGETS)})"
        )
    exprs = spec_name_expressions(spec)
    text = spec.path.read_text()
    key = (hashlib.sha256(text.encode()).hexdigest(), spec.options, exprs, target, warp_size)
    with _lock:
        module = _modules.get(key)
        if module is None:
            module = _load(spec, target, warp_size, exprs)
            _modules[key] = module
    return module.get_function(spec.symbol)


def _load(spec: KernelSpec, target: str, warp_size: int | None, exprs: Sequence[str]) -> Any:
    if target == "emulator":
        from workbench.kernels.emulator import EmulatorModule

        return EmulatorModule(
            path=spec.path,
            options=spec.options,
            name_expressions=exprs or None,
            warp_size=warp_size or EMULATOR_WARP_SIZE,
        )
    from workbench.kernels.cupy_target import import_cupy, load_module
    from workbench.kernels.cupy_target import warp_size as device_warp_size

    if warp_size is not None:
        actual = device_warp_size(import_cupy())
        if actual != warp_size:
            raise UserError(
                "kernel.bad_launch",
                f"the GPU's warp size is {actual}; warp_size={warp_size} only applies to the "
                "emulator",
            )
    return load_module(spec)


def launch(
    spec: KernelSpec,
    target: str,
    args: Sequence[Any],
    *,
    warp_size: int | None = None,
    **shape: int,
) -> None:
    """Run ``spec`` on ``target`` with the geometry ``spec.launch(**shape)``."""
    geometry = spec.launch(**shape)
    kernel = get_function(spec, target, warp_size)
    kernel(geometry.grid, geometry.block, tuple(args), shared_mem=geometry.shared_mem)


def clear_cache() -> None:
    with _lock:
        _modules.clear()
