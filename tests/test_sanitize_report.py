"""Presenting instrumented runs: findings rows, the source view, the time floor (no emulator)."""

from __future__ import annotations

import pytest

from workbench.kernels.instrument import TARGETS, Finding, KernelReport, LineCounters, totals_of
from workbench.kernels.sanitize_report import (
    FINDING_COLUMNS,
    SOURCE_COLUMNS,
    SanitizeRun,
    display_file,
    findings_rows,
    floor_lines,
    occupancy_text,
    source_rows,
    text_table,
    time_floor,
)

SOURCE = [f"line {i}" for i in range(1, 21)]


def _counters(line: int, space: str, op: str, *, req: int, moved: int, ways: float = 1.0):
    requested = req * 64 * 4
    return LineCounters(
        file="/k/transpose.hip", line=line, space=space, op=op, requests=req, active_lanes=64.0,
        bytes_requested=requested, bytes_moved=moved,
        efficiency=requested / moved if space == "global" else 1.0, bank_conflict_ways=ways,
    )  # fmt: skip


def _report(lines: list[LineCounters], findings: list[Finding] = (), target: str = "gfx90a"):
    return KernelReport(
        kernel="transpose", target=target, warp_size=TARGETS[target].warp_size,
        tools=("racecheck",), findings=list(findings), lines=lines, totals=totals_of(lines),
    )  # fmt: skip


RACE = Finding(
    tool="racecheck", kind="shared_race_war", file="/k/transpose.hip", line=9,
    block=(1, 0, 0), thread=(3, 0, 0), message="write after read: add a __syncthreads()",
    count=48, other_file="/k/transpose.hip", other_line=7,
)  # fmt: skip


def test_findings_rows_name_both_lines_of_a_race_and_the_first_occurrence():
    runs = [
        SanitizeRun("transpose", 64, _report([], [RACE])),
        SanitizeRun("clean", 64, _report([])),
        SanitizeRun("wild", 32, None, "kernel.fault: write far outside any buffer"),
    ]
    rows = findings_rows(runs, roots=["/k"])
    assert [r["kernel"] for r in rows] == ["transpose", "wild"]
    race = rows[0]
    assert race["where"] == "transpose.hip:9 vs transpose.hip:7"
    assert (race["block"], race["thread"], race["count"]) == ("(1,0,0)", "(3,0,0)", 48)
    assert rows[1]["tool"] == "launch" and "far outside" in rows[1]["message"]
    assert [r.clean for r in runs] == [False, True, False]
    table = text_table(FINDING_COLUMNS, rows).splitlines()
    assert table[0].split() == list(FINDING_COLUMNS) and len(table) == 4
    assert runs[0].to_dict()["report"]["findings"][0]["block"] == [1, 0, 0]


def test_display_file_is_relative_to_a_root_or_the_bare_name(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "a.hip"
    assert display_file(str(f), [tmp_path]) == "sub/a.hip"
    assert display_file(str(f), ["/elsewhere"]) == "a.hip"


def test_source_view_puts_counters_beside_lines_with_gaps_marked():
    lines = [
        _counters(5, "global", "load", req=16, moved=16 * 256),
        _counters(5, "shared", "store", req=16, moved=16 * 256, ways=32.0),
        _counters(15, "global", "store", req=16, moved=16 * 64 * 64),
    ]
    rows = source_rows(_report(lines), lambda _: SOURCE, context=1, roots=["/k"])
    assert [r["line"] for r in rows] == ["4", "5", "5", "6", "...", "14", "15", "16"]
    load, store = rows[1], rows[2]
    assert (
        load["access"] == "global load" and load["efficiency"] == "100.0%" and load["ways"] == "-"
    )
    assert store["access"] == "shared store" and store["ways"] == "32.0" and store["source"] == ""
    assert load["source"] == "line 5" and rows[0]["requests"] == ""
    assert rows[6]["efficiency"] == "6.2%"  # 4-byte words, one 64-byte segment each
    every = source_rows(_report(lines), lambda _: SOURCE, context=None)
    assert len(every) == len(SOURCE) + 1 and "..." not in [r["line"] for r in every]
    assert text_table(SOURCE_COLUMNS, rows).splitlines()[2].endswith("line 4")


def test_unreadable_source_still_shows_the_counted_lines():
    def missing(_: str) -> list[str]:
        raise FileNotFoundError

    rows = source_rows(_report([_counters(3, "global", "load", req=1, moved=256)]), missing)
    assert [(r["line"], r["source"]) for r in rows] == [("1", ""), ("2", ""), ("3", "")]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_time_floor_is_bytes_over_bandwidth_or_flops_over_compute(target):
    spec = TARGETS[target]
    moved = 1 << 20
    report = _report([_counters(1, "global", "load", req=1024, moved=moved)], target=target)
    mem = time_floor(report)
    assert mem.memory_s == pytest.approx(moved / (spec.peak_gb_s * 1e9))
    assert mem.compute_s is None and mem.bound == "memory" and mem.floor_s == mem.memory_s
    flops = int(spec.peak_tflops_fp32 * 1e12 * mem.memory_s * 3)  # 3x the memory time
    both = time_floor(report, flops)
    assert both.bound == "compute" and both.floor_s == pytest.approx(3 * mem.memory_s, rel=1e-6)
    text = "\n".join(floor_lines(both))
    assert "a floor, not a prediction" in text and f"{moved} bytes moved" in text
    assert "no FLOP count" in "\n".join(floor_lines(mem))


def test_occupancy_text_for_each_vendor():
    from workbench.kernels.toolchain import KernelResources

    amd = KernelResources("k", "gfx942", "amd", vgprs=32, lds_bytes=4352, occupancy=8)
    assert occupancy_text(amd) == "gfx942: occupancy 8 waves/SIMD, 32 VGPRs, 4352 LDS bytes"
    nv = KernelResources("k", "sm_90", "nvidia", registers=18, shared_bytes=4352)
    assert "18 registers/thread, 4352 shared bytes/block" in occupancy_text(nv)
    assert occupancy_text(None) == "occupancy: n/a"


def test_nvidia_occupancy_by_hand():
    from workbench.kernels.occupancy import nvidia_occupancy

    # 256 threads = 8 warps; 64 warp slots -> 8 blocks; 32 regs -> 1024/warp -> 8 blocks: 100%.
    occ = nvidia_occupancy("sm_90", 32, 0, 256)
    assert (occ.blocks_per_sm, occ.warps_per_sm, occ.fraction) == (8, 64, 1.0)
    # 40 regs -> 1280/warp, 10240/block -> 6 blocks (48 warps, 75%), registers first.
    occ = nvidia_occupancy("sm_90", 40, 0, 256)
    assert (occ.blocks_per_sm, occ.limit, occ.fraction) == (6, "registers", 0.75)
    # 100 KB of shared memory + 1 KB reserved: two blocks in sm_90's 228 KB, one in sm_80's 164.
    assert nvidia_occupancy("sm_90", 16, 100 * 1024, 128).blocks_per_sm == 2
    occ = nvidia_occupancy("sm_80", 16, 0, 128, dynamic_shared=100 * 1024)
    assert (occ.blocks_per_sm, occ.limit) == (1, "shared memory")
    # 33 threads take two warps; tiny blocks hit the 32-block limit.
    assert nvidia_occupancy("sm_90", 8, 0, 33).warps_per_sm == 2 * 32
    assert nvidia_occupancy("sm_70", 8, 0, 32) is None


def test_finding_messages_drop_the_temporary_file_name():
    tmp = "/cache/src/0123abcd.hip"
    f = Finding(
        tool="memcheck", kind="out_of_bounds_read", file=tmp, line=4, block=(0, 0, 0),
        thread=(1, 0, 0), message="0123abcd.hip:4: reads past the end; see 0123abcd.hip:2",
    )  # fmt: skip
    (row,) = findings_rows([SanitizeRun("k", 32, _report([], [f]))], rename={tmp: "<cell k>"})
    assert row["where"] == "<cell k>:4"
    assert row["message"] == "reads past the end; see <cell k>:2"
