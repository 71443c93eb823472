"""Wrapping third-party exceptions into the taxonomy at the boundary where they occur.

CuPy, HIP and CUDA errors are matched by class name and message (CuPy is never imported here):
CuPy's ``CUDARuntimeError`` / ``CUDADriverError`` / ``NVRTCError`` carry the runtime's status name
(``cudaErrorMemoryAllocation``, ``hipErrorOutOfMemory``, ...) in their message on both CUDA and
ROCm builds. The first matching rule in `RULES` wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from workbench.errors import (
    BackendError,
    InternalError,
    RecoverableError,
    WorkbenchError,
)

# The code of a device whose context a kernel fault destroyed (fatal for that device).
CONTEXT_LOST = "device.context_lost"


@dataclass(frozen=True)
class Rule:
    error: type[WorkbenchError]
    code: str
    what: str  # the start of the message a person reads
    classes: tuple[str, ...] = ()  # exception class names anywhere in the MRO
    pattern: str | None = None  # regex searched (case-insensitive) in "<class name>: <message>"


RULES: tuple[Rule, ...] = (
    Rule(
        RecoverableError,
        "device.out_of_memory",
        "the device is out of memory",
        classes=("OutOfMemoryError",),
        pattern=r"cudaErrorMemoryAllocation|hipErrorOutOfMemory|hipErrorMemoryAllocation"
        r"|CUDA_ERROR_OUT_OF_MEMORY",
    ),
    # A kernel that trapped (WB_ASSERT), faulted or was killed by the watchdog leaves the
    # context unusable: every later call fails too. Not retried; the engine stops using the
    # device (its breaker opens) and continues on the CPU.
    Rule(
        BackendError,
        CONTEXT_LOST,
        "a kernel fault killed the device context",
        pattern=r"(cuda|hip)Error(LaunchTimeOut|LaunchFailure|IllegalAddress|IllegalInstruction"
        r"|Assert|HardwareStackError|MisalignedAddress|InvalidAddressSpace|InvalidPc"
        r"|ECCNotCorrectable|ContextIsDestroyed|IllegalState)\b"
        r"|CUDA_ERROR_(LAUNCH_TIMEOUT|LAUNCH_FAILED|ILLEGAL_ADDRESS|ILLEGAL_INSTRUCTION|ASSERT"
        r"|HARDWARE_STACK_ERROR|MISALIGNED_ADDRESS|INVALID_ADDRESS_SPACE|INVALID_PC"
        r"|CONTEXT_IS_DESTROYED)\b",
    ),
    Rule(
        BackendError,
        "backend.compile_failed",
        "the runtime compiler could not compile a kernel",
        classes=("CompileException",),
    ),
    Rule(
        BackendError,
        "backend.unavailable",
        "no usable GPU or driver",
        pattern=r"cudaErrorNoDevice|hipErrorNoDevice|cudaErrorInsufficientDriver"
        r"|hipErrorInsufficientDriver|CUDA_ERROR_NO_DEVICE|cudaErrorInitializationError"
        r"|hipErrorNotInitialized|cudaErrorInvalidDevice\b|hipErrorInvalidDevice\b"
        r"|no CUDA-capable device|lib(amdhip64|hiprtc|cudart|nvrtc|cuda)\S*: cannot open",
    ),
    Rule(
        InternalError,
        "device.invalid_argument",
        "a device call got an invalid argument",
        pattern=r"cudaErrorInvalidValue|hipErrorInvalidValue|cudaErrorInvalidConfiguration"
        r"|hipErrorInvalidConfiguration|CUDA_ERROR_INVALID_VALUE|cudaErrorLaunchOutOfResources"
        r"|hipErrorLaunchOutOfResources",
    ),
)
_COMPILED = tuple((r, re.compile(r.pattern, re.IGNORECASE) if r.pattern else None) for r in RULES)


def classify(exc: BaseException, *, operation: str, **context: Any) -> WorkbenchError:
    """The `WorkbenchError` for ``exc`` raised during ``operation``.

    A `WorkbenchError` is returned itself, with ``operation`` and ``context`` added where its own
    context has no such key. Others become a new error (its ``__cause__`` is ``exc``) with
    ``error_type`` and ``error_message`` in its context: device out of memory is recoverable, a
    kernel fault or launch timeout (the context is lost), compile failures and a missing
    device/driver backend errors, invalid
    arguments internal, a host `MemoryError` recoverable ``host.out_of_memory``, anything else
    internal ``internal.unexpected``.
    """
    if isinstance(exc, WorkbenchError):
        for k, v in {"operation": operation, **context}.items():
            if v is not None:
                exc.context.setdefault(k, v)
        return exc
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = f"{type(exc).__name__}: {exc}"
    ctx = {
        "operation": operation,
        **context,
        "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "error_message": str(exc),
    }
    for rule, regex in _COMPILED:
        if names.intersection(rule.classes) or (regex is not None and regex.search(text)):
            err: WorkbenchError = rule.error(
                rule.code, f"{rule.what} during {operation}: {text}", **ctx
            )
            break
    else:
        if isinstance(exc, MemoryError):
            err = RecoverableError(
                "host.out_of_memory", f"the host ran out of memory during {operation}", **ctx
            )
        else:
            err = InternalError(
                "internal.unexpected", f"unexpected {text} during {operation}", **ctx
            )
    err.__cause__ = exc
    return err
