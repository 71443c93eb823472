"""cupy_target's own logic: cache keys that follow the headers, our disk cache of code objects,
function handles looked up once.

CuPy is replaced by a test double here (`FakeCupy`): these are unit tests of our bookkeeping, not
evidence that CuPy or a GPU runs the kernels; that is `make test-gpu` (tests/test_device_backend.py,
marker ``gpu``), and tests/test_nvrtc.py compiles every module with the real NVRTC.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from workbench.kernels import cupy_target
from workbench.kernels.registry import kernels_dir

KERNEL = """#include "helper.h"
extern "C" __global__ void plain(float* x) { x[0] = HELPER; }
template <int N> __global__ void scaled(float* x) { x[0] = N * HELPER; }
"""


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A kernel including helper.h, which includes inner.h (one directory, like kernels/)."""
    (tmp_path / "helper.h").write_text('#include "inner.h"\n#define HELPER INNER\n')
    (tmp_path / "inner.h").write_text("#define INNER 1.0f\n")
    path = tmp_path / "k.hip"
    path.write_text(KERNEL)
    return path


def test_included_headers_are_found_transitively(src: Path) -> None:
    found = cupy_target.included_headers(KERNEL, [src.parent])
    assert [p.name for p in found] == ["helper.h", "inner.h"]
    wb = cupy_target.included_headers((kernels_dir() / "matvec.hip").read_text(), [kernels_dir()])
    assert {"quant.h", "wb.h"} <= {p.name for p in wb}


def test_a_header_change_changes_every_key(src: Path) -> None:
    before = cupy_target.compile_request(src, name_expressions=["scaled<2>"])
    assert f"-D{cupy_target.HEADERS_DEFINE}=" in before.options[-1]
    (src.parent / "inner.h").write_text("#define INNER 2.0f\n")  # two includes deep
    after = cupy_target.compile_request(src, name_expressions=["scaled<2>"])
    assert after.code == before.code
    assert after.options != before.options  # what CuPy's own cache hashes
    assert after.digest != before.digest  # what ours (in-process and on disk) use


class FakeCupy(types.ModuleType):
    """The slice of CuPy cupy_target uses, recording compiles and module loads."""

    def __init__(self, *, compiler_api: bool = True) -> None:
        super().__init__("cupy")
        self.__version__ = "14.0.0"
        self.compiles: list[tuple[str, tuple, tuple]] = []
        self.loaded: list[str] = []
        fake = self

        class RawModule:
            def __init__(self, *, code=None, path=None, options=(), name_expressions=None):
                self.code, self.path = code, path
                self.lookups: list[str] = []
                if path is not None:
                    fake.loaded.append(Path(path).read_bytes().decode())

            def compile(self) -> None:
                fake.compiles.append(("rawmodule", (), ()))

            def get_function(self, name: str) -> Any:
                self.lookups.append(name)
                return ("kernel", name)

        def compile_using_nvrtc(code, options, *, filename, name_expressions, cache_in_memory):
            fake.compiles.append((code, tuple(options), tuple(name_expressions or ())))
            lowered = {e: f"_Z{len(e)}{e.split('<')[0]}" for e in name_expressions or ()}
            return f"binary of {len(fake.compiles)}".encode(), lowered

        self.RawModule = RawModule
        runtime = types.SimpleNamespace(
            is_hip=True,
            getDeviceProperties=lambda i: {"warpSize": 64, "gcnArchName": b"gfx90a:sramecc+"},
        )
        self.cuda = types.SimpleNamespace(
            Device=lambda: types.SimpleNamespace(id=0, compute_capability="90"),
            runtime=runtime,
            nvrtc=types.SimpleNamespace(getVersion=lambda: (7, 0)),
            compiler=types.SimpleNamespace(
                compile_using_nvrtc=compile_using_nvrtc, CompileException=RuntimeError
            ),
        )
        if compiler_api:
            self._core = types.SimpleNamespace(
                core=types.SimpleNamespace(
                    assemble_cupy_compiler_options=lambda o: (*o, "--std=c++17")
                )
            )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCupy:
    cupy = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    cupy_target.clear_cache()
    yield cupy
    cupy_target.clear_cache()


def test_code_objects_are_cached_on_disk_with_their_lowered_names(
    fake: FakeCupy, src: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "gpu"
    m = cupy_target.load_module(src, name_expressions=["scaled<2>"], cache_dir=cache)
    (code, options, exprs) = fake.compiles[0]
    assert code == KERNEL and exprs == ("scaled<2>",)
    assert "--std=c++17" in options and "-fcuda-flush-denormals-to-zero" in options
    assert m.get_function("scaled<2>") == ("kernel", "_Z9scaled")  # by its lowered name
    assert m.get_function("plain") == ("kernel", "plain")
    assert len(list(cache.glob("*.bin"))) == 1 and len(list(cache.glob("*.json"))) == 1
    # A new process (an empty in-process cache) loads the code object: nothing compiles.
    cupy_target.clear_cache()
    m2 = cupy_target.load_module(src, name_expressions=["scaled<2>"], cache_dir=cache)
    assert len(fake.compiles) == 1 and fake.loaded == ["binary of 1", "binary of 1"]
    assert m2.get_function("scaled<2>") == ("kernel", "_Z9scaled")
    # A changed header is a new entry, compiled afresh.
    cupy_target.clear_cache()
    (src.parent / "inner.h").write_text("#define INNER 3.0f\n")
    cupy_target.load_module(src, name_expressions=["scaled<2>"], cache_dir=cache)
    assert len(fake.compiles) == 2 and len(list(cache.glob("*.bin"))) == 2


def test_a_damaged_entry_is_compiled_again(fake: FakeCupy, src: Path, tmp_path: Path) -> None:
    cache = tmp_path / "gpu"
    cupy_target.load_module(src, name_expressions=["scaled<2>"], cache_dir=cache)
    (meta,) = cache.glob("*.json")
    meta.write_text("{not json")
    cupy_target.clear_cache()
    m = cupy_target.load_module(src, name_expressions=["scaled<2>"], cache_dir=cache)
    assert len(fake.compiles) == 2 and m.get_function("scaled<2>") == ("kernel", "_Z9scaled")


def test_the_architecture_is_part_of_the_disk_key(
    fake: FakeCupy, src: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "gpu"
    cupy_target.load_module(src, cache_dir=cache)
    fake.cuda.runtime.getDeviceProperties = lambda i: {"warpSize": 32, "gcnArchName": "gfx1100"}
    cupy_target.clear_cache()
    cupy_target.load_module(src, cache_dir=cache)
    assert len(fake.compiles) == 2 and len(list(cache.glob("*.bin"))) == 2


def test_function_handles_are_looked_up_once(fake: FakeCupy, src: Path, tmp_path: Path) -> None:
    m = cupy_target.load_module(src, cache_dir=tmp_path)
    for _ in range(5):
        m.get_function("plain")
    assert m.raw.lookups == ["plain"]


def test_without_the_compiler_api_cupy_compiles_itself(
    monkeypatch: pytest.MonkeyPatch, src: Path, tmp_path: Path
) -> None:
    cupy = FakeCupy(compiler_api=False)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    cupy_target.clear_cache()
    m = cupy_target.load_module(src, cache_dir=tmp_path)
    assert cupy.compiles == [("rawmodule", (), ())] and m.raw.code == KERNEL
    assert not list(tmp_path.glob("*.bin"))
    cupy_target.clear_cache()


def test_warp_size_comes_from_the_device_properties(fake: FakeCupy) -> None:
    assert cupy_target.warp_size(fake) == 64


def test_kernels_dir_headers_are_in_the_real_requests(tmp_path: Path) -> None:
    """The registry's modules carry the digest of wb.h and quant.h: copying the kernels and
    editing quant.h changes it."""
    copy = tmp_path / "kernels"
    shutil.copytree(kernels_dir(), copy)
    code = (copy / "matvec.hip").read_text()
    before = cupy_target.headers_digest(code, [copy])
    with (copy / "quant.h").open("a") as f:
        f.write("\n// edited\n")
    assert cupy_target.headers_digest(code, [copy]) != before
