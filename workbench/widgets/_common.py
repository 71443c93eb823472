"""Pieces the panels share: a background run, a debounced refresher, figure-to-PNG, a progress
bar, small HTML helpers."""

from __future__ import annotations

import html
import io
import threading
from collections.abc import Callable, Sequence
from typing import Any

from workbench.errors import WorkbenchError

# ipywidgets' style for a control's description: its natural width, where the default cuts long
# labels to "temperat...".
WIDE = {"description_width": "initial"}


class Debounce:
    """Call ``fn`` once, ``delay_s`` after the first of a burst of `trigger` calls (listeners fire
    on the engine's threads, often many times a second; a redraw per event would be wasted)."""

    def __init__(self, fn: Callable[[], None], delay_s: float = 0.25) -> None:
        self._fn = fn
        self._delay = delay_s
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def trigger(self, *_: Any) -> None:
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(self._delay, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
        self._fn()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


class BackgroundRun:
    """A panel's work on a daemon thread, one run at a time, for a panel with ``running`` and
    ``error`` traits: `_start` runs ``work(*args)``, whose error lands in ``error`` ("code:
    message" for a `WorkbenchError`, "Type: message" for anything else: shown in the panel
    rather than lost on a thread), and ``running`` turns False when it ends; `wait` joins it."""

    running: bool
    error: str
    _thread: threading.Thread | None = None

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _start(self, work: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        self._thread = threading.Thread(
            target=self._guarded, args=(work, args), name=name, daemon=True
        )
        self._thread.start()

    def _guarded(self, work: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            work(*args)
        except WorkbenchError as e:
            self.error = f"{e.code}: {e.message}"
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.running = False


def show_progress(bar: Any, progress: Sequence[int] | None) -> None:
    """Show the IntProgress ``bar`` at ``progress`` ([done, total]; a total of 0 shows an empty
    bar), or hide it when ``progress`` is None (nothing running)."""
    if progress is None:
        bar.layout.display = "none"
        return
    done, total = progress
    bar.max, bar.value = max(total, 1), done
    bar.layout.display = None


def error_html(error: str) -> str:
    """A panel's error in red under its status line ("" when there is none)."""
    return f"<div style='color:#b00'>{esc(error)}</div>" if error else ""


def chart_layout(**kwargs: Any) -> Any:
    """An Image's layout that shows a chart at its own size: a column of widgets would stretch
    it to the column's width (and its text with it); a narrow panel shrinks it, in proportion."""
    import ipywidgets as w

    return w.Layout(max_width="100%", height="auto", align_self="flex-start", **kwargs)


def figure_png(fig: Any) -> bytes:
    """A matplotlib Figure as PNG bytes (no pyplot: safe off the main thread)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return buf.getvalue()


def new_figure(width: float = 6.0, height: float = 3.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def esc(value: Any) -> str:
    return html.escape(str(value))


def pre(text: str) -> str:
    return f"<pre style='margin:0;white-space:pre-wrap'>{esc(text)}</pre>"


def table(rows: list[dict[str, Any]], columns: list[str], *, empty: str = "nothing yet") -> str:
    """A plain HTML table of ``rows`` (dicts) over ``columns``."""
    if not rows:
        return f"<i>{esc(empty)}</i>"
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
