"""llama.cpp's tokenizer test data, fetched once into a cache.

llama.cpp tests its tokenizers against vocab-only GGUF files (``ggml-vocab-*.gguf``) with input
texts (``.gguf.inp``) and the token ids llama.cpp produces for them (``.gguf.out``); it also keeps
real models' chat templates (``templates/*.jinja``). All of them ship inside the llama-cpp-python
sdist under ``vendor/llama.cpp/models/``. The first use downloads that sdist with pip and extracts
only those files; tests that need them are skipped, with the reason, when the download fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests import tools

SDIST = "llama-cpp-python==0.3.36"
VOCAB_SUBDIR = "llama.cpp-vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"

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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        proc = subprocess.run(
            [*cmd, SDIST, "-d", tmp], capture_output=True, text=True, timeout=900, check=False
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            raise RuntimeError(f"pip download failed: {' '.join(tail) or proc.returncode}")
        archives = list(Path(tmp).glob("*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"pip download left {len(archives)} archives, expected one sdist")
        staging = Path(tmp) / "extract"
        extract(archives[0], staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not _complete(target):
                raise


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
