"""The system tools that give the test suite its extra checks, and the strict-mode switch.

``TOOLS`` is the one list of them: how each is found, which Debian packages provide it and what
it adds. Tests that need one are marked ``@pytest.mark.tool("hipcc")`` (tests/conftest.py skips
them where the tool is missing and lists them once per run); a fixture calls `require`.

``make test`` runs ``.ci/install-tools`` first, which is ``python3 -m tests.tools install``: as
root it installs the missing packages with apt-get; otherwise it does nothing and the test run
says what is missing. ``python3 -m tests.tools`` prints the table.

Under ``WORKBENCH_STRICT=1`` (what ``.ci/run`` sets) a test that cannot run because a tool is
missing or a download failed fails instead of skipping, naming what was missing; only tools
marked ``strict_optional`` (not packaged by Debian) and tests marked ``gpu`` may still skip.
This module uses the standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

STRICT_ENV = "WORKBENCH_STRICT"


@dataclass(frozen=True)
class Tool:
    name: str  # what tests name in @pytest.mark.tool(...)
    commands: tuple[str, ...]  # the tool is there when any of these is on PATH ...
    path: str | None  # ... or when this file exists
    packages: tuple[str, ...]  # the Debian packages that provide it
    gives: str  # the checks it enables
    strict_optional: bool = False  # may skip under WORKBENCH_STRICT=1 (not packaged by Debian)
    how: str = ""  # how to install it where no Debian package does

    def found(self) -> str | None:
        """Where the tool is, or None."""
        for c in self.commands:
            if p := shutil.which(c):
                return p
        if self.path and Path(self.path).exists():
            return self.path
        return None

    @property
    def reason(self) -> str:
        """Why a test that needs it does not run here, with the fix."""
        how = f"apt-get install {' '.join(self.packages)}" if self.packages else self.how
        return f"{self.name} is not installed ({how}): needed for {self.gives}"


TOOLS: tuple[Tool, ...] = (
    Tool(
        "c++",
        ("c++", "g++", "clang++"),
        None,
        ("g++",),
        "the CPU emulator (every kernel test, the emulator backend, %%hip)",
    ),
    Tool(
        "hipcc",
        ("hipcc",),
        None,
        ("hipcc",),
        "offline AMD compiles (resource reports for gfx908/gfx90a/gfx940/gfx1030)",
    ),
    Tool(
        "boost-context",
        (),
        "/usr/include/boost/context/detail/fcontext.hpp",
        ("libboost-context-dev",),
        "the emulator's fast fibers (it falls back to ucontext without)",
    ),
    Tool(
        "c++filt",
        ("c++filt",),
        None,
        ("binutils",),
        "mapping template kernels' mangled names back to the registry",
    ),
    Tool(
        "promtool",
        ("promtool",),
        None,
        ("prometheus",),
        "checking the metrics exposition with promtool",
    ),
    Tool(
        "chromium",
        ("chromium", "chromium-browser"),
        None,
        ("chromium", "chromium-driver"),
        "the browser test (JupyterLab in headless Chromium, via Playwright)",
    ),
    Tool(
        "clang",
        ("clang++",),
        None,
        ("clang",),
        "the emulator's instrumented runs (sanitizer tools and memory counters: SanitizerCoverage)",
    ),
    Tool(
        "nvcc",
        ("nvcc",),
        None,
        (),
        "NVIDIA resource reports (sm_90)",
        strict_optional=True,
        how="NVIDIA's CUDA toolkit; Debian does not package it",
    ),
)
BY_NAME = {t.name: t for t in TOOLS}


def tool(name: str) -> Tool:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown tool {name!r}: add it to tests/tools.py TOOLS") from None


def notebook_tools(path: str | Path) -> tuple[str, ...]:
    """The tools a notebook needs, from its metadata: ``"workbench": {"tools": ["clang"]}``
    (tests/conftest.py marks its nbval cells, tests/test_browser.py its browser run)."""
    meta = json.loads(Path(path).read_text(encoding="utf-8")).get("metadata", {})
    return tuple(meta.get("workbench", {}).get("tools", ()))


def missing() -> list[Tool]:
    return [t for t in TOOLS if t.found() is None]


def strict() -> bool:
    """Whether WORKBENCH_STRICT asks for failures instead of skips."""
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def unavailable(what: str) -> NoReturn:
    """Skip the calling test because ``what`` cannot be had here; fail it in strict mode."""
    import pytest

    if strict():
        pytest.fail(f"{STRICT_ENV}=1 forbids skipping: {what}", pytrace=False)
    pytest.skip(what)


def require(name: str) -> str:
    """The tool's path; otherwise skip the calling test (fail it in strict mode)."""
    import pytest

    t = tool(name)
    if (p := t.found()) is not None:
        return p
    if t.strict_optional:
        pytest.skip(t.reason)
    unavailable(t.reason)


def install() -> int:
    """Install the missing tools' packages when root with apt-get; otherwise do nothing (the
    test run lists what is missing). Returns the exit status."""
    need = [p for t in missing() for p in t.packages]
    if not need or os.geteuid() != 0:
        return 0
    if shutil.which("apt-get") is None:
        print(f"install-tools: no apt-get here; install by hand: {' '.join(need)}", file=sys.stderr)
        return 0
    print(f"install-tools: apt-get install {' '.join(need)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL}
    wait = ["-o", "DPkg::Lock::Timeout=600"]  # another apt run (unattended upgrades) may hold it
    for cmd in (
        ["apt-get", *wait, "update", "-qq"],
        ["apt-get", *wait, "install", "-y", "-qq", "--no-install-recommends", *need],
    ):
        if subprocess.run(cmd, env=env, check=False, **quiet).returncode != 0:
            print(f"install-tools: apt-get {cmd[3]} failed", file=sys.stderr)
            return 1
    return 0


def status() -> str:
    width = max(len(t.name) for t in TOOLS)
    rows = []
    for t in TOOLS:
        where = t.found()
        rows.append(f"{t.name:<{width}}  {where or 'missing'}: {t.gives}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if argv == ["install"]:
        rc = install()
        # A failed install leaves skips (failures under strict mode), not a broken run.
        return rc if strict() else 0
    if argv in ([], ["status"]):
        print(status())
        return 0
    print("usage: python3 -m tests.tools [status | install]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
