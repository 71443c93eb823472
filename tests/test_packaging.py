"""The wheel carries every package and the HIP sources (kernels/ -> workbench/_kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (the dev extra installs it there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_package_list_matches_the_tree():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "workbench").rglob("__init__.py")
    }
    assert listed == on_disk | {
        "workbench._kernels",
        "workbench._kernels.emulator",
        "workbench._notebooks",
    }


@pytest.mark.slow
def test_wheel_ships_the_kernel_sources(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.name for p in (ROOT / "kernels").glob("*.hip")} | {"wb.h", "quant.h"}
    for name in sources:
        assert f"workbench/_kernels/{name}" in names, name
    for p in (ROOT / "kernels" / "emulator").iterdir():
        assert f"workbench/_kernels/emulator/{p.name}" in names, p.name
    # `workbench report` runs the report notebook from the package
    assert "workbench/_notebooks/05-reproducible-report.ipynb" in names


@pytest.mark.parametrize(("preset", "want"), [(None, "20"), ("28", "28")])
def test_importing_workbench_shortens_openblas_spin_unless_set(preset, want):
    """OpenBLAS's workers spin 2**20 cycles after a call, not 2**28 (workbench/__init__), and a
    user's own setting wins."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = "import os, workbench; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want
