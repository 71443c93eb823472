"""Per-kernel evidence for one decode token: bytes moved against the ideal, global efficiency,
bank conflicts, launches per token, registers and occupancy, and the time floor on a GPU.

`decode_launches.record_decode` records the launches (real emulator runs with memory counters);
this module runs it, here or in a tree exported from another revision of the repository (the
"before" of a kernel change: that revision's kernels driven by its own launch code), and turns
the record into one row per backend operation ("role": ``linear attn_q``, ``attention``, ...;
the same names whatever kernels implement them, so two revisions' tables line up). Rows of a
layer are that layer's counters times the number of layers of its kind (every layer of a kind
launches the same kernels at the same shapes). The time floor is bytes moved over the target's
peak bandwidth (`instrument.TARGETS`: the figure and its source are stated there).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from workbench.engine import decode_launches
from workbench.engine.decode_launches import MODEL_SECTION, Progress, record_decode
from workbench.errors import BackendError, UserError
from workbench.kernels.instrument import target_spec
from workbench.kernels.sanitize_report import duration

RESOURCES_ARCH = "gfx90a"  # the offline compiler's target for the VGPR and occupancy columns
DEFAULT_POSITION = 1024  # tokens already in the KV cache when the reported token is decoded

METHOD = (
    "counters from one decode step on the CPU emulator (greedy pick included), the model reduced "
    "to one layer of each kind; a layer's rows are its counters times the layers of its kind"
)
METHOD_EVERY_LAYER = "counters from one decode step on the CPU emulator (greedy pick included)"
IDEAL = (
    "ideal: each operation's inputs read once and outputs written once (weights, the KV "
    "positions attended, activations)"
)


@dataclass(frozen=True)
class RoleRow:
    """One backend operation's launches in one decode token (all layers of a kind together)."""

    role: str
    per_layer: bool  # True: inside the layers (its figures are summed over them)
    layers: int  # how many of the model's layers run it (0: outside the layers)
    kernels: tuple[str, ...]
    launches: int
    bytes_moved: int
    bytes_requested: int
    ideal_bytes: int
    shared_requests: int
    bank_conflict_ways: float  # mean over shared requests; 1.0 without conflicts (or shared use)
    vgprs: tuple[int | None, ...]  # per kernel, on RESOURCES_ARCH
    occupancy: tuple[int | None, ...]  # waves per SIMD, per kernel
    floor_s: float

    @property
    def efficiency(self) -> float:
        return self.bytes_requested / self.bytes_moved if self.bytes_moved else 1.0

    @property
    def moved_over_ideal(self) -> float:
        return self.bytes_moved / self.ideal_bytes if self.ideal_bytes else float("inf")


@dataclass
class DecodeReport:
    model: str
    source: str  # what kernels: "working tree", "revision X", "kernels dir D"
    target: str
    product: str
    peak_gb_s: float
    warp_size: int
    position: int
    kv_dtype: str
    n_layers: int
    layer_kinds: int
    resources_arch: str | None
    resources_note: str
    rows: list[RoleRow] = field(default_factory=list)
    launches_per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        return sum(r.bytes_moved for r in self.rows)

    @property
    def ideal_bytes(self) -> int:
        return sum(r.ideal_bytes for r in self.rows)

    @property
    def launches(self) -> int:
        return sum(r.launches for r in self.rows)

    @property
    def efficiency(self) -> float:
        moved = self.bytes_moved
        return sum(r.bytes_requested for r in self.rows) / moved if moved else 1.0

    @property
    def floor_s(self) -> float:
        return self.bytes_moved / (self.peak_gb_s * 1e9)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            rows.append({
                "role": r.role, "per_layer": r.per_layer, "layers": r.layers,
                "kernels": list(r.kernels), "launches": r.launches, "bytes_moved": r.bytes_moved,
                "bytes_requested": r.bytes_requested, "ideal_bytes": r.ideal_bytes,
                "moved_over_ideal": r.moved_over_ideal, "efficiency": r.efficiency,
                "shared_requests": r.shared_requests, "bank_conflict_ways": r.bank_conflict_ways,
                "vgprs": list(r.vgprs), "occupancy": list(r.occupancy), "floor_s": r.floor_s,
            })  # fmt: skip
        return {
            "model": self.model, "source": self.source, "target": self.target,
            "product": self.product, "peak_gb_s": self.peak_gb_s, "warp_size": self.warp_size,
            "position": self.position, "kv_dtype": self.kv_dtype, "n_layers": self.n_layers,
            "layer_kinds": self.layer_kinds, "resources_arch": self.resources_arch,
            "resources_note": self.resources_note, "method": METHOD, "ideal": IDEAL,
            "rows": rows, "launches_per_layer": self.launches_per_layer,
            "totals": {
                "launches": self.launches, "bytes_moved": self.bytes_moved,
                "ideal_bytes": self.ideal_bytes, "efficiency": self.efficiency,
                "moved_over_ideal": self.bytes_moved / self.ideal_bytes
                if self.ideal_bytes else None,
                "floor_s": self.floor_s,
            },
        }  # fmt: skip


def build_report(record: dict[str, Any], source: str = "working tree") -> DecodeReport:
    """Rows per role from `record_decode`'s record, scaled to one whole decode token."""
    tspec = target_spec(record["target"])
    layers = record["layers"]
    res = record["resources"]
    acc: dict[str, dict[str, Any]] = {}
    per_layer: dict[str, int] = {}
    for call in record["calls"]:
        section = call["section"]
        times = 1 if section == MODEL_SECTION else int(layers[section]["count"])
        if section != MODEL_SECTION:
            per_layer[section] = per_layer.get(section, 0) + len(call["launches"])
        a = acc.setdefault(call["role"], {
            "per_layer": section != MODEL_SECTION, "kernels": [], "launches": 0, "moved": 0,
            "requested": 0, "ideal": 0, "shared": 0, "ways": 0.0, "layers": 0,
        })  # fmt: skip
        a["layers"] += 0 if section == MODEL_SECTION else times
        a["ideal"] += times * int(call["ideal_bytes"])
        for launch in call["launches"]:
            t = launch["totals"]
            if launch["symbol"] not in a["kernels"]:
                a["kernels"].append(launch["symbol"])
            a["launches"] += times
            a["moved"] += times * int(t.get("bytes_moved", 0))
            a["requested"] += times * int(t.get("bytes_requested", 0))
            shared = times * int(t.get("shared_requests", 0))
            a["shared"] += shared
            a["ways"] += shared * float(t.get("bank_conflict_ways", 1.0))
    rows = []
    for role, a in acc.items():
        found = [res["kernels"].get(k) for k in a["kernels"]]
        rows.append(
            RoleRow(
                role=role,
                per_layer=a["per_layer"],
                layers=a["layers"],
                kernels=tuple(a["kernels"]),
                launches=a["launches"],
                bytes_moved=a["moved"],
                bytes_requested=a["requested"],
                ideal_bytes=a["ideal"],
                shared_requests=a["shared"],
                bank_conflict_ways=a["ways"] / a["shared"] if a["shared"] else 1.0,
                vgprs=tuple(f.get("vgprs") if f else None for f in found),
                occupancy=tuple(f.get("occupancy") if f else None for f in found),
                floor_s=a["moved"] / (tspec.peak_gb_s * 1e9),
            )
        )
    labels = {s: f"{s} (x{layers[s]['count']})" for s in per_layer}
    return DecodeReport(
        model=record["model"],
        source=source,
        target=tspec.name,
        product=tspec.product,
        peak_gb_s=tspec.peak_gb_s,
        warp_size=int(record["warp_size"]),
        position=int(record["position"]),
        kv_dtype=record["kv_dtype"],
        n_layers=int(record["spec"]["n_layers"]),
        layer_kinds=len(layers),
        resources_arch=res.get("arch"),
        resources_note=res.get("note", ""),
        rows=rows,
        launches_per_layer={labels[s]: n for s, n in per_layer.items()},
    )


# --- running the recording: here, or in a tree of another revision -----------------------------


def _repo_root() -> Path:
    from workbench.kernels.registry import kernels_dir

    root = kernels_dir().parent
    if not (root / ".git").exists():
        raise UserError(
            "user.bad_option",
            f"--rev needs a git checkout of the workbench; {root} is not one",
        )
    return root


def _git(root: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise UserError(
            "user.bad_option",
            f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}",
        )
    return proc.stdout


@contextmanager
def exported_tree(rev: str | None = None, kernels: str | Path | None = None) -> Iterator[Path]:
    """A temporary directory with ``workbench/`` and ``kernels/``: both from git revision
    ``rev`` (else the running package), ``kernels/`` replaced by the directory ``kernels`` when
    given (it must hold wb.h and emulator/, as kernels/ does)."""
    import workbench

    with tempfile.TemporaryDirectory(prefix="wb-report-") as tmp:
        tree = Path(tmp)
        if rev is not None:
            root = _repo_root()
            commit = _git(root, "rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
            data = _git(root, "archive", "--format=tar", commit, "workbench", "kernels")
            with tarfile.open(fileobj=BytesIO(data)) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12
                    tar.extractall(tree, filter="data")
                else:
                    tar.extractall(tree)  # our own repository's archive
        else:
            ignore = shutil.ignore_patterns("__pycache__", "_kernels")
            shutil.copytree(Path(workbench.__file__).parent, tree / "workbench", ignore=ignore)
        if kernels is not None:
            src = Path(kernels).expanduser()
            if not (src / "wb.h").is_file() or not (src / "emulator" / "wb_emu.h").is_file():
                raise UserError(
                    "user.bad_option",
                    f"{src} is not a kernels directory (it needs wb.h and emulator/wb_emu.h)",
                )
            shutil.rmtree(tree / "kernels", ignore_errors=True)
            shutil.copytree(src, tree / "kernels")
        elif rev is None:
            from workbench.kernels.registry import kernels_dir

            shutil.copytree(kernels_dir(), tree / "kernels")
        yield tree


_CHILD = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def record_in_tree(tree: Path, params: dict[str, Any], progress: Progress | None) -> dict:
    """`record_decode` run by a Python process whose ``workbench`` package is ``tree``'s."""
    out = tree / "record.json"
    script = Path(decode_launches.__file__).resolve()
    args = json.dumps({**params, "out": str(out)})
    cmd = [sys.executable, "-c", _CHILD, str(tree), str(script), args]
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(decode_launches.PROGRESS_PREFIX):
            if progress is not None:
                progress(*json.loads(line[len(decode_launches.PROGRESS_PREFIX) :]))
        else:
            tail = [*tail, line.rstrip()][-20:]
    proc.wait()
    if proc.returncode != 0 or not out.is_file():
        raise BackendError(
            "backend.record_failed",
            "recording the decode step in the exported tree failed:\n" + "\n".join(tail),
        )
    return json.loads(out.read_text())


def decode_report(
    model_path: str | Path,
    *,
    target: str = "gfx942",
    warp_size: int | None = None,
    position: int = DEFAULT_POSITION,
    resources: bool = True,
    every_layer: bool = False,
    rev: str | None = None,
    kernels: str | Path | None = None,
    progress: Progress | None = None,
) -> DecodeReport:
    """The `DecodeReport` of one decode token of the model at ``model_path``, counted for GPU
    ``target``. ``rev`` (a git revision) or ``kernels`` (a kernels directory) report other
    kernels than the running package's (see `exported_tree`). ``every_layer`` records every
    layer rather than one of each kind (`record_decode`)."""
    tspec = target_spec(target)
    params = {
        "model_path": str(model_path),
        "position": int(position),
        "target": tspec.name,
        "warp_size": int(warp_size or tspec.warp_size),
        "resources_arch": RESOURCES_ARCH if resources else None,
        "every_layer": bool(every_layer),
    }
    if rev is None and kernels is None:
        return build_report(record_decode(progress=progress, **params))
    source = f"revision {rev}" if rev is not None else ""
    if kernels is not None:
        source = (source + ", " if source else "") + f"kernels from {kernels}"
    with exported_tree(rev, kernels) as tree:
        return build_report(record_in_tree(tree, params, progress), source)


# --- tables ---------------------------------------------------------------------------------------

COLUMNS = ("role", "kernels", "launches", "moved", "ideal", "moved/ideal", "efficiency",
           "bank ways", "VGPRs", "occupancy", "floor")  # fmt: skip


def _mib(n: float) -> str:
    """Bytes in the binary unit that keeps 1-4 digits before the point."""
    if n >= 2**30:
        return f"{n / 2**30:.3f} GiB"
    return f"{n / 2**20:.3f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _each(values: tuple[int | None, ...], missing: str) -> str:
    """One figure per kernel of a role ("16 + 52"); one ``missing`` when none is known."""
    if all(v is None for v in values):
        return missing
    return " + ".join(missing if v is None else str(v) for v in values)


def table_rows(report: DecodeReport) -> list[dict[str, str]]:
    """The table's cells, one dict per role and a last one of totals."""
    missing = "n/a" if report.resources_arch is None or report.resources_note else "?"
    rows = []
    for r in report.rows:
        rows.append({
            "role": r.role + (f" (x{r.layers})" if r.per_layer else ""),
            "kernels": " + ".join(r.kernels),
            "launches": str(r.launches),
            "moved": _mib(r.bytes_moved),
            "ideal": _mib(r.ideal_bytes),
            "moved/ideal": f"{r.moved_over_ideal:.2f}",
            "efficiency": f"{r.efficiency:.1%}",
            "bank ways": f"{r.bank_conflict_ways:.2f}" if r.shared_requests else "-",
            "VGPRs": _each(r.vgprs, missing),
            "occupancy": _each(r.occupancy, missing),
            "floor": duration(r.floor_s),
        })  # fmt: skip
    ideal = report.ideal_bytes
    rows.append({
        "role": "total per token", "kernels": "", "launches": str(report.launches),
        "moved": _mib(report.bytes_moved), "ideal": _mib(ideal),
        "moved/ideal": f"{report.bytes_moved / ideal:.2f}" if ideal else "-",
        "efficiency": f"{report.efficiency:.1%}", "bank ways": "", "VGPRs": "", "occupancy": "",
        "floor": duration(report.floor_s),
    })  # fmt: skip
    return rows


def summary_lines(report: DecodeReport) -> list[str]:
    """What the table is of, how it was measured, and the totals in words."""
    r = report
    counts = set(r.launches_per_layer.values())
    if len(counts) == 1 and len(r.launches_per_layer) > 1:
        per_layer = f"{counts.pop()} in each of {len(r.launches_per_layer)} layers"
    else:
        per_layer = ", ".join(f"{k}: {v}" for k, v in r.launches_per_layer.items())
    method = METHOD if r.layer_kinds < r.n_layers else METHOD_EVERY_LAYER
    r_layers = f"{r.n_layers} layers, {r.layer_kinds} of them run"
    if r.resources_arch is None:
        res = "VGPRs and occupancy: not asked for (--no-resources)"
    else:
        res = f"VGPRs and occupancy (waves/SIMD): hipcc's resource report for {r.resources_arch}"
        res += f" ({r.resources_note})" if r.resources_note else ""
    return [
        f"{r.model}: one decode token at position {r.position} ({r.kv_dtype} KV cache), kernels "
        f"of the {r.source}; memory counted for {r.target} ({r.product}, warp {r.warp_size})",
        f"method: {method}; {r_layers}",
        IDEAL,
        f"launches per layer: {per_layer}",
        res,
        f"time floor per token on {r.product}: {r.bytes_moved} bytes moved / {r.peak_gb_s:g} GB/s "
        f"= {duration(r.floor_s)} (a floor: no caches, latencies or clocks modelled)",
    ]


def markdown(report: DecodeReport) -> str:
    """The table as GitHub markdown, its summary lines as a list above it."""
    rows = table_rows(report)
    right = {"launches", "moved", "ideal", "moved/ideal", "efficiency", "bank ways", "floor"}
    lines = [f"- {line}" for line in summary_lines(report)] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---:" if c in right else "---" for c in COLUMNS) + "|")
    for row in rows:
        # kernel names as code: a name expression's <WB_Q4_1> would read as an HTML tag
        kernels = " + ".join(f"`{k}`" for k in row["kernels"].split(" + ") if k)
        cells = [(kernels if c == "kernels" else row[c]).replace("|", "\\|") for c in COLUMNS]
        if row["role"] == "total per token":
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
