"""Progress bars for the CLI (tqdm on stderr); the library only reports (done, total) numbers."""

from __future__ import annotations

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
