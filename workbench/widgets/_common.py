"""Pieces the panels share: a debounced refresher, figure-to-PNG, small HTML helpers."""

from __future__ import annotations

import html
import io
import threading
from collections.abc import Callable
from typing import Any

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
