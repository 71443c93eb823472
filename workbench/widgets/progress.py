"""Progress in a notebook cell: one status line that long library work reports into.

The library only calls back with numbers (`store.resolve`'s ``progress(done, total)`` bytes,
`kernel_bench.bench_kernels`'s ``progress(done, total, label)``); `status_line` turns them into a
line under the running cell ("downloading smollm2: 42.0 of 100.3 MB", "timing rmsnorm (1/6)"),
so the cell shows more than ``[*]``. The line is cleared when the work ends: what stays in the
notebook does not depend on how long the work took or whether a download was needed.
Outside IPython nothing is shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from workbench.widgets._common import esc


class StatusLine:
    """A line of HTML under the running cell (an IPython display handle); `clear` empties it."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.text = ""
        self._handle: Any = None

    def show(self, text: str) -> None:
        self.text = text
        from IPython import get_ipython

        if get_ipython() is None:
            return
        from IPython.display import HTML, display

        if self._handle is None:
            # Displayed empty, then updated: the output as first sent is the output as left
            # (cleared), so a notebook stores the same whatever the progress said.
            self._handle = display(HTML(""), display_id=True)
        self._handle.update(HTML(f"<span style='color:#555'>{esc(self.desc)}: {esc(text)}</span>"))

    def bytes(self, done: int, total: int) -> None:
        """A ``progress(done, total)`` callback in bytes (a model download)."""
        mb = 1024 * 1024
        of = f" of {total / mb:.1f}" if total > 0 else ""
        self.show(f"{done / mb:.1f}{of} MB")

    def steps(self, done: int, total: int, label: str = "") -> None:
        """A ``progress(done, total, label)`` callback over steps (kernel benchmarks)."""
        self.show(f"{label} ({min(done + 1, total)}/{total})" if done < total else "done")

    def clear(self) -> None:
        self.text = ""
        if self._handle is not None:
            from IPython.display import HTML

            self._handle.update(HTML(""))


@contextmanager
def status_line(desc: str) -> Iterator[StatusLine]:
    """``with status_line("timing kernels") as status: bench_kernels(..., progress=status.steps)``;
    the line is cleared on leaving, whether the work succeeded or failed."""
    line = StatusLine(desc)
    try:
        yield line
    finally:
        line.clear()
