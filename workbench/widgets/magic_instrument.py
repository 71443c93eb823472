"""``%%hip ... --sanitize`` and ``%%hip ... --profile``: one instrumented emulator launch of the
cell's kernel, its findings or its source view shown under the cell.

Whatever backend the cell was built for, these runs are on the CPU emulator (the instruments are
the emulator's). The launch takes fresh arguments from ``--args`` and is separate from the
checked and timed launches, so instruments never slow those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.kernels.instrument import KernelReport
from workbench.kernels.sanitize_report import (
    FINDING_COLUMNS,
    SOURCE_COLUMNS,
    SanitizeRun,
    TimeFloor,
    findings_rows,
    floor_lines,
    source_rows,
    text_table,
    time_floor,
    totals_rows,
)


@dataclass
class InstrumentedCell:
    """What the instrumented launch of a cell's kernel reported, ready to show."""

    report: KernelReport
    rename: dict[str, str]  # the cell's source file -> "<cell NAME>"
    read_lines: Callable[[str], Sequence[str]]
    floor: TimeFloor | None = None  # with counters
    findings: list[dict] = field(default_factory=list)
    stopped: str = ""  # why the emulator stopped the launch (a wild write), if it did

    def source_view(self, context: int | None = 2) -> list[dict[str, str]]:
        from workbench.kernels.registry import kernels_dir

        return source_rows(
            self.report, self.read_lines, context=context, roots=[kernels_dir()],
            rename=self.rename,
        )  # fmt: skip

    def sanitize_lines(self) -> list[str]:
        r = self.report
        head = f"sanitize ({', '.join(r.tools)}, CPU emulator, warp {r.warp_size}): "
        stopped = [f"the emulator stopped the launch: {self.stopped}"] if self.stopped else []
        if not self.findings:
            return [head + "no findings", *stopped]
        table = text_table(FINDING_COLUMNS, self.findings)
        return [head + f"{len(self.findings)} finding(s)", *stopped, table]

    def profile_lines(self) -> list[str]:
        r = self.report
        rows = self.source_view(context=None)
        out = [f"memory counters for {r.target} (warp {r.warp_size}), CPU emulator:"]
        out.append(text_table(SOURCE_COLUMNS, rows) if rows else "no memory accesses counted")
        out += [f"{label}: {value}" for label, value in totals_rows(r)]
        if self.floor is not None:
            out += floor_lines(self.floor)
        return out


def instrumented_launch(
    cell: str,
    name: str,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: Sequence[Any],
    *,
    shared_mem: int = 0,
    tools: Sequence[str] = (),
    counters: bool = False,
    target: str | None = None,
    warp_size: int | None = None,
) -> InstrumentedCell:
    """Build the cell for the emulator with ``tools`` and/or ``counters`` (modelled on
    ``target``), launch it once on ``args`` (host arrays, written in place) and collect the
    report. ``warp_size`` defaults to the target's (`instrument_warp`)."""
    warp_size = warp_size or instrument_warp(target)
    from workbench.kernels.cupy_target import is_name_expression
    from workbench.kernels.emulator import EmulatorModule
    from workbench.kernels.instrument import DEFAULT_TARGET

    exprs = [name] if is_name_expression(name) else None
    module = EmulatorModule(
        cell, name_expressions=exprs, warp_size=warp_size, tools=tuple(tools),
        counters=counters, target=target or DEFAULT_TARGET,
    )  # fmt: skip
    kernel = module.get_function(name)
    stopped = ""
    try:
        kernel(grid, block, tuple(args), shared_mem=shared_mem)
        report: KernelReport = kernel.last_report
    except WorkbenchError as e:  # a stopped launch carries the findings made until then
        if not isinstance(e.context.get("report"), KernelReport):
            raise
        report, stopped = e.context["report"], f"{e.code}: {e.message}"
    cell_file = str(module.source)
    cell_lines = cell.splitlines()
    source_lines = getattr(module, "source_lines", None)

    def read_lines(path: str) -> Sequence[str]:
        if path == cell_file:
            return cell_lines
        if source_lines is not None:
            return source_lines(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()

    rename = {cell_file: f"<cell {name}>"}
    stopped = stopped.replace(Path(cell_file).name, rename[cell_file])
    run = SanitizeRun(name, warp_size, report)
    return InstrumentedCell(
        report=report,
        rename=rename,
        read_lines=read_lines,
        floor=time_floor(report) if counters else None,
        findings=findings_rows([run], rename=rename) if tools else [],
        stopped=stopped,
    )


def instrument_warp(target: str | None) -> int:
    """The cell's warp width when ``--warp`` is not given: the ``--target``'s, else 64."""
    if target:
        from workbench.kernels.instrument import target_spec

        return target_spec(target).warp_size
    return 64


def run_instrumented(
    opts: Any, cell: str, result: Any, make_args: Callable[[], Sequence[Any]]
) -> None:
    """``--sanitize`` and ``--profile`` of a parsed ``%%hip`` line (``opts``): one instrumented
    emulator launch each, on fresh arguments, stored on ``result`` (a `magic.HipResult`)."""
    from workbench.kernels.instrument import TOOLS, check_tools

    grid, block = result.grid, result.block
    common: dict[str, Any] = {"shared_mem": opts.shared, "warp_size": opts.warp}
    if opts.sanitize:
        tools = check_tools([t.strip() for t in opts.tools.split(",")]) if opts.tools else TOOLS
        result.sanitize = instrumented_launch(
            cell, opts.name, grid, block, make_args(), tools=tools, **common
        )
    if opts.profile:
        result.profile = instrumented_launch(
            cell, opts.name, grid, block, make_args(), counters=True, target=opts.target,
            **common,
        )  # fmt: skip
