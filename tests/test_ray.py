"""The Ray bars of issue 15, in one file so that one xdist worker (``--dist loadfile``) starts the
run's one local Ray cluster (the ``ray_cluster`` fixture): a sweep of every kernel gives the same
rows locally and on Ray, and a batch evaluation survives an actor killed mid-run."""

from __future__ import annotations

import json

import pytest

from tests.test_batch_eval import _outputs, _write_prompts
from tests.test_sweep import _stable
from workbench.engine.batch_eval import SamplingSpec, run_eval
from workbench.engine.sweep import SweepGrid, sweep
from workbench.kernels.registry import all_kernels


@pytest.mark.tool("clang")
def test_every_kernel_at_both_warps_gives_the_same_rows_locally_and_on_ray(ray_cluster) -> None:
    names = list(all_kernels())
    grid = SweepGrid(warps=(32, 64), kinds=("sanitize",))
    seen: list[tuple[int, int]] = []
    local = sweep(grid, workers=2)
    remote = sweep(grid, ray=True, progress=lambda done, total: seen.append((done, total)))
    assert len(local) == 2 * len(names)
    assert list(local["kernel"]) == [n for n in names for _ in (32, 64)]
    assert list(local["status"]) == ["ok"] * len(local), local["error"].dropna().tolist()
    assert _stable(local) == _stable(remote)
    assert seen[-1] == (len(local), len(local))
    timed = sweep("kernel=rmsnorm,add;warp=32,64;kind=time,profile;rep_ms=1", ray=True)
    assert _stable(timed) == _stable(sweep("kernel=rmsnorm,add;warp=32,64;kind=time,profile;"
                                            "rep_ms=1", workers=1))  # fmt: skip


def test_ray_actor_killed_mid_run_loses_nothing(tiny_model, tmp_path, seed, ray_cluster) -> None:
    prompts = _write_prompts(tmp_path / "p.jsonl", 50, seed)
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    sampling = SamplingSpec(max_tokens=24)  # long enough that prompts remain at the kill
    run_eval(prompts, local, tiny_model, sampling=sampling)
    actors: list = []
    killed: list[int] = []

    def kill_one(done: int, total: int) -> None:
        # Actor 0, with its queued prompts, goes once its first result (prompt 0) is written:
        # results are written in input order, a line at a time. Killed at the first result of
        # either actor, it sometimes had produced nothing yet (the other actor was first), so
        # the restarted process ran every even prompt; at the tenth, a fast machine had
        # sometimes already run all 25 of its prompts: nothing was left.
        if not killed and remote.exists() and remote.read_text(encoding="utf-8").strip():
            killed.append(done)
            ray_cluster.kill(actors[0], no_restart=False)

    summary = run_eval(prompts, remote, tiny_model, sampling=sampling, workers=2, ray=True,
                       on_workers=actors.extend, progress=kill_one)  # fmt: skip
    assert killed and summary.failed == 0 and summary.generated == 50
    assert _outputs(remote) == _outputs(local)
    # The killed actor (prompts 0, 2, 4, ...) had prompts left: a restarted process ran them.
    recs = [json.loads(line) for line in remote.read_text().splitlines()]
    assert len({r["worker_pid"] for r in recs if r["index"] % 2 == 0}) == 2
