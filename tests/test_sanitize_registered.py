"""Our own kernels are clean under every tool at warp 32 and 64, and racecheck catches the barrier
whose absence once raced in the sampling kernel's block-wide best-candidate step."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from workbench.kernels import ops_kernels as ops
from workbench.kernels.emulator import EmulatorModule
from workbench.kernels.instrument import TOOLS
from workbench.kernels.registry import all_kernels, kernels_dir
from workbench.kernels.sanitize import sanitize_registered

pytestmark = pytest.mark.skipif(
    shutil.which("clang++") is None, reason="instrumented runs need clang++"
)

# The barrier at the end of smp_block_best: without it, lane 0 of the next top-k pass writes
# sv/si while slower threads still read the previous pass's values.
BARRIER = "  __syncthreads();  // sv, si may be reused by the next call\n"


def test_every_registered_kernel_is_clean(tmp_path: Path) -> None:
    reports = sanitize_registered(tools=TOOLS, warps=(32, 64), cache_dir=tmp_path, seed=11)
    assert len(reports) == 2 * len(all_kernels())
    dirty = [(r.kernel, r.warp_size, f.message) for r in reports for f in r.findings]
    assert dirty == [], "seed 11: " + "\n".join(map(str, dirty))


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
    write = next(i + 1 for i, s in enumerate(lines) if re.search(r"sv\[warp\] = \*v", s))
    read = next(i + 1 for i, s in enumerate(lines) if re.search(r"\*v = lane < n_warps", s))
    found = {(f.kind, f.line, f.other_line) for f in report.findings}
    assert ("shared_race_war", write, read) in found, f"seed {seed}: {report.findings}"
