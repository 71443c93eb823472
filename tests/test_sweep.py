"""Kernel sweeps (workbench.engine.sweep): the SPEC, the grid, retries and failed rows, the
process pool, Ray, and `workbench bench kernels --sweep`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.engine import distribute
from workbench.engine.sweep import (
    COLUMNS,
    TIMING_COLUMNS,
    SweepGrid,
    parse_spec,
    sweep,
)
from workbench.errors import UserError


def _stable(frame):
    """The rows without the columns that vary from run to run (NaN as None: NaN != NaN)."""
    return json.loads(frame.drop(columns=TIMING_COLUMNS).to_json(orient="records"))


def test_inline_spec_and_json_file_give_the_same_grid(tmp_path: Path) -> None:
    inline = parse_spec("kernel=rmsnorm,add;warp=32,64;kind=time,profile;target=gfx90a,sm_90")
    path = tmp_path / "grid.json"
    grid = {"kernels": ["rmsnorm", "add"], "warps": [32, 64], "kinds": ["time", "profile"],
            "targets": ["gfx90a", "sm_90"]}  # fmt: skip
    path.write_text(json.dumps(grid))
    assert parse_spec(str(path)) == inline
    shaped = parse_spec("kernel=rmsnorm;shape=n:2/dim:64,n:1/dim:128")
    assert list(shaped.shapes) == [{"n": 2, "dim": 64}, {"n": 1, "dim": 128}]
    assert parse_spec("kernel=all;kind=sanitize").kernels == ()


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "empty"),
        ("kernel=rmsnorm;colour=red", "unknown sweep spec key 'colour'"),
        ("kernel", "key=value"),
        ("kernel=nope", "no kernel named 'nope'"),
        ("kernel=rmsnorm;warp=48", "warps are 32 and/or 64"),
        ("kernel=rmsnorm;warp=x", "warps are integers"),
        ("kernel=rmsnorm;kind=bench", "kinds are"),
        ("kernel=rmsnorm;kind=profile;target=gfx9999", "unknown GPU target"),
        ("kernel=rmsnorm;shape=rows:5", "takes shape keys"),
        ("kernel=rmsnorm;rep_ms=fast", "rep_ms must be float"),
        ("missing.json", "no sweep spec file"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(UserError) as e:
        parse_spec(spec)
    assert words in e.value.message


def test_each_job_is_listed_once_with_the_dimensions_its_kind_uses() -> None:
    grid = SweepGrid(kernels=("rmsnorm",), warps=(32, 64), targets=("gfx90a", "sm_90"),
                     kinds=("time", "sanitize", "profile", "compile"))  # fmt: skip
    cells = [(j.kind, j.warp, j.target) for j in grid.jobs()]
    assert cells == [
        ("time", 32, None), ("sanitize", 32, None), ("profile", 32, "gfx90a"),
        ("compile", None, "gfx90a"), ("profile", 32, "sm_90"), ("compile", None, "sm_90"),
        ("time", 64, None), ("sanitize", 64, None), ("profile", 64, "gfx90a"),
        ("profile", 64, "sm_90"),
    ]  # fmt: skip


def test_a_failing_job_is_retried_then_reported_not_dropped() -> None:
    # 100 columns are not whole Q8_0 blocks: the job raises in the worker, every time.
    grid = SweepGrid(kernels=("add", "matvec_q8_0"), warps=(64,), rep_ms=1)
    bad = SweepGrid(kernels=("matvec_q8_0",), shapes=({"rows": 4, "cols": 100},), warps=(64,))
    for workers in (1, 2):
        frame = sweep(bad, workers=workers)
        assert list(frame["status"]) == ["failed"]
        assert "user.bad_shape" in frame["error"][0] and "after 2 attempts" in frame["error"][0]
    ok = sweep(grid, workers=1)
    assert list(ok["status"]) == ["ok", "ok"] and list(ok.columns) == COLUMNS


def _die_once(marker: str) -> int:
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(3)  # a worker process killed mid-job
    return os.getpid()


def _die_on_two(x: int) -> int:
    if x == 2:
        os._exit(3)
    return x * 10


def test_a_pool_worker_that_dies_loses_no_job(tmp_path: Path) -> None:
    markers = [str(tmp_path / f"m{i}") for i in range(3)]
    outs = list(distribute.run_jobs(_die_once, markers, workers=2, retries=1))
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(o.ok for o in outs), [o.error for o in outs]
    # A job that kills its worker every time is reported (after its attempts), the rest run.
    outs = list(distribute.run_jobs(_die_on_two, [1, 2, 3, 4], workers=2, retries=1))
    assert [o.value for o in outs] == [10, None, 30, 40]
    assert outs[1].attempts == 2 and "worker process died" in outs[1].error


@pytest.mark.tool("clang")
def test_pool_and_in_process_give_the_same_rows() -> None:
    grid = parse_spec("kernel=rmsnorm,add;warp=32,64;kind=time,profile,sanitize;rep_ms=1")
    here, pool = sweep(grid, workers=1), sweep(grid, workers=2)
    assert list(here["status"]) == ["ok"] * len(here)
    assert _stable(here) == _stable(pool)
    assert set(here["kind"]) == {"time", "profile", "sanitize"}


@pytest.mark.tool("hipcc")
def test_compile_jobs_report_the_compilers_resources() -> None:
    frame = sweep("kernel=add;kind=compile;target=gfx90a", workers=1)
    assert frame["status"][0] == "ok", frame["error"][0]
    assert frame["vgprs"][0] > 0 and frame["spills"][0] == 0


def test_cli_sweep_prints_json_lines_in_grid_order(capsys) -> None:
    rc = main(["bench", "kernels", "--sweep", "kernel=add,swiglu;warp=32,64;rep_ms=1",
               "--workers", "1"])  # fmt: skip
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert rc == 0
    assert [(r["kernel"], r["warp"]) for r in rows] == [
        ("add", 32),
        ("add", 64),
        ("swiglu", 32),
        ("swiglu", 64),
    ]
    assert all(r["status"] == "ok" and r["bytes"] > 0 for r in rows)
    assert "sweep" in out.err  # the progress bar


def test_cli_sweep_errors(capsys, tmp_path: Path) -> None:
    assert main(["bench", "kernels", "--sweep", "kernel=add;warp=16"]) == 2
    assert "warps are 32 and/or 64" in capsys.readouterr().err
    assert main(["bench", "kernels", "--workers", "2"]) == 2
    assert "go with --sweep" in capsys.readouterr().err
    assert main(["bench", "kernels", "--sweep", "kernel=add", "--kernel", "rmsnorm"]) == 2
    assert "go in the SPEC" in capsys.readouterr().err
    out = tmp_path / "rows.jsonl"
    rc = main(["bench", "kernels", "--sweep", "kernel=matvec_q8_0;shape=rows:4/cols:100",
               "--workers", "1", "-o", str(out)])  # fmt: skip
    assert rc == 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["status"] == "failed" and "1 job(s) failed" in capsys.readouterr().err
