"""Our own kernels are clean under every tool at warp 32 and 64, and racecheck catches the barrier
whose absence once raced in the sampling kernel's block-wide best-candidate step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from workbench.kernels import ops_kernels as ops
from workbench.kernels.emulator import EmulatorModule
from workbench.kernels.instrument import TOOLS
from workbench.kernels.registry import all_kernels, kernels_dir
from workbench.kernels.sanitize import sanitize_registered

pytestmark = pytest.mark.tool("clang")

# The barrier at the end of smp_block_best: without it, lane 0 of the next top-k pass writes
# sv/si while slower threads still read the previous pass's values.
BARRIER = "  __syncthreads();  // the next call rewrites red: without it, a write-after-read race\n"


@pytest.fixture(scope="module")
def cache(shared_emu_cache: str) -> Path:
    return Path(shared_emu_cache)


def test_every_registered_kernel_is_clean(cache: Path) -> None:
    reports = sanitize_registered(tools=TOOLS, warps=(32, 64), cache_dir=cache, seed=11)
    assert len(reports) == 2 * len(all_kernels())
    dirty = [(r.kernel, r.warp_size, f.message) for r in reports for f in r.findings]
    assert dirty == [], "seed 11: " + "\n".join(map(str, dirty))


def test_counters_name_lines_in_included_headers(cache: Path) -> None:
    (report,) = sanitize_registered(["matvec_q4_0"], warps=(64,), counters=True, cache_dir=cache)
    files = {Path(c.file).name for c in report.lines}
    assert {"matvec.hip", "quant.h"} <= files, files
    assert all(c.requests > 0 and 0 < c.efficiency <= 1.0 for c in report.lines)
    quant = kernels_dir() / "quant.h"
    for c in report.lines:  # every counted line is a line of the file it names
        assert 1 <= c.line <= len(Path(c.file).read_text().splitlines())
    assert any(c.file == str(quant) for c in report.lines)
    assert report.totals["bytes_moved"] >= report.totals["bytes_requested"] > 0


def test_unknown_kernel_name_is_a_user_error() -> None:
    from workbench.errors import UserError

    with pytest.raises(UserError, match="no kernel named 'nope'"):
        sanitize_registered(["nope"])


@pytest.mark.parametrize("warp", [32, 64])
def test_racecheck_catches_the_sampling_barrier_removed(tmp_path: Path, warp: int) -> None:
    text = (kernels_dir() / "sampling.hip").read_text()
    assert text.count(BARRIER) == 1
    broken = tmp_path / "sampling_no_barrier.hip"
    broken.write_text(text.replace(BARRIER, "\n"))  # keep the line numbers
    mod = EmulatorModule(
        path=broken,
        options=(f"-I{kernels_dir()}",),
        warp_size=warp,
        tools=("racecheck",),
        cache_dir=tmp_path,
    )
    seed = 77 + warp
    logits = np.random.default_rng(seed).standard_normal(3000, dtype=np.float32)
    ops.sample(mod, logits, top_k=5, top_p=0.9, temperature=0.8, u=0.5)
    report = mod.get_function("sample_top_k_top_p").last_report
    lines = broken.read_text().splitlines()
    # smp_block_scan, called twice per gathered tile: the second call's partial sums overwrite
    # the first call's while other warps may still read them
    write = next(i + 1 for i, s in enumerate(lines) if re.search(r"red\[warp\] = inc", s))
    read = next(i + 1 for i, s in enumerate(lines) if re.search(r"const int r = red\[w\]", s))
    found = {(f.kind, f.line, f.other_line) for f in report.findings}
    assert ("shared_race_war", write, read) in found, f"seed {seed}: {report.findings}"
