"""The error log (records, queries, bounds, listeners, threads) and `classify` (third-party
exceptions into the taxonomy, matched by name and message; CuPy is faked, never imported)."""

from __future__ import annotations

import threading

import pytest

from workbench.errors import (
    BackendError,
    InternalError,
    ModelError,
    RecoverableError,
    UserError,
    WorkbenchError,
)
from workbench.runtime.classify import classify
from workbench.runtime.errorlog import COLUMNS, ErrorLog, default_log


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def raised(e: BaseException) -> BaseException:
    try:
        raise e
    except BaseException as caught:
        return caught


# --- the log ------------------------------------------------------------------------------------


def test_record_keeps_every_field() -> None:
    log = ErrorLog(clock=Clock())
    err = raised(
        RecoverableError("device.launch_failed", "launch failed", kernel="matvec", shape=(4, 8))
    )
    rec = log.record(err, operation="launch", request_id="r1", attempts=2, recovered=True)
    assert (rec.time, rec.category, rec.code, rec.message) == (
        1001.0,
        "recoverable",
        "device.launch_failed",
        "launch failed",
    )
    assert (rec.operation, rec.kernel, rec.request_id, rec.attempts, rec.recovered) == (
        "launch",
        "matvec",
        "r1",
        2,
        True,
    )
    assert rec.context == {"kernel": "matvec", "shape": [4, 8]}
    assert rec.traceback is not None and "raise e" in rec.traceback
    assert log.record(err, traceback=False).traceback is None
    assert log.record(err, traceback="given").traceback == "given"
    assert log.record(RecoverableError("x.y", "never raised")).traceback is None


def test_fields_default_from_the_errors_context() -> None:
    log = ErrorLog()
    err = RecoverableError(
        "device.out_of_memory", "oom", operation="alloc", request_id="r9", attempts=3
    )
    rec = log.record(err)
    assert (rec.operation, rec.request_id, rec.attempts, rec.recovered) == ("alloc", "r9", 3, None)


def test_foreign_exceptions_are_classified_when_recorded() -> None:
    log = ErrorLog()
    rec = log.record(raised(KeyError("k")), operation="decode")
    assert (rec.category, rec.code, rec.operation) == ("internal", "internal.unexpected", "decode")
    assert rec.context["error_type"] == "builtins.KeyError"
    assert "KeyError" in (rec.traceback or "")


def test_query_filters_and_validates() -> None:
    log = ErrorLog(clock=Clock())
    log.record(UserError("user.bad_argument", "a"), request_id="r1")
    log.record(RecoverableError("device.launch_failed", "b"), request_id="r1", operation="launch")
    log.record(RecoverableError("device.out_of_memory", "c"), request_id="r2")
    log.record(ModelError("model.bad_magic", "d"))
    assert [r.message for r in log.query(category="recoverable")] == ["b", "c"]
    assert [r.message for r in log.query(code="model.bad_magic")] == ["d"]
    assert [r.message for r in log.query(request_id="r1")] == ["a", "b"]
    assert [r.message for r in log.query(since=1003.0)] == ["c", "d"]
    assert [r.message for r in log.query(operation="launch")] == ["b"]
    assert [r.message for r in log.query(category="recoverable", request_id="r2")] == ["c"]
    assert log.counts() == {
        "user.bad_argument": 1,
        "device.launch_failed": 1,
        "device.out_of_memory": 1,
        "model.bad_magic": 1,
    }
    with pytest.raises(UserError, match="category"):
        log.query(category="fatal")
    with pytest.raises(UserError, match="since"):
        log.query(since="yesterday")  # type: ignore[arg-type]


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError):
        ErrorLog(capacity=0)
    with pytest.raises(UserError):
        ErrorLog(capacity=-5)
    log = ErrorLog()
    with pytest.raises(UserError):
        log.record("not an exception")  # type: ignore[arg-type]
    with pytest.raises(UserError):
        log.record(UserError("user.x", "x"), traceback=3)  # type: ignore[arg-type]


def test_log_is_bounded_and_counts_dropped() -> None:
    log = ErrorLog(capacity=3)
    for i in range(5):
        log.record(RecoverableError("device.launch_failed", f"e{i}"))
    assert [r.message for r in log.query()] == ["e2", "e3", "e4"]
    assert len(log) == 3 and log.dropped == 2
    log.clear()
    assert len(log) == 0 and log.dropped == 0 and log.query() == []


def test_listeners_and_dataframe() -> None:
    log = ErrorLog()
    seen: list[str] = []
    log.add_listener(lambda r: seen.append(r.code))
    log.record(BackendError("backend.unavailable", "no GPU"), operation="load")
    log.record(InternalError("internal.bug", "bug"))
    assert seen == ["backend.unavailable", "internal.bug"]
    df = log.to_dataframe()
    assert list(df.columns) == list(COLUMNS)
    assert list(df["code"]) == ["backend.unavailable", "internal.bug"]
    assert df.loc[0, "operation"] == "load"
    assert list(ErrorLog().to_dataframe().columns) == list(COLUMNS)
    log.remove_listener(log._listeners[0])
    log.record(InternalError("internal.bug", "again"))
    assert len(seen) == 2


def test_default_log_is_one_process_wide_log() -> None:
    assert default_log() is default_log()
    assert isinstance(default_log(), ErrorLog)


def test_threads_hammering_the_log_lose_nothing() -> None:
    log = ErrorLog(capacity=100_000)
    per_thread, n_threads = 500, 8
    heard = [0]
    lock = threading.Lock()

    def count(_: object) -> None:
        with lock:
            heard[0] += 1

    log.add_listener(count)

    def work(k: int) -> None:
        for i in range(per_thread):
            log.record(RecoverableError("device.launch_failed", f"{k}/{i}"), request_id=f"r{k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(log) == heard[0] == per_thread * n_threads
    assert all(len(log.query(request_id=f"r{k}")) == per_thread for k in range(n_threads))


# --- classify -----------------------------------------------------------------------------------


def fake_exception(class_name: str, base: type[BaseException] = Exception) -> type[BaseException]:
    """A class named like CuPy's, in a fake ``cupy_backends.cuda.api.runtime`` module."""
    return type(class_name, (base,), {"__module__": "cupy_backends.cuda.api.runtime"})


CUDARuntimeError = fake_exception("CUDARuntimeError", RuntimeError)
CUDADriverError = fake_exception("CUDADriverError", RuntimeError)
OutOfMemoryError = fake_exception("OutOfMemoryError", MemoryError)
CompileException = fake_exception("CompileException")


@pytest.mark.parametrize(
    ("exc", "cls", "code"),
    [
        (CUDARuntimeError("cudaErrorMemoryAllocation: out of memory"), RecoverableError,
         "device.out_of_memory"),
        (CUDARuntimeError("hipErrorOutOfMemory: out of memory"), RecoverableError,
         "device.out_of_memory"),
        (OutOfMemoryError("Out of memory allocating 1,024 bytes"), RecoverableError,
         "device.out_of_memory"),
        (CUDARuntimeError("cudaErrorLaunchTimeout: the launch timed out"), BackendError,
         "device.context_lost"),
        (CUDARuntimeError("hipErrorLaunchTimeOut: timeout"), BackendError, "device.context_lost"),
        (CUDARuntimeError("hipErrorLaunchFailure: unspecified launch failure"), BackendError,
         "device.context_lost"),
        (CUDARuntimeError("cudaErrorAssert: device-side assert triggered"), BackendError,
         "device.context_lost"),
        (CUDADriverError("CUDA_ERROR_ILLEGAL_INSTRUCTION: an illegal instruction"), BackendError,
         "device.context_lost"),
        (CUDARuntimeError("hipErrorIllegalAddress: an illegal memory access"), BackendError,
         "device.context_lost"),
        (CUDARuntimeError("cudaErrorInvalidValue: invalid argument"), InternalError,
         "device.invalid_argument"),
        (CUDARuntimeError("hipErrorInvalidValue: invalid argument"), InternalError,
         "device.invalid_argument"),
        (CompileException("error: expected ';'"), BackendError, "backend.compile_failed"),
        (CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"), BackendError,
         "backend.unavailable"),
        (CUDADriverError("hipErrorNoDevice: no ROCm-capable device"), BackendError,
         "backend.unavailable"),
        (CUDARuntimeError("cudaErrorInsufficientDriver"), BackendError, "backend.unavailable"),
        (OSError("libamdhip64.so.6: cannot open shared object file"), BackendError,
         "backend.unavailable"),
        (MemoryError(), RecoverableError, "host.out_of_memory"),
        (ValueError("invalid argument"), InternalError, "internal.unexpected"),
        (CUDARuntimeError("cudaErrorIllegalAddress"), BackendError, "device.context_lost"),
    ],
)  # fmt: skip
def test_classify_maps_runtime_errors(exc: BaseException, cls: type, code: str) -> None:
    err = classify(exc, operation="launch", kernel="matvec_q4_0")
    assert type(err) is cls and err.code == code
    assert err.__cause__ is exc
    assert err.context["operation"] == "launch" and err.context["kernel"] == "matvec_q4_0"
    assert err.context["error_message"] == str(exc)
    assert err.context["error_type"].endswith(type(exc).__name__)
    assert "launch" in err.message


def test_classify_passes_workbench_errors_through_with_context_merged() -> None:
    e = RecoverableError("device.launch_failed", "x", kernel="own")
    out = classify(e, operation="launch", kernel="other", request_id="r1", shape=None)
    assert out is e
    assert e.context == {"kernel": "own", "operation": "launch", "request_id": "r1"}


def test_classify_result_is_always_a_workbench_error() -> None:
    for exc in (RuntimeError(), KeyboardInterrupt(), Exception("?")):
        assert isinstance(classify(exc, operation="x"), WorkbenchError)
