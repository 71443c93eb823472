"""Instrumented emulator runs find planted defects at the right line, and count memory traffic.

The kernels are tests/emulator_kernels/planted.hip; each defect's line is found by its marker
comment. Every check runs at warp 32 and 64; inputs are fresh random arrays (seed in the id).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import BackendError
from workbench.kernels.emulator import EmulatorModule, KernelBoundsError
from workbench.kernels.instrument import TOOLS

KERNELS = Path(__file__).parent / "emulator_kernels"
PLANTED = KERNELS / "planted.hip"

pytestmark = pytest.mark.tool("clang")


def marker(tag: str, kind: str, path: Path = PLANTED) -> int:
    """The line carrying `// <tag>: <kind>` (exactly one)."""
    hits = [
        i + 1
        for i, row in enumerate(path.read_text().splitlines())
        if re.search(rf"//\s*{tag}:\s*{kind}\s*$", row)
    ]
    assert len(hits) == 1, (tag, kind, hits)
    return hits[0]


@pytest.fixture(scope="session")
def cache(shared_emu_cache: str) -> Path:
    return Path(shared_emu_cache)


@pytest.fixture(scope="session")
def planted(cache: Path):
    made: dict[tuple, EmulatorModule] = {}

    def get(warp_size: int, target: str = "sm_90") -> EmulatorModule:
        key = (warp_size, target)
        if key not in made:
            made[key] = EmulatorModule(
                path=PLANTED,
                warp_size=warp_size,
                tools=TOOLS,
                counters=True,
                target=target,
                cache_dir=cache,
            )
        return made[key]

    return get


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def kinds(report) -> set[tuple[str, int]]:
    return {(f.kind, f.line) for f in report.findings}


@pytest.mark.parametrize("warp", [32, 64])
def test_edge_block_off_by_one_read_is_reported_and_returns_poison(planted, warp):
    seed = 1000 + warp
    x = rng(seed).standard_normal(1000).astype(np.float32)
    y = np.full(1000, np.nan, np.float32)
    k = planted(warp).get_function("edge_off_by_one")
    k((4,), (256,), (x, y, np.int32(1000)))
    rep = k.last_report
    line = marker("PLANT", "out_of_bounds_read")
    (f,) = rep.findings
    assert (f.kind, f.line, f.arg, f.offset, f.count) == ("out_of_bounds_read", line, 0, 0, 1), (
        f"seed {seed}: {f}"
    )
    assert f.file == str(PLANTED) and f.block == (3, 0, 0) and f.thread == (231, 0, 0)
    # the kernel completed; the element past the end read the guard zone's poison (NaN)
    np.testing.assert_allclose(y[:-1], 0.5 * (x[:-1] + x[1:]), rtol=1e-6, err_msg=f"seed {seed}")
    assert np.isnan(y[-1])


@pytest.mark.parametrize("warp", [32, 64])
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("missing_barrier", "shared_race_raw"),
        ("write_after_read", "shared_race_war"),
    ],
)
def test_races_are_reported_with_both_lines(planted, warp, name, kind):
    x = rng(warp).standard_normal(256).astype(np.float32)
    y = np.zeros(256, np.float32)
    k = planted(warp).get_function(name)
    k((1,), (256,), (x, y))
    found = [f for f in k.last_report.findings if f.kind == kind]
    assert len(found) == 1, k.last_report.findings
    f = found[0]
    assert f.line == marker("PLANT", kind)
    assert f.other_line == marker("PLANT-OTHER", kind)
    assert f.tool == "racecheck" and f.count >= 1
    assert {g.kind for g in k.last_report.findings} == {kind}


@pytest.mark.parametrize("warp", [32, 64])
def test_uninitialized_shared_read(planted, warp):
    x = rng(7).standard_normal(256).astype(np.float32)
    y = np.zeros(512, np.float32)
    k = planted(warp).get_function("uninitialized")
    k((2,), (256,), (x, y))
    assert kinds(k.last_report) == {
        ("uninitialized_shared_read", marker("PLANT", "uninitialized_shared_read"))
    }
    (f,) = k.last_report.findings
    assert f.count == 2 * 128  # half of each block's threads, in both blocks
    # static shared memory starts poisoned in every block
    assert np.isnan(y[:128]).all() and np.isnan(y[256:384]).all()


@pytest.mark.parametrize("warp", [32, 64])
def test_clean_kernels_report_nothing(planted, warp):
    seed = 4242 + warp
    r = rng(seed)
    mod = planted(warp)
    x = r.standard_normal(1000).astype(np.float32)
    y = np.zeros(1000, np.float32)
    k = mod.get_function("edge_clean")
    k((4,), (256,), (x, y, np.int32(1000)))
    assert k.last_report.findings == []
    for name in ("reverse_clean", "atomics_clean"):
        x = r.standard_normal(256).astype(np.float32)
        y = np.zeros(256, np.float32)
        k = mod.get_function(name)
        k((1,), (256,), (x, y))
        assert k.last_report.findings == [], (name, f"seed {seed}")
    np.testing.assert_allclose(y[0], x.sum(), rtol=1e-4, err_msg=f"seed {seed}")
    atomic = line_counters(k.last_report, marker("PLANT", "atomic"), "shared", "atomic")
    assert atomic.requests == 256 // warp and atomic.active_lanes == warp
    assert k.last_report.totals["atomics"] == 256 // warp
    json.dumps(k.last_report.to_dict())  # JSON-ready
    tile = r.standard_normal((32, 32)).astype(np.float32)
    for name in ("transpose_conflicted", "transpose_padded"):
        out = np.zeros((32, 32), np.float32)
        k = mod.get_function(name)
        k((1,), (32, 32), (tile, out))
        assert k.last_report.findings == []
        np.testing.assert_array_equal(out, tile.T, err_msg=f"seed {seed}")


def line_counters(report, line: int, space: str, op: str):
    (c,) = [c for c in report.lines if (c.line, c.space, c.op) == (line, space, op)]
    return c


@pytest.mark.parametrize("warp", [32, 64])
def test_bank_conflicts_of_a_transpose(planted, warp):
    tile = rng(3).standard_normal((32, 32)).astype(np.float32)
    out = np.zeros((32, 32), np.float32)
    mod = planted(warp)
    k = mod.get_function("transpose_conflicted")
    k((1,), (32, 32), (tile, out))
    c = line_counters(k.last_report, marker("PLANT", "bank_conflict"), "shared", "load")
    assert c.bank_conflict_ways == 32.0
    assert c.requests == 1024 // warp and c.active_lanes == warp
    k = mod.get_function("transpose_padded")
    k((1,), (32, 32), (tile, out))
    c = line_counters(k.last_report, marker("PLANT", "conflict_free"), "shared", "load")
    assert c.bank_conflict_ways == 1.0


@pytest.mark.parametrize("warp", [32, 64])
def test_global_efficiency_matches_hand_arithmetic(planted, warp):
    # sm_90: 32-byte sectors. A stride-32 float load touches one sector per lane: 4 / 32 bytes.
    mod = planted(warp)
    x = rng(5).standard_normal(256 * 32).astype(np.float32)
    y = np.zeros(256, np.float32)
    k = mod.get_function("strided_load")
    k((1,), (256,), (x, y))
    c = line_counters(k.last_report, marker("PLANT", "strided"), "global", "load")
    assert c.efficiency == 0.125 and c.bytes_moved == 256 * 32
    assert c.requests == 256 // warp and c.bytes_requested == 256 * 4
    np.testing.assert_array_equal(y, x[::32])
    k = mod.get_function("coalesced_load")
    k((1,), (256,), (x, y))
    c = line_counters(k.last_report, marker("PLANT", "coalesced"), "global", "load")
    assert c.efficiency == 1.0 and c.bytes_moved == 1024
    assert k.last_report.totals["efficiency"] == 1.0


def test_segment_size_follows_the_target(planted):
    # gfx942: 128-byte lines; a stride-32 float load still takes one line per lane.
    x = rng(6).standard_normal(256 * 32).astype(np.float32)
    y = np.zeros(256, np.float32)
    k = planted(64, "gfx942").get_function("strided_load")
    k((1,), (256,), (x, y))
    c = line_counters(k.last_report, marker("PLANT", "strided"), "global", "load")
    assert c.bytes_moved == 256 * 128 and c.efficiency == 4 / 128


@pytest.mark.parametrize("warp", [32, 64])
def test_unguarded_write_is_reported_and_the_launch_completes(planted, warp):
    y = np.zeros(1000, np.float32)
    k = planted(warp).get_function("unguarded_write")
    k((4,), (256,), (y, np.int32(1000)))
    (f,) = k.last_report.findings
    assert (f.kind, f.line, f.arg, f.offset, f.count) == (
        "out_of_bounds_write",
        marker("PLANT", "out_of_bounds_write"),
        0,
        0,
        24,
    )
    assert (y == 1.0).all()


def test_a_wild_write_stops_the_launch_with_the_finding(planted):
    y = np.zeros(16, np.float32)
    k = planted(32).get_function("wild_write")
    with pytest.raises(KernelBoundsError) as e:
        k((1,), (64,), (y,))
    (f,) = k.last_report.findings
    assert f.kind == "out_of_bounds_write" and f.line == marker("PLANT", "wild")
    assert e.value.context["thread_idx"] == (0, 0, 0)
    assert "outside every buffer" in str(e.value)


@pytest.mark.parametrize("warp", [32, 64])
def test_barrier_divergence_is_reported_and_the_kernel_runs_on(planted, warp):
    y = np.zeros(64, np.float32)
    k = planted(warp).get_function("divergent_barrier")
    k((1,), (64,), (y,))
    (f,) = k.last_report.findings
    assert f.kind == "barrier_divergence" and f.tool == "synccheck"
    assert {f.line, f.other_line} == {
        marker("PLANT", "barrier_divergence"),
        marker("PLANT-OTHER", "barrier_divergence"),
    }
    assert (y == 1.0).all()


def test_global_write_race_between_blocks(planted):
    y = np.zeros(4, np.float32)
    k = planted(32).get_function("global_waw")
    k((8,), (32,), (y,))
    (f,) = k.last_report.findings
    assert (f.kind, f.line, f.arg) == ("global_race_waw", marker("PLANT", "global_race_waw"), 0)
    assert f.count == 7  # every block after the first


def test_random_schedule_gives_the_same_findings(cache):
    mod = EmulatorModule(
        path=PLANTED, warp_size=32, tools=("racecheck",), schedule="random", seed=9,
        cache_dir=cache,
    )  # fmt: skip
    x = rng(9).standard_normal(256).astype(np.float32)
    y = np.zeros(256, np.float32)
    k = mod.get_function("missing_barrier")
    k((1,), (256,), (x, y))
    assert kinds(k.last_report) == {("shared_race_raw", marker("PLANT", "shared_race_raw"))}


def test_plain_launch_has_no_report(cache):
    mod = EmulatorModule(path=PLANTED, warp_size=32, cache_dir=cache)
    y = np.zeros(256, np.float32)
    k = mod.get_function("coalesced_load")
    k((1,), (256,), (np.ones(256, np.float32), y))
    assert k.last_report is None and (y == 1).all()


def test_missing_clang_is_one_clear_error(cache, monkeypatch):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if "clang" in name else real(name))
    with pytest.raises(BackendError, match="need clang"):
        EmulatorModule(path=PLANTED, tools=("memcheck",), cache_dir=cache)
