"""`workbench kernels`: list the registered kernels, check them for GPU targets, print their ISA
(sanitize and profile, on the instrumented emulator: `kernels_instrument`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from workbench.errors import BackendError

CHECK_HELP = """\
Compile registered kernels offline for GPU targets (no GPU needed) and print what the compiler
reports per kernel: for AMD (gfx*) VGPRs, AGPRs, SGPRs, LDS bytes per block, scratch bytes per
lane, spilled registers and occupancy in waves per SIMD (hipcc -Rpass-analysis=
kernel-resource-usage); for NVIDIA (sm_*) registers, shared memory bytes per block, stack bytes
and spill bytes (ptxas -v). Each source is compiled once per target.

Exit status: 0 when every kernel compiled for every target that was built; 5 when any kernel
failed to compile, or when a target named in --arch has no compiler on this machine. Without
--arch, a target whose compiler is missing (say nvcc) is reported as one line and skipped.
"""

ASM_HELP = """\
Print the machine code of one kernel for one target: AMD assembly with its kernel descriptor
(hipcc -S --cuda-device-only), or PTX for NVIDIA targets.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "kernels",
        help="list, check, disassemble, sanitize, profile and report the HIP kernels",
        description="The kernel library: the registry, offline resource reports for AMD and "
        "NVIDIA targets, per-kernel ISA, and the CPU emulator's sanitizers and memory counters.",
    )
    actions = parser.add_subparsers(dest="kernels_command", metavar="ACTION")
    parser.set_defaults(func=lambda _args: _usage(parser))

    p = actions.add_parser(
        "list",
        help="the registered kernels",
        description="List the registry: name, source file, entry symbol, description.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_list)

    p = actions.add_parser(
        "check",
        help="compile kernels for GPU targets and report their resources",
        description=CHECK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--arch",
        type=_archs,
        default=None,
        help="comma-separated targets (default: gfx908,gfx90a,gfx940,gfx1030,sm_90)",
    )
    p.add_argument(
        "--kernel",
        action="append",
        default=None,
        metavar="NAME",
        help="only this kernel (repeatable; default: all)",
    )
    p.add_argument("-j", "--jobs", type=int, default=2, help="compilers at once (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_check)

    p = actions.add_parser(
        "asm",
        help="print one kernel's ISA",
        description=ASM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="registry name (see `workbench kernels list`)")
    p.add_argument("--arch", default="gfx90a", help="target (default gfx90a)")
    p.set_defaults(func=_asm)

    from workbench.cli import kernels_instrument, kernels_report

    kernels_instrument.register(actions)
    kernels_report.register(actions)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _archs(text: str) -> list[str]:
    from workbench.kernels.toolchain import vendor_of

    archs = [a.strip() for a in text.split(",") if a.strip()]
    if not archs:
        raise argparse.ArgumentTypeError("give at least one target")
    for a in archs:
        try:
            vendor_of(a)
        except Exception as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return archs


def _list(args: argparse.Namespace) -> int:
    from workbench.kernels.registry import all_kernels

    kernels = sorted(all_kernels().values(), key=lambda s: s.name)
    if args.json:
        rows = [
            {
                "name": s.name,
                "source": s.source,
                "symbol": s.symbol,
                "description": s.description,
                "defines": dict(s.defines),
            }
            for s in kernels
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not kernels:
        print("no kernels registered")
        return 0
    print(
        _table(
            ["kernel", "source", "symbol", "description"],
            [[s.name, s.source, s.symbol, s.description] for s in kernels],
        )
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from workbench.kernels import toolchain
    from workbench.kernels.registry import get

    explicit = args.arch is not None
    archs = args.arch or list(toolchain.DEFAULT_ARCHS)
    specs = [get(n) for n in args.kernel] if args.kernel else None

    missing: dict[str, str] = {}
    for arch in dict.fromkeys(archs):
        try:
            toolchain.compiler_for(arch)
        except BackendError as e:
            missing[arch] = e.message
    built = [a for a in dict.fromkeys(archs) if a not in missing]
    reports = toolchain.check(specs, built, jobs=args.jobs) if built else []
    failed = [r for r in reports if not r.ok]

    if args.json:
        out = {
            "reports": [
                {**asdict(r), "ok": r.ok, "spills": r.resources.spills if r.resources else None}
                for r in reports
            ],
            "missing_compilers": missing,
        }
        print(json.dumps(out, indent=2))
    else:
        for arch in built:
            rows = [r for r in reports if r.arch == arch]
            print(f"{arch}  ({toolchain.vendor_of(arch).upper()}, {len(rows)} kernels)")
            print(_report_table(arch, rows) if rows else "  no kernels")
            print()
        for arch, why in missing.items():
            print(f"{arch}: skipped: {why}")
        for r in failed:
            print(f"\n{r.kernel} [{r.arch}] {r.error_code}:\n{r.error}", file=sys.stderr)

    if failed:
        targets = sorted({r.arch for r in failed})
        raise BackendError(
            "backend.compile_failed",
            f"{len(failed)} kernel build(s) failed ({', '.join(targets)})",
            kernels=sorted({r.kernel for r in failed}),
        )
    if explicit and missing:
        raise BackendError(
            "backend.compiler_missing",
            f"no compiler for requested target(s) {', '.join(missing)}",
        )
    return 0


def _asm(args: argparse.Namespace) -> int:
    from workbench.kernels import toolchain
    from workbench.kernels.registry import get

    toolchain.vendor_of(args.arch)
    sys.stdout.write(toolchain.asm(get(args.name), args.arch))
    return 0


def _fmt(v: Any) -> str:
    return "?" if v is None else str(v)


_AMD_COLUMNS: list[tuple[str, Callable[[Any], Any]]] = [
    ("VGPRs", lambda r: r.vgprs),
    ("AGPRs", lambda r: r.agprs),
    ("SGPRs", lambda r: r.sgprs),
    ("LDS", lambda r: r.lds_bytes),
    ("scratch", lambda r: r.scratch_bytes),
    ("spills", lambda r: r.spills),
    ("occupancy", lambda r: r.occupancy),
]
_NV_COLUMNS: list[tuple[str, Callable[[Any], Any]]] = [
    ("registers", lambda r: r.registers),
    ("smem", lambda r: r.shared_bytes),
    ("stack", lambda r: r.scratch_bytes),
    ("spill st/ld", lambda r: f"{_fmt(r.spill_store_bytes)}/{_fmt(r.spill_load_bytes)}"),
]


def report_rows(arch: str, reports: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the resource table for one target (also used for docs/kernels.md)."""
    from workbench.kernels.toolchain import vendor_of

    columns = _AMD_COLUMNS if vendor_of(arch) == "amd" else _NV_COLUMNS
    header = ["kernel", *(c for c, _ in columns)]
    rows = []
    for r in reports:
        if r.ok:
            rows.append([r.kernel, *(_fmt(get(r.resources)) for _, get in columns)])
        else:
            rows.append([r.kernel, "FAILED: " + (r.error_code or "")] + [""] * (len(columns) - 1))
    return header, rows


def _report_table(arch: str, reports: Sequence[Any]) -> str:
    header, rows = report_rows(arch, reports)
    return _table(header, rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
