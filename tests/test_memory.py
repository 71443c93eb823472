"""Peak resident memory of a generation: what the process maps and when (docs/performance.md,
"Memory"). Sizes are the machine's business; these tests check the mechanisms: the warm-up loads
every kernel a generation runs before any weight is read, the compiler's library pages are given
back without breaking a later compile, and the generate path imports nothing it does not use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from workbench.backends import compiler_pages

_SMAPS = Path("/proc/self/smaps")

SMAPS_SAMPLE = """\
7f0000000000-7f0000100000 r--p 00000000 fd:01 11 /venv/llvmlite/binding/libllvmlite.so
Size:               1024 kB
Rss:                 900 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0000100000-7f0000500000 r-xp 00100000 fd:01 11 /venv/llvmlite/binding/libllvmlite.so
Rss:                4000 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 r--p 00500000 fd:01 11 /venv/llvmlite/binding/libllvmlite.so
Rss:                1024 kB
Anonymous:          1024 kB
7f0000600000-7f0000610000 rw-p 00600000 fd:01 11 /venv/llvmlite/binding/libllvmlite.so
Anonymous:             0 kB
7f0000700000-7f0000800000 r-xp 00000000 fd:01 12 /usr/lib/libc.so.6
Anonymous:             0 kB
7f0000800000-7f0000900000 r-xp 00000000 fd:01 13 /opt/conda/lib/libLLVM-20.so
Anonymous:             0 kB
7f0000900000-7f0000a00000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
"""


def test_releasable_takes_only_llvm_mappings_without_private_pages():
    spans = compiler_pages.releasable(SMAPS_SAMPLE)
    assert spans == [
        (0x7F0000000000, 0x7F0000100000),  # headers and read-only data
        (0x7F0000100000, 0x7F0000500000),  # code
        (0x7F0000800000, 0x7F0000900000),  # a separate libLLVM's code
    ]  # not: relocated read-only data (private pages), writable data, other libraries


def _llvm_resident_kb() -> int:
    spans = set(compiler_pages.releasable(_SMAPS.read_text()))
    total, inside = 0, False
    for line in _SMAPS.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            inside = (start, end) in spans
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not _SMAPS.exists(), reason="needs Linux's /proc/self/smaps")
def test_release_gives_back_llvm_pages_and_compiling_still_works(rng):
    @njit  # a fresh dispatcher: this compile runs LLVM, so its pages are resident
    def scaled_sum(x, a):
        return (x * a).sum()

    x = rng.standard_normal(1000)
    assert scaled_sum(x, 2.0) == pytest.approx(2.0 * x.sum(), rel=1e-12)
    before = _llvm_resident_kb()
    assert before > 0
    assert compiler_pages.release() > 0
    after = _llvm_resident_kb()
    assert after < before / 2, (before, after)
    # The pages come back from the file when LLVM runs again: a new compile gives right answers.
    assert scaled_sum(x, np.float32(3.0)) == pytest.approx(3.0 * x.sum(), rel=1e-6)


def _run(script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Kernels loaded (from numba's cache, or compiled) per numba dispatcher of the backends.
_LOADED = """
import sys
from numba.core.dispatcher import Dispatcher

def loaded():
    return {f"{name}.{attr}": len(obj.signatures)
            for name, mod in list(sys.modules.items()) if name.startswith("workbench.backends.")
            for attr, obj in vars(mod).items() if isinstance(obj, Dispatcher)}
"""


def test_warm_up_loads_every_kernel_before_the_weights_are_read(tiny_models):
    """After NumpyBackend.warm_up (which reads no weight), a generation loads no kernel: on
    every weight type, fused decode and per-operation decode alike. In a fresh process, so
    that no earlier test has loaded a kernel the warm-up would miss."""
    script = _LOADED + textwrap.dedent(
        """
    import json
    import numpy as np
    from workbench.backends.numpy_backend import NumpyBackend
    from workbench.engine.generate import Engine, GenerationConfig
    from workbench.engine.model import Transformer
    from workbench.gguf.reader import read_gguf

    missed = []
    for path in sys.argv[1:]:
        engine = Engine(path, backend="numpy")
        engine.backend.warm_up(engine.transformer)
        before = loaded()
        engine.warm_up()
        engine.generate([3, 1, 4, 1], GenerationConfig(max_tokens=3, temperature=0)).run()
        engine.generate([5], GenerationConfig(max_tokens=2, temperature=0)).run()
        missed += [(path, "fused", k) for k, n in loaded().items() if n != before.get(k, 0)]
        backend = NumpyBackend(fused=False)
        tf = Transformer(read_gguf(path), backend)
        backend.warm_up(tf)
        before = loaded()
        cache = tf.new_cache(8)
        logits = tf.prefill(np.array([2, 7, 1]), cache)
        tf.decode_one_token(int(np.argmax(logits)), cache)
        missed += [(path, "per-op", k) for k, n in loaded().items() if n != before.get(k, 0)]
    print(json.dumps(missed))
    """
    )
    order = ("Q8_0", "Q4_0", "Q4_1", "F16", "F32", "untied")
    missed = _run(script, *(str(tiny_models[name]) for name in order))
    assert missed == []


# Modules the generate path must not import: the server, Ray, notebooks, trace exporters.
HEAVY = ("ray", "pandas", "fastapi", "uvicorn", "starlette", "matplotlib", "IPython",
         "ipywidgets", "opentelemetry.exporter", "opentelemetry.sdk.trace.export",
         "workbench.server", "workbench.widgets")  # fmt: skip


def test_bench_generate_imports_no_server_ray_or_exporter(tiny_model):
    script = """
    import json, sys
    from workbench.cli import main
    code = main(["bench", "generate", "--model", sys.argv[1], "--backend", "numpy",
                 "--prompt-tokens", "4", "--gen-tokens", "2", "--runs", "1", "--no-limits",
                 "--json"])
    print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
    """
    got = _run(script, str(tiny_model))
    assert got["code"] == 0
    heavy = [m for m in got["modules"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == []
