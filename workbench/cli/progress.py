"""Progress bars for the CLI (tqdm on stderr); the library only reports (done, total) numbers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from tqdm import tqdm


@contextmanager
def _bars(open_bar: Callable[[str, int], tqdm]) -> Iterator[Callable[[str, int, int, str], None]]:
    """A (key, done, total, note) callback over one bar at a time: ``open_bar(key, total)`` opens
    it on the first call and again when ``key`` changes (closing the one before); the last closes
    on exit. No bar appears if the callback is never called."""
    bar: tqdm | None = None
    current = ""

    def update(key: str, done: int, total: int, note: str) -> None:
        nonlocal bar, current
        if bar is None or key != current:
            if bar is not None:
                bar.close()
            bar = open_bar(key, total)
            current = key
        if note:
            bar.set_postfix_str(note, refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def _counted(**bar: Any) -> Iterator[Callable[[int, int], None]]:
    """A (done, total) callback over one bar made with tqdm's keywords ``bar``."""
    with _bars(lambda _key, total: tqdm(total=total, **bar)) as update:
        yield lambda done, total: update("", done, total, "")


def pull_progress(
    desc: str = "pulling model",
) -> AbstractContextManager[Callable[[int, int], None]]:
    """A (bytes done, bytes total) callback drawing a bar; no bar appears if it is never called."""
    return _counted(desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def phase_progress() -> AbstractContextManager[Callable[[str, int, int, str], None]]:
    """A (phase, done, total, what) callback: one bar per phase on stderr, replaced when the
    phase changes; a total of 0 means unknown (the bar counts up)."""
    return _bars(
        lambda phase, total: tqdm(
            total=total or None, desc=phase, unit="step", file=sys.stderr, leave=False
        )
    )


def count_progress(
    desc: str, unit: str = "it"
) -> AbstractContextManager[Callable[[int, int], None]]:
    """A (done, total) callback drawing a bar of ``unit``s on stderr (tqdm's default stream)."""
    return _counted(desc=desc, unit=unit)
