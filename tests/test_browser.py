"""The notebooks in a real browser: JupyterLab on loopback, driven by headless Chromium.

Opens every numbered notebook of notebooks/ (a new one is picked up by its file name), runs every
cell, and checks what a user would see: every widget rendered (no "Loading widget..." placeholder,
no widget or cell error), no label cut short ("temperat..."), no element wider than its output
area, no broken image, no drop-down whose choice is cut off. Screenshots of each widget go to
test-artifacts/ (docs/img/*.png are copies of some, refreshed by hand: tests never write into the
source tree). Needs Debian's chromium (and Playwright from PyPI, which drives it: no browser is
downloaded); skipped where either is missing. Uses the real model (smollm2).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api as playwright_api

from tests import tools
from workbench import store

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
CHROMIUM = tools.tool("chromium").found()
TOKEN = "workbench-browser-test"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The cache as the user has it: tests/conftest.py points WORKBENCH_HOME at a temporary directory
# while a test runs, after this module is imported.
USER_HOME = os.environ.get(store.HOME_ENV)
RUN_TIMEOUT_S = 300  # every cell of one notebook, on 2 busy cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.tool("chromium"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """JupyterLab serving copies of the notebooks; yields its base URL."""
    home = Path(USER_HOME) if USER_HOME else store.default_home()
    failure = None
    try:
        store.resolve("smollm2", home)
    except Exception as e:  # no index reachable: the real model cannot be had here
        if getattr(e, "code", "") != "model.download_failed":
            raise
        failure = f"cannot download the model smollm2: {e}"
    if failure is not None:
        tools.unavailable(failure)  # outside the except: the report shows the reason alone
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, root / name)
    # Render every cell (JupyterLab 4 windows long notebooks: off-screen cells are not in the DOM).
    settings = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    news = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {
        **os.environ,
        store.HOME_ENV: str(home),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
    }
    port = _free_port()
    log = (tmp / "lab.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
            f"--port={port}", f"--ServerApp.root_dir={root}",
            f"--IdentityProvider.token={TOKEN}", "--LabApp.expose_app_in_browser=True",
            "--ServerApp.port_retries=0", "--allow-root",
            f"--LabApp.user_settings_dir={tmp / 'settings'}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"JupyterLab did not start:\n{(tmp / 'lab.log').read_text()}")
                time.sleep(0.2)  # a poll interval under the deadline above, not a fixed wait
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 2000},
        )
        try:
            yield ctx
        finally:
            ctx.close()


# An output row holding a widget view.
WIDGET_OUTPUT = ".jp-OutputArea-child:has(.jupyter-widgets)"
# Every widget view has drawn: none shows the "Loading widget..." placeholder, and each has a size.
_WIDGETS_DRAWN = f"""() => {{
    const outs = [...document.querySelectorAll('.jp-OutputArea-output')];
    if (outs.some(o => o.textContent.includes('Loading widget'))) return false;
    return [...document.querySelectorAll('{WIDGET_OUTPUT}')].every(
        o => o.getBoundingClientRect().height > 0);
}}"""


def run_notebook(ctx: object, url: str, name: str) -> object:
    """Open ``name`` in JupyterLab, run all cells, wait until every cell has run and every
    widget view has drawn."""
    page = ctx.new_page()
    # A workspace of its own per notebook: JupyterLab would otherwise reopen the earlier ones.
    workspace = name.split("-")[0]
    page.goto(f"{url}/lab/workspaces/nb{workspace}/tree/{name}?token={TOKEN}")
    page.wait_for_function(
        "() => window.jupyterapp && document.querySelector('.jp-NotebookPanel .jp-Cell')",
        timeout=60_000,
    )
    # Wait for the kernel, then run everything through JupyterLab's own command.
    page.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget;
                   const k = w && w.sessionContext && w.sessionContext.session
                             && w.sessionContext.session.kernel;
                   return k && k.status === 'idle'; }""",
        timeout=60_000,
    )
    # Clear the stored outputs first, so that what is checked is what this run rendered.
    page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.wait_for_function(
        "() => document.querySelectorAll('.jp-OutputArea-output').length === 0", timeout=10_000
    )
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => { const prompts = [...document.querySelectorAll(
                       '.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
                   return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p)); }""",
        timeout=RUN_TIMEOUT_S * 1000,
    )
    page.wait_for_function(_WIDGETS_DRAWN, timeout=60_000)
    return page


def assert_rendered(page: object, name: str) -> None:
    text = page.inner_text(".jp-NotebookPanel")
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, f"{name}: error output: {tracebacks[0][:2000]}"
    assert "Error displaying widget" not in text, f"{name}: a widget failed to render"


# What a user saw broken, found in the rendered page. Only what is displayed counts (a hidden tab
# or a collapsed element has no box). Returns one line per problem.
_LAYOUT_PROBLEMS = """() => {
    const problems = [];
    const shown = e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
    const where = e => {
        const cell = e.closest('.jp-Cell');
        const cells = [...document.querySelectorAll('.jp-Cell')];
        return `cell ${cells.indexOf(cell)}`;
    };
    // Labels cut to "temperat...": the text is wider than the box that shows it.
    for (const e of document.querySelectorAll(
            '.jp-OutputArea-output .widget-label, .jp-OutputArea-output .widget-label-basic,'
            + ' .jp-OutputArea-output .widget-inline-hbox > label,'
            + ' .jp-OutputArea-output .lm-TabBar-tabLabel,'
            + ' .jp-OutputArea-output .widget-button,'
            + ' .jp-OutputArea-output .widget-toggle-button')) {
        if (shown(e) && e.textContent.trim() && e.scrollWidth > e.clientWidth + 1)
            problems.push(`${where(e)}: label ${JSON.stringify(e.textContent.trim())} is cut`
                          + ` (${e.scrollWidth}px of text in ${e.clientWidth}px)`);
    }
    // A drop-down whose chosen option is wider than the box (the run selector).
    const ctx = document.createElement('canvas').getContext('2d');
    for (const s of document.querySelectorAll('.jp-OutputArea-output select:not([multiple])')) {
        if (!shown(s) || s.selectedIndex < 0) continue;
        const st = getComputedStyle(s);
        ctx.font = `${st.fontSize} ${st.fontFamily}`;
        const text = s.options[s.selectedIndex].text;
        const room = s.clientWidth - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight) - 16;
        if (ctx.measureText(text).width > room)
            problems.push(`${where(s)}: drop-down choice ${JSON.stringify(text)} is cut`);
    }
    // Images: loaded (no broken-image icon) and inside their output area (not cut off).
    const box_ratio = img => img.clientWidth / Math.max(img.clientHeight, 1);
    for (const img of document.querySelectorAll('.jp-OutputArea-output img')) {
        if (!shown(img)) continue;
        if (!img.complete || img.naturalWidth === 0)
            problems.push(`${where(img)}: a broken image`);
        // Drawn at its own proportions and no larger than it is (not stretched to a neighbour).
        else if (Math.abs(box_ratio(img) - img.naturalWidth / img.naturalHeight) > 0.02
                 * (img.naturalWidth / img.naturalHeight) || img.clientWidth > img.naturalWidth + 1)
            problems.push(`${where(img)}: an image is stretched (${img.clientWidth}x`
                          + `${img.clientHeight} for ${img.naturalWidth}x${img.naturalHeight})`);
        const area = img.closest('.jp-OutputArea-output').getBoundingClientRect();
        const box = img.getBoundingClientRect();
        if (box.right > area.right + 1)
            problems.push(`${where(img)}: an image runs ${Math.round(box.right - area.right)}px`
                          + ' past its output area');
    }
    // Widgets wider than their output area (clipped or scrolled sideways).
    for (const out of document.querySelectorAll('WIDGET_OUTPUT')) {
        const area = out.querySelector('.jp-OutputArea-output').getBoundingClientRect();
        for (const e of out.querySelectorAll('.jupyter-widgets')) {
            if (!shown(e)) continue;
            const box = e.getBoundingClientRect();
            if (box.right > area.right + 1) {
                problems.push(`${where(e)}: ${e.className.split(' ').slice(0, 3).join(' ')} runs`
                              + ` ${Math.round(box.right - area.right)}px past its output area`);
                break;
            }
        }
    }
    return problems;
}""".replace("WIDGET_OUTPUT", WIDGET_OUTPUT)


def assert_layout(page: object, name: str) -> None:
    problems = page.evaluate(_LAYOUT_PROBLEMS)
    assert not problems, f"{name}: " + "; ".join(problems[:10])


def screenshot_widgets(page: object, name: str) -> list[Path]:
    """Each widget output of the page, scrolled into view, to test-artifacts/NAME-widget-N.png
    (JupyterLab scrolls the notebook inside its panel: a full-page shot would show one screen)."""
    ARTIFACTS.mkdir(exist_ok=True)
    shots = []
    views = page.locator(WIDGET_OUTPUT)
    for i in range(views.count()):
        view = views.nth(i)
        view.scroll_into_view_if_needed()
        path = ARTIFACTS / f"{Path(name).stem}-widget-{i}.png"
        view.screenshot(path=str(path))
        shots.append(path)
    return shots


def shutdown(page: object) -> None:
    page.evaluate("window.jupyterapp.commands.execute('kernelmenu:shutdown')")
    page.close()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n, marks=[pytest.mark.tool(t) for t in tools.notebook_tools(ROOT / "notebooks" / n)]
        )
        for n in NOTEBOOKS
    ],
)
def test_notebook_runs_and_every_widget_looks_finished(lab, browser_context, name):
    page = run_notebook(browser_context, lab, name)
    try:
        assert_rendered(page, name)
        shots = screenshot_widgets(page, name)
        assert_layout(page, name)
        if name[:3] in ("01-", "02-", "03-"):
            assert shots, f"{name}: no widget rendered"
        for shot in shots:
            assert shot.stat().st_size > 2_000, f"{shot.name}: a blank box"
        text = page.inner_text(".jp-NotebookPanel")
        if name.startswith("01-"):
            assert "The capital of France is Paris." in text
            # The panel's streamed output reached the browser through the widget state.
            panel_output = page.locator(".jp-OutputArea-output .widget-textarea textarea").last
            assert "primary colors" in panel_output.input_value()
        elif name.startswith("02-"):
            # The timing panel after its run: a table and both charts, drawn.
            panel = page.locator(WIDGET_OUTPUT).last
            assert panel.locator("table").count() > 0, "no timing table"
            # (not counting the Sweep tab's chart: hidden, display none, until a sweep ran)
            drawn = panel.locator('img:not([style*="display: none"])')
            assert drawn.count() == 2, "the bar chart or the roofline is missing"
            # The run pickers, on their tab: the run's label whole, not cut off.
            panel.locator(".lm-TabBar-tab", has_text="Compare").click()
            picker = panel.locator(".widget-dropdown:has-text('run A') select")
            picker.wait_for(state="visible", timeout=10_000)
            chosen = picker.evaluate(
                "s => s.selectedIndex < 0 ? '' : s.options[s.selectedIndex].text"
            )
            assert "emulator: rmsnorm, swiglu" in chosen.replace("\xa0", " ")  # ipywidgets' nbsp
            assert_layout(page, name)
            panel.screenshot(path=str(ARTIFACTS / "02-kernel-timing-compare.png"))
        elif name.startswith("03-"):
            tabs = page.locator(WIDGET_OUTPUT).last.locator(".widget-tab").first
            for title in ("Generate", "Kernel timing", "Retries", "Errors", "Serving"):
                assert tabs.get_by_text(title, exact=False).count() > 0, f"no {title!r} tab"
    finally:
        shutdown(page)
