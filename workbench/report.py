"""Reproducible reports: what produced a result, the result itself, and a shareable HTML page.

- `fingerprint` says what produced a result: Python and package versions, the device, the
  compilers, and the git commit of the source tree (with whether it had uncommitted changes).
- A `RunRecord` pairs one run's parameters and result with its fingerprint and timing;
  `run_generation` and `run_kernel_bench` make them, `save_records` / `load_records` keep them
  in a JSON Lines file (one record a line, appended, so runs from different days compare).
- `build_report` runs ``notebooks/05-reproducible-report.ipynb`` with papermill (values go to its
  ``parameters`` cell) and exports the executed notebook to HTML with nbconvert, without the
  code cells. The CLI's ``workbench report`` is a thin wrapper over it.

Kernel timings are drawn by `workbench.widgets.kernel_timing` (``timings_frame``,
``roofline_plot``), the same pictures as the panel's. Nothing here prints. papermill and nbconvert
are imported only by the functions that need them.
"""

from __future__ import annotations

import html
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import BackendError, UserError

if TYPE_CHECKING:
    from workbench.engine.generate import Engine, GenerationConfig

DISTRIBUTION = "rocm-workbench"
REPORT_NOTEBOOK = "05-reproducible-report.ipynb"
# Extras whose packages, when installed, change results (GPU array libraries).
_RESULT_EXTRAS = ("rocm", "cuda")
_TOOLS = ("hipcc", "nvcc", "c++")
_GIT_TIMEOUT_S = 10
_TOOL_TIMEOUT_S = 60


# --- the environment fingerprint -----------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    created: str  # ISO 8601, UTC, seconds
    workbench: str  # the package version
    python: str
    platform: str  # platform.platform()
    cpu_count: int
    device: Mapping[str, Any]  # {"kind": "gpu"|"cpu", "name": ..., ...}
    packages: Mapping[str, str]  # distribution -> version, the runtime dependencies installed
    tools: Mapping[str, str | None]  # compiler -> first line of --version (None: not found)
    git_commit: str | None  # None outside a git checkout
    git_dirty: bool | None  # uncommitted changes to tracked files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fingerprint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs, nested mappings flattened, for a table."""
        commit = self.git_commit or "not a git checkout"
        if self.git_commit and self.git_dirty:
            commit += " (with uncommitted changes)"
        rows = [
            ("created", self.created),
            ("workbench", self.workbench),
            ("git commit", commit),
            ("python", self.python),
            ("platform", self.platform),
            ("cpu count", str(self.cpu_count)),
        ]
        rows += [(f"device {k}", str(v)) for k, v in self.device.items()]
        rows += [(f"package {k}", v) for k, v in self.packages.items()]
        rows += [(f"tool {k}", v or "not found") for k, v in self.tools.items()]
        return rows

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self.rows()
        )
        return f"<table class='workbench-fingerprint'>{body}</table>"

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in self.rows())


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _first_line(cmd: Sequence[str], timeout: float) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def package_versions() -> dict[str, str]:
    """The package's runtime dependencies as installed, plus the GPU extras' when present."""
    names = [DISTRIBUTION]
    for req in metadata.requires(DISTRIBUTION) or ():
        name, _, marker = req.partition(";")
        name = name.strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        if not marker or any(f'extra == "{e}"' in marker for e in _RESULT_EXTRAS):
            names.append(name)
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an optional GPU package that is not installed
    return out


def device_info() -> dict[str, Any]:
    """The GPU CuPy sees first, else the CPU."""
    from workbench.engine.generate import gpu_available

    if gpu_available():
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)

        def text(key: str) -> str:
            v = props.get(key, b"")
            return (v.decode() if isinstance(v, bytes) else str(v)).strip("\x00 ")

        return {
            "kind": "gpu",
            "name": text("name"),
            "arch": text("gcnArchName") or f"sm_{props['major']}{props['minor']}",
            "warp_size": int(props["warpSize"]),
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "runtime": "HIP" if cupy.cuda.runtime.is_hip else "CUDA",
            "runtime_version": int(cupy.cuda.runtime.runtimeGetVersion()),
        }
    return {"kind": "cpu", "name": _cpu_name(), "machine": platform.machine()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(path: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``path`` (default: this package's source)."""
    where = str(path or Path(__file__).resolve().parent)
    if shutil.which("git") is None:
        return None, None
    commit = _first_line(["git", "-C", where, "rev-parse", "HEAD"], _GIT_TIMEOUT_S)
    if commit is None:
        return None, None
    try:
        status = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return commit, None
    return commit, bool(status.stdout.strip())


def fingerprint() -> Fingerprint:
    """The environment this process runs in (takes a second or so: it asks the compilers)."""
    import workbench

    commit, dirty = git_state()
    tools = {
        t: _first_line([t, "--version"], _TOOL_TIMEOUT_S) if shutil.which(t) else None
        for t in _TOOLS
    }
    return Fingerprint(
        created=_now(),
        workbench=workbench.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count() or 1,
        device=device_info(),
        packages=package_versions(),
        tools=tools,
        git_commit=commit,
        git_dirty=dirty,
    )


# --- run records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    kind: str  # "generate", "bench_kernels", or a caller's own
    params: Mapping[str, Any]  # what was asked for
    result: Any  # JSON-serialisable: a dict, or a list of dicts
    fingerprint: Fingerprint
    started: str  # ISO 8601, UTC
    duration_s: float
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fingerprint"] = self.fingerprint.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        return cls(
            kind=d["kind"],
            params=d["params"],
            result=d["result"],
            fingerprint=Fingerprint.from_dict(d["fingerprint"]),
            started=d["started"],
            duration_s=float(d["duration_s"]),
            labels=d.get("labels", {}),
        )


def record(
    kind: str,
    params: Mapping[str, Any],
    run: Callable[[], Any],
    *,
    fp: Fingerprint | None = None,
    labels: Mapping[str, str] | None = None,
) -> RunRecord:
    """Call ``run`` (returning a JSON-serialisable result) and record it with its parameters."""
    started, t0 = _now(), time.perf_counter()
    result = run()
    return RunRecord(
        kind=kind,
        params=dict(params),
        result=result,
        fingerprint=fp or fingerprint(),
        started=started,
        duration_s=time.perf_counter() - t0,
        labels=dict(labels or {}),
    )


def run_generation(
    engine: Engine,
    prompt: str,
    config: GenerationConfig,
    *,
    fp: Fingerprint | None = None,
) -> RunRecord:
    """Generate from ``prompt`` and record the text, token ids, finish reason and timings."""
    params = {
        "model": engine.model.name,
        "model_path": str(engine.model.path),
        "backend": type(engine.backend).__name__,
        "prompt": prompt,
        "config": asdict(config),
    }

    def run() -> dict[str, Any]:
        r = engine.generate(prompt, config).run()
        return {
            "text": r.text,
            "token_ids": r.token_ids,
            "finish_reason": r.finish_reason,
            "timings": r.timings.to_dict(),
        }

    return record("generate", params, run, fp=fp)


def run_kernel_bench(
    kernels: Sequence[str] = (),
    *,
    backend: str = "auto",
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    fp: Fingerprint | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> RunRecord:
    """`kernel_bench.bench_kernels` recorded; ``backend`` "numpy" means the emulator here.
    ``progress`` goes to `bench_kernels` (done, total, kernel) for the caller to present."""
    from workbench.engine.kernel_bench import bench_kernels

    backend = kernel_backend(backend)
    params = {
        "kernels": list(kernels),
        "backend": backend,
        "warmup_ms": warmup_ms,
        "rep_ms": rep_ms,
    }

    def run() -> list[dict[str, Any]]:
        results = bench_kernels(
            kernels, backend=backend, warmup_ms=warmup_ms, rep_ms=rep_ms, progress=progress
        )
        return [t.to_dict() for t in results]

    return record("bench_kernels", params, run, fp=fp)


def value_text(value: Any) -> str:
    """A parameter or a measurement as a reader wants it: integers as integers (5, not
    5.000000), other numbers to 4 significant digits, lists comma-separated, text as is."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(value_text(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class ValueTable:
    """Named values shown as a two-column table (HTML in a notebook, aligned text elsewhere),
    each value whole (pandas would cut long ones to "..."): the report's parameters and
    timings."""

    values: Mapping[str, Any]
    title: str = "value"

    def rows(self) -> list[tuple[str, str]]:
        return [(str(k), value_text(v)) for k, v in self.values.items()]

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self.rows()
        )
        return (
            f"<table><thead><tr><th></th><th style='text-align:left'>{html.escape(self.title)}"
            f"</th></tr></thead><tbody>{body}</tbody></table>"
        )

    def __repr__(self) -> str:
        rows = self.rows()
        width = max((len(k) for k, _ in rows), default=0)
        return "\n".join([f"{'':{width}}  {self.title}", *(f"{k:{width}}  {v}" for k, v in rows)])


def value_table(values: Mapping[str, Any], title: str = "value") -> ValueTable:
    """``values`` (name -> value) as a `ValueTable` of `value_text`: the report notebook's
    parameter and timing tables."""
    return ValueTable(dict(values), title)


def kernel_backend(engine_backend: str) -> str:
    """The kernel benchmark's backend for an engine backend: the CPU engine's kernels run on
    the emulator."""
    return "emulator" if engine_backend == "numpy" else engine_backend


def save_records(path: str | os.PathLike[str], records: Iterable[RunRecord]) -> Path:
    """Append records to a JSON Lines file (created with its directory when missing)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), sort_keys=True) + "\n")
    return p


def load_records(path: str | os.PathLike[str]) -> list[RunRecord]:
    p = Path(path)
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(RunRecord.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                "user.bad_run_record", f"{p}:{n} is not a run record ({e})", path=str(p), line=n
            ) from None
    return out


# --- the report notebook --------------------------------------------------------------------------


def notebooks_dir() -> Path:
    """The notebooks: ``workbench/_notebooks`` in an installed wheel, ``notebooks/`` of the
    source checkout otherwise."""
    here = Path(__file__).resolve().parent
    shipped = here / "_notebooks"
    return shipped if (shipped / REPORT_NOTEBOOK).is_file() else here.parent / "notebooks"


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` -> (k, v), v read as JSON when it is JSON (numbers, lists, true), else text."""
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key.isidentifier():
        raise UserError(
            "user.bad_param", f"a parameter is NAME=VALUE with a Python name, not {text!r}"
        )
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def notebook_parameters(notebook: str | os.PathLike[str]) -> dict[str, Any]:
    """The names and default values of a notebook's ``parameters`` cell (values that are not
    Python literals stay as their source text)."""
    import ast

    import papermill as pm

    out: dict[str, Any] = {}
    for name, p in pm.inspect_notebook(str(notebook)).items():
        try:
            out[name] = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            out[name] = p["default"]
    return out


def execute_notebook(
    notebook: str | os.PathLike[str],
    output: str | os.PathLike[str],
    parameters: Mapping[str, Any] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout_s: float | None = None,
) -> Path:
    """Run a notebook with papermill, ``parameters`` injected after its ``parameters`` cell.

    The kernel is this interpreter's (Jupyter maps the ``python3`` kernel to `sys.executable`).
    A failing cell raises `BackendError` ``backend.notebook_failed`` with the cell's error;
    a `UserError` raised inside the notebook (a bad parameter) comes back as a `UserError`.
    """
    import papermill as pm

    src, dst = Path(notebook), Path(output)
    if not src.is_file():
        raise UserError("user.no_notebook", f"notebook {src} not found", path=str(src))
    known = notebook_parameters(src)
    unknown = sorted(set(parameters or {}) - set(known))
    if unknown:
        raise UserError(
            "user.bad_param",
            f"{src.name} has no parameter {', '.join(unknown)}; it takes {', '.join(known)}",
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(src),
            str(dst),
            parameters=dict(parameters or {}),
            cwd=str(cwd or src.parent),
            kernel_name="python3",
            progress_bar=False,
            log_output=False,
            execution_timeout=timeout_s,
        )
    except pm.PapermillExecutionError as e:
        message = f"{src.name}, cell {e.exec_count}: {e.ename}: {e.evalue}"
        context = {"notebook": str(src), "executed": str(dst), "cell": e.exec_count}
        if e.ename in ("UserError", "ModelError"):
            raise UserError("user.notebook_failed", message, **context) from None
        raise BackendError("backend.notebook_failed", message, **context) from None
    return dst


# JupyterLab's HTML template without the scripts it loads from a CDN (require.js, MathJax,
# mermaid, the widget manager): a report opens offline. Widget views in it show their text form.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def notebook_title(nb: Any, default: str) -> str:
    """The text of the notebook's first ``# `` heading, else ``default``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return default


def export_html(
    notebook: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    include_input: bool = False,
    title: str | None = None,
) -> Path:
    """An executed notebook as one self-contained HTML page that opens offline (plots embedded
    as PNG, no script from the network). ``title``: the page's title (default: the notebook's
    first heading)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata["title"] = title or notebook_title(nb, Path(notebook).stem)
    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[jinja2.DictLoader({"workbench-offline.html.j2": _OFFLINE_TEMPLATE})],
        template_file="workbench-offline.html.j2",
        exclude_input=not include_input,
        exclude_input_prompt=not include_input,
        exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(nb)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def build_report(
    output: str | os.PathLike[str] = "report.html",
    *,
    parameters: Mapping[str, Any] | None = None,
    notebook: str | os.PathLike[str] | None = None,
    executed: str | os.PathLike[str] | None = None,
    include_input: bool = False,
    timeout_s: float | None = None,
) -> Path:
    """Run the report notebook with ``parameters`` and write it as HTML to ``output``.

    ``executed``: also keep the executed notebook there (default: a temporary file).
    """
    src = Path(notebook) if notebook else notebooks_dir() / REPORT_NOTEBOOK
    if not src.is_file():
        raise UserError(
            "user.no_notebook",
            f"the report notebook {src} is not here: `workbench report` runs from a source "
            "checkout (pip install -e .), or pass the notebook's path",
            path=str(src),
        )
    values = {**notebook_parameters(src), **(parameters or {})}
    title = None
    if "model" in values:  # the report notebook's own: say what produced it
        title = f"workbench report: {values['model']}"
        if "backend" in values:
            title += f", backend {values['backend']}"
    with tempfile.TemporaryDirectory(prefix="workbench-report-") as tmp:
        nb_out = Path(executed) if executed else Path(tmp) / src.name
        execute_notebook(src, nb_out, parameters, timeout_s=timeout_s)
        return export_html(nb_out, output, include_input=include_input, title=title)


__all__ = [
    "Fingerprint",
    "RunRecord",
    "ValueTable",
    "build_report",
    "device_info",
    "execute_notebook",
    "export_html",
    "fingerprint",
    "git_state",
    "kernel_backend",
    "load_records",
    "notebook_parameters",
    "notebook_title",
    "notebooks_dir",
    "package_versions",
    "parse_param",
    "record",
    "run_generation",
    "run_kernel_bench",
    "save_records",
    "value_table",
    "value_text",
]
