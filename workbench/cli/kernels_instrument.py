"""`workbench kernels sanitize` and `workbench kernels profile`: the instrumented CPU emulator."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SANITIZE_HELP = """\
Run registered kernels (default: all) on the CPU emulator under the sanitizers, at each warp
width, on small example inputs (random, from --seed) that reach their edges (rows that are not
a multiple of the block, partial tiles, a KV window shorter than the cache), and print one row per
finding, grouped like compute-sanitizer's records: kernel, warp width, tool, kind, file:line
(for races: both lines), the block and thread of the first occurrence, how many accesses it
covers, and what to do about it.

Tools: memcheck (out-of-bounds and misaligned accesses), racecheck (shared-memory hazards within
a barrier interval, whatever order the threads ran in; global write-write races), initcheck
(reads of shared memory nobody wrote), synccheck (barriers not reached by every thread).

Exit status: 0 when every run is clean; 1 on any finding or any launch the emulator stopped.
"""

PROFILE_HELP = """\
Run one registered kernel on the CPU emulator with memory counters, modelled on a GPU target,
and print its source with the counters beside each line (like Nsight Compute's source view):
warp-level requests, mean active lanes, bytes requested and bytes moved (whole memory segments
of the target's size), global efficiency (requested / moved) and shared-memory bank-conflict
ways. Then the kernel totals and its time floor on the target: bytes moved / peak bandwidth and
FLOPs (from the registry's cost model) / peak FP32 compute. A floor, not a prediction: the
emulator models no caches, latencies or clocks. With the offline compiler for the target
installed (hipcc for gfx*, nvcc for sm_*), its resource report adds the occupancy.
"""


def register(actions: argparse._SubParsersAction) -> None:
    from workbench.kernels.instrument import DEFAULT_TARGET, TARGETS, TOOLS

    p = actions.add_parser(
        "sanitize",
        help="memcheck, racecheck, initcheck, synccheck on the CPU emulator",
        description=SANITIZE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="registry kernels (default: all)")
    p.add_argument(
        "--tools",
        type=_tools,
        default=TOOLS,
        help=f"comma-separated tools (default: all of {','.join(TOOLS)})",
    )
    p.add_argument(
        "--warp",
        type=_warps,
        help="comma-separated warp widths (default 32,64; 64 with a matrix-core --arch)",
    )
    p.add_argument(
        "--arch",
        help="emulate this AMD target's own code paths, e.g. gfx90a: the prefill matmul's MFMA "
        "body (matrix-core targets run waves of 64 only); default: none",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_sanitize)

    p = actions.add_parser(
        "profile",
        help="per-line memory counters and the time floor on a GPU target",
        description=PROFILE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="registry name (see `workbench kernels list`)")
    p.add_argument(
        "--shape",
        metavar="K=V,...",
        help="override the representative shape, as `workbench bench kernels --shape` takes it",
    )
    p.add_argument(
        "--target",
        choices=tuple(TARGETS),
        default=DEFAULT_TARGET,
        help=f"GPU whose segment size, banks and peaks are modelled (default {DEFAULT_TARGET})",
    )
    p.add_argument("--warp", type=int, choices=(32, 64), help="warp width (default: the target's)")
    p.add_argument(
        "--context",
        type=int,
        default=2,
        metavar="N",
        help="source lines shown around each counted line (default 2)",
    )
    p.add_argument("--all-lines", action="store_true", help="show every line of the sources")
    p.add_argument(
        "--no-occupancy", action="store_true", help="skip the offline compiler's resource report"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_profile)


def _tools(text: str) -> tuple[str, ...]:
    from workbench.errors import WorkbenchError
    from workbench.kernels.instrument import check_tools

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one tool")
    try:
        return check_tools(names)
    except WorkbenchError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _warps(text: str) -> tuple[int, ...]:
    try:
        warps = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"warp widths are 32 and/or 64, not {text!r}") from None
    if not warps or any(w not in (32, 64) for w in warps):
        raise argparse.ArgumentTypeError(f"warp widths are 32 and/or 64, not {text!r}")
    return tuple(dict.fromkeys(warps))


def _progress_bar() -> tuple[Any, Any]:
    from tqdm import tqdm

    bar: tqdm | None = None

    def update(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="sanitize", unit="run", file=sys.stderr, leave=False)
        bar.set_postfix_str(what)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _sanitize(args: argparse.Namespace) -> int:
    from workbench.engine.kernel_sanitize import sanitize_kernels
    from workbench.kernels.quant_kernels import has_mfma
    from workbench.kernels.registry import kernels_dir
    from workbench.kernels.sanitize_report import FINDING_COLUMNS, findings_rows, text_table

    if args.warp is None:
        args.warp = (64,) if has_mfma(args.arch) else (32, 64)
    update, close = _progress_bar()
    try:
        runs = sanitize_kernels(
            args.names,
            tools=args.tools,
            warps=args.warp,
            seed=args.seed,
            progress=update,
            arch=args.arch,
        )
    finally:
        close()
    rows = findings_rows(runs, roots=[kernels_dir()])
    clean = sum(r.clean for r in runs)
    if args.json:
        out = {
            "tools": list(args.tools),
            "warps": list(args.warp),
            "seed": args.seed,
            "arch": args.arch,
            "runs": [r.to_dict() for r in runs],
            "findings": rows,
            "clean": not rows,
        }
        print(json.dumps(out, indent=2))
    else:
        kernels = len({r.kernel for r in runs})
        head = (
            f"{kernels} kernel(s) x warp {','.join(map(str, args.warp))} under "
            f"{', '.join(args.tools)}: {clean} of {len(runs)} runs clean"
        )
        print(head)
        if rows:
            print(text_table(FINDING_COLUMNS, rows))
    return 1 if rows else 0


def _profile(args: argparse.Namespace) -> int:
    from workbench.engine.kernel_bench import parse_shape
    from workbench.engine.kernel_sanitize import profile_kernel
    from workbench.kernels import sanitize_report as sr
    from workbench.kernels.registry import get, kernels_dir

    shape = parse_shape(args.shape) if args.shape else None
    prof = profile_kernel(args.name, shape, target=args.target, warp_size=args.warp)
    roots = [kernels_dir()]
    rows = sr.source_rows(
        prof.report, _read_lines, context=None if args.all_lines else args.context, roots=roots
    )
    if args.no_occupancy:
        occupancy, occupancy_note = None, "occupancy: skipped (--no-occupancy)"
    else:
        occupancy, occupancy_note = _occupancy(get(args.name), args.target, prof.shape)
    if args.json:
        out = {
            **prof.to_dict(),
            "source_view": rows,
            "occupancy": occupancy,
            "occupancy_note": occupancy_note,
        }
        print(json.dumps(out, indent=2))
        return 0
    shape_text = ",".join(f"{k}={v}" for k, v in prof.shape.items())
    print(
        f"{prof.kernel} [{shape_text}] on the CPU emulator, counted for {prof.report.target} "
        f"(warp {prof.report.warp_size})"
    )
    print()
    print(sr.text_table(sr.SOURCE_COLUMNS, rows) if rows else "no memory accesses counted")
    print()
    width = max(len(k) for k, _ in sr.totals_rows(prof.report))
    for label, value in sr.totals_rows(prof.report):
        print(f"{label.ljust(width)}  {value}")
    print()
    for line in sr.floor_lines(prof.floor):
        print(line)
    print(occupancy_note)
    return 0


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def _occupancy(spec: Any, target: str, shape: Any) -> tuple[dict | None, str]:
    """The offline compiler's resources as a dict, and a line saying what they mean (or why
    there are none)."""
    from dataclasses import asdict

    from workbench.errors import BackendError
    from workbench.kernels import toolchain
    from workbench.kernels.sanitize_report import occupancy_text

    try:
        toolchain.compiler_for(target)
    except BackendError as e:
        return None, f"occupancy: n/a ({e.message})"
    report = toolchain.check([spec], [target], jobs=1)[0]
    if not report.ok:
        return None, f"occupancy: n/a ({report.error_code}: the {target} build failed)"
    launch = spec.launch(**shape)
    threads = launch.block[0] * launch.block[1] * launch.block[2]
    return asdict(report.resources), occupancy_text(report.resources, threads, launch.shared_mem)
