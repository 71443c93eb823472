"""The notebooks in a real browser: JupyterLab on loopback, driven by headless Chromium.

Opens 01-quickstart (the generation panel) and 03-resilience (the dashboard), runs every cell,
and checks that the widgets rendered (no "Loading widget..." placeholder, no widget or cell
error). Screenshots go to test-artifacts/ (docs/img/dashboard.png is a copy of one, refreshed
by hand: tests never write into the source tree). Needs Debian's chromium (and Playwright from
PyPI, which drives it: no browser is downloaded); skipped where either is missing. Uses the
real model (smollm2).
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
    for name in ("01-quickstart.ipynb", "03-resilience.ipynb"):
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
                time.sleep(0.5)
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


def run_notebook(ctx: object, url: str, name: str, timeout_s: float = 120) -> object:
    """Open ``name`` in JupyterLab, run all cells, wait until every cell has run."""
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
    assert page.locator(".jp-OutputArea-output").count() == 0
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => { const prompts = [...document.querySelectorAll(
                       '.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
                   return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p)); }""",
        timeout=timeout_s * 1000,
    )
    page.wait_for_timeout(1500)  # let the last widget views render
    return page


def assert_rendered(page: object, name: str) -> None:
    text = page.inner_text(".jp-NotebookPanel")
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, f"{name}: error output: {tracebacks[0][:2000]}"
    assert "Loading widget" not in text, f"{name}: a widget did not render"
    assert "Error displaying widget" not in text, f"{name}: a widget failed to render"
    assert page.locator(".jp-OutputArea-output .widget-button").count() > 0, f"{name}: no widgets"


def test_quickstart_renders_the_generation_panel(lab, browser_context):
    page = run_notebook(browser_context, lab, "01-quickstart.ipynb")
    assert_rendered(page, "01-quickstart")
    assert "The capital of France is Paris." in page.inner_text(".jp-NotebookPanel")
    # The panel's streamed output reached the browser through the widget state.
    panel_output = page.locator(".jp-OutputArea-output .widget-textarea textarea").last
    assert "primary colors" in panel_output.input_value()
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".jp-OutputArea-output .widget-vbox").first.screenshot(
        path=str(ARTIFACTS / "generation-panel.png")
    )
    page.screenshot(path=str(ARTIFACTS / "01-quickstart.png"), full_page=True)
    page.evaluate("window.jupyterapp.commands.execute('kernelmenu:shutdown')")
    page.close()


def test_resilience_renders_the_dashboard(lab, browser_context):
    page = run_notebook(browser_context, lab, "03-resilience.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "03-resilience.png"), full_page=True)
    assert_rendered(page, "03-resilience")
    # The dashboard is near the end: bring it on screen, where its views attach and draw.
    page.locator(".jp-CodeCell").last.scroll_into_view_if_needed()
    tabs = page.locator(".jp-OutputArea-output .widget-tab").last
    tabs.wait_for(state="visible", timeout=60_000)
    tabs.scroll_into_view_if_needed()
    for title in ("Generate", "Kernel timing", "Retries", "Errors"):
        assert tabs.get_by_text(title, exact=False).count() > 0, f"no {title!r} tab"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    tabs.screenshot(path=str(shot))
    assert shot.stat().st_size > 5_000  # a rendered panel, not a blank box
    page.close()
