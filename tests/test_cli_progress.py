"""The CLI's progress callbacks: a bar opens on the first report, follows `done`, is replaced
when the phase changes and is closed when the block ends."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from tqdm import tqdm

from workbench.cli import progress


class _Recorded(tqdm):
    """tqdm that keeps every bar it made, with the keywords it was made with."""

    made: ClassVar[list[_Recorded]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kwargs = kwargs
        self.closed = False
        _Recorded.made.append(self)

    def close(self) -> None:
        self.closed = True
        super().close()


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[_Recorded]:
    made: ClassVar[list[_Recorded]] = []
    monkeypatch.setattr(_Recorded, "made", made)
    monkeypatch.setattr(progress, "tqdm", _Recorded)
    return made


def test_no_bar_unless_reported(bars):
    for cm in (progress.pull_progress(), progress.count_progress("x"), progress.phase_progress()):
        with cm:
            pass
    assert bars == []


def test_count_and_pull_bars_follow_done_and_close(bars, rng, capsys):
    total = int(rng.integers(2, 1000))
    steps = [*sorted(int(d) for d in rng.integers(0, total, size=5)), total]
    with progress.count_progress("sweep", unit="job") as count:
        for done in steps:
            count(done, total)
            assert bars[-1].n == done
    with progress.pull_progress() as pull:
        pull(total // 2, total)
        pull(total, total)
    count_bar, pull_bar = bars
    assert count_bar.kwargs == {"total": total, "desc": "sweep", "unit": "job"}
    assert pull_bar.kwargs == {
        "total": total, "desc": "pulling model", "unit": "B", "unit_scale": True,
        "unit_divisor": 1024,
    }  # fmt: skip
    assert count_bar.closed and pull_bar.closed and pull_bar.n == total
    assert "sweep" in capsys.readouterr().err


def test_phase_bars_are_replaced_per_phase(bars):
    with progress.phase_progress() as report:
        report("load", 1, 3, "tensor a")
        report("load", 3, 3, "")
        assert len(bars) == 1 and bars[0].n == 3 and "tensor a" in bars[0].postfix
        report("decode", 2, 0, "layer 0")  # total 0: unknown, the bar counts up
        assert bars[0].closed and not bars[1].closed
    load, decode = bars
    assert load.kwargs["desc"] == "load" and load.total == 3 and load.kwargs["leave"] is False
    assert decode.kwargs["desc"] == "decode" and decode.total is None and decode.n == 2
    assert decode.closed
