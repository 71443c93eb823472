"""Fixtures every test may use, and the run's policy on seeds, tools and skips.

- ``seed`` / ``rng``: a fresh seed per test (``WORKBENCH_TEST_SEED=N`` replays one); a failing
  test that drew one gets a ``seed=N`` section in its report.
- ``@pytest.mark.tool("hipcc")``: the test needs a system tool from tests/tools.py; it skips
  where the tool is missing, and the run lists once, after collection, what skips for which tool
  (under pytest-xdist: in the closing summary, from the workers' collections).
- ``WORKBENCH_STRICT=1`` (set by .ci/run): every skip fails, naming what was missing, except in
  tests marked ``gpu`` and for tools no Debian package provides (nvcc). This covers the notebooks
  (nbval) as well when they run in the same session.
- ``make test`` runs the session in 2 pytest-xdist workers (``--dist loadfile``, see Makefile):
  the workers share ``WORKBENCH_HOME`` (`run_tmp`), hence the emulator's build cache.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests import tools
from tests.synth import TinyConfig, write_tiny_llama

SEED_ENV = "WORKBENCH_TEST_SEED"
_SEED = pytest.StashKey[int]()
_SKIPPING_KEY = "workbench_skipping"  # RunPolicy.skipping, sent from xdist workers


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama models, one per weight type the issue names, plus an untied-output variant."""
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for q in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.F32):
        out[q.name] = write_tiny_llama(d / f"tiny-{q.name}.gguf", TinyConfig(qtype=q), seed=1)
    out["untied"] = write_tiny_llama(
        d / "tiny-untied.gguf", TinyConfig(qtype=Q.Q8_0, tied=False), seed=2
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["Q8_0"]


@pytest.fixture(scope="session")
def ray_cluster(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    """One small local Ray cluster for the whole run (2 CPUs, no dashboard, its files under the
    run's temporary directory); its workers share the tests' workbench cache."""
    ray = pytest.importorskip("ray", reason="ray is in the dev extra (pip install -e '.[dev]')")
    home = os.environ.get("WORKBENCH_HOME") or str(run_tmp(pytestconfig, tmp_path_factory) / "home")
    # Ray puts Unix sockets under its temporary directory, and a socket's path may not exceed 107
    # bytes: pytest's (/tmp/pytest-of-USER/pytest-N/popen-gwN/...) is too long for some user
    # names, so Ray gets a short one of its own.
    ray_tmp = tempfile.mkdtemp(prefix="wb-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                _temp_dir=ray_tmp,
                runtime_env={"env_vars": {"WORKBENCH_HOME": home}},
                log_to_driver=False,
                logging_level="WARNING",
            )
            break
        except Exception:
            # The raylet gives its agents 15 s to start; on a loaded machine they can take
            # longer (measured: 20 s at a load of 12 on 2 cores). One more try, then fail.
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def run_tmp(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    """The run's temporary root: the one all pytest-xdist workers share (each worker's basetemp
    is a directory in it), or the basetemp of a run without workers."""
    base = factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


@pytest.fixture(scope="session")
def shared_emu_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The run's one emulator build cache, the test home's (`emulator.default_cache_dir`): shared
    by every test file and xdist worker, so that a module such as matvec.hip compiles once per
    run and option set, not once per file (builds are keyed by source and options, and written
    atomically under a lock: workbench/kernels/emulator_build)."""
    d = run_tmp(pytestconfig, tmp_path_factory) / "home" / "emulator"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


@pytest.fixture(autouse=True)
def _isolated_home(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
):
    """Tests never write into the user's cache unless they ask for the real model. The home is
    one per run, shared by the xdist workers, so that an emulated module compiled by one worker
    is a cache hit in the other (builds are atomic and locked: workbench/kernels/emulator_build)."""
    if "WORKBENCH_HOME" not in os.environ:
        monkeypatch.setenv(
            "WORKBENCH_HOME", str(run_tmp(request.config, tmp_path_factory) / "home")
        )


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed for this test's random inputs ($WORKBENCH_TEST_SEED replays one)."""
    value = int(os.environ.get(SEED_ENV) or secrets.randbits(63))
    request.node.stash[_SEED] = value
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    """NumPy's generator on this test's seed."""
    return np.random.default_rng(seed)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def numba_threads(request: pytest.FixtureRequest) -> int:
    """numba's thread count for the test: 1, then 2 (restored after)."""
    import numba

    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has one thread here")  # not a missing tool: the machine's size
    saved = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(saved)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    rep = yield
    value = item.stash.get(_SEED, None)
    if value is not None and rep.failed:
        rep.sections.append(("random seed", f"seed={value} (replay: {SEED_ENV}={value})"))
    return rep


def pytest_configure(config: pytest.Config) -> None:
    # A plugin, not conftest hooks, so that it also sees the notebooks' items (nbval).
    config.pluginmanager.register(RunPolicy(), "workbench-run-policy")


class RunPolicy:
    """Tool markers, the missing-tool listing and strict mode, for every item of the run."""

    def __init__(self) -> None:
        self.skipping: dict[str, list[str]] = defaultdict(list)  # tool -> node ids

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        absent = {t.name: t for t in tools.missing()}
        for item in items:
            if item.path.suffix == ".ipynb":  # nbval cells: the notebook's metadata names them
                for name in tools.notebook_tools(item.path):
                    item.add_marker(pytest.mark.tool(name))
            for mark in item.iter_markers("tool"):
                t = tools.tool(*mark.args)
                if t.name in absent:
                    self.skipping[t.name].append(item.nodeid)
                    if t.strict_optional or not tools.strict():
                        # A marker, so that the skip is reported at the test, not in tools.py.
                        item.add_marker(pytest.mark.skip(reason=t.reason))

    def pytest_report_collectionfinish(self) -> list[str]:
        return self._listing()

    # Under pytest-xdist the workers collect and the controller reports: each worker sends its
    # listing back (workeroutput) and the controller prints it in the closing summary.
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[_SKIPPING_KEY] = dict(self.skipping)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:  # node: a WorkerController
        for name, ids in getattr(node, "workeroutput", {}).get(_SKIPPING_KEY, {}).items():
            known = set(self.skipping[name])
            self.skipping[name] += [i for i in ids if i not in known]

    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter, config: pytest.Config
    ) -> None:
        if config.pluginmanager.hasplugin("dsession"):  # the xdist controller
            for line in self._listing():
                terminalreporter.write_line(line)

    def _listing(self) -> list[str]:
        if not self.skipping:
            return []
        lines = ["missing tools (see tests/tools.py):"]
        for name, ids in self.skipping.items():
            t = tools.tool(name)
            files: dict[str, int] = defaultdict(int)
            for nodeid in ids:
                files[nodeid.split("::")[0].rsplit("/", 1)[-1]] += 1
            where = ", ".join(f"{f} ({n})" if len(files) > 1 else f for f, n in files.items())
            fail = tools.strict() and not t.strict_optional
            verb = f"fail ({tools.STRICT_ENV}=1)" if fail else "skip"
            n = len(ids)
            lines.append(f"  {t.reason}; {n} test{'s' * (n != 1)} {verb}: {where}")
        return lines

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if tools.strict():  # otherwise the skip markers added above do it
            for mark in item.iter_markers("tool"):
                if not tools.tool(*mark.args).strict_optional:
                    tools.require(*mark.args)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]):
        rep = yield
        if rep.skipped and not hasattr(rep, "wasxfail") and self._forbidden(item, rep):
            rep.outcome = "failed"
            rep.longrepr = f"{tools.STRICT_ENV}=1 forbids skipping: {_reason(rep)}"
        return rep

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):
        rep = yield
        if rep.skipped and tools.strict():
            rep.outcome = "failed"
            rep.longrepr = f"{tools.STRICT_ENV}=1 forbids skipping: {_reason(rep)}"
        return rep

    @staticmethod
    def _forbidden(item: pytest.Item, rep: pytest.TestReport) -> bool:
        if not tools.strict() or item.get_closest_marker("gpu") is not None:
            return False
        reason = _reason(rep)
        return not any(t.reason in reason for t in tools.TOOLS if t.strict_optional)


def _reason(rep: pytest.TestReport | pytest.CollectReport) -> str:
    """A skip report's reason (its longrepr is a (path, line, "Skipped: reason") tuple)."""
    if isinstance(rep.longrepr, tuple):
        return rep.longrepr[2].removeprefix("Skipped: ") or "skipped without a reason"
    return str(rep.longrepr)
