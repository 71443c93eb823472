"""Progress bars for the CLI (tqdm on stderr); the library only reports (done, total) numbers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def pull_progress(desc: str = "pulling model") -> Iterator[Callable[[int, int], None]]:
    """A (bytes done, bytes total) callback drawing a bar; no bar appears if it is never called."""
    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def phase_progress() -> Iterator[Callable[[str, int, int, str], None]]:
    """A (phase, done, total, what) callback: one bar per phase on stderr, replaced when the
    phase changes; a total of 0 means unknown (the bar counts up)."""
    bar: tqdm | None = None
    current = ""

    def update(phase: str, done: int, total: int, what: str) -> None:
        nonlocal bar, current
        if bar is None or phase != current:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total or None, desc=phase, unit="step", file=sys.stderr, leave=False)
            current = phase
        if what:
            bar.set_postfix_str(what, refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def count_progress(desc: str, unit: str = "it") -> Iterator[Callable[[int, int], None]]:
    """A (done, total) callback drawing a bar of ``unit``s on stderr (tqdm's default stream)."""
    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
