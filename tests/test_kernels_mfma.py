"""Prefill matmul on AMD matrix cores (kernels/matmul.hip's MFMA body) and the emulator's model of
``__builtin_amdgcn_mfma_f32_16x16x16f16`` (kernels/emulator/wb_emu_mfma.h).

The emulator compiles the MFMA body when it emulates an MFMA target (``arch="gfx90a"``: it defines
``__gfx90a__`` as hipcc does); the builtin is a wave64 instruction, so those runs use warp 64 and
warp 32 is refused. The builtin is checked against NumPy on the lane layout of AMD's Matrix
Instruction Calculator; the kernel against float64 products of the fp16-rounded inputs. Inputs
are fresh random data each run (tests/conftest.py's seed; WORKBENCH_TEST_SEED=N replays one).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from tests.test_kernels_quant import _blocks, _dot_tolerance, _guard_intact, _poisoned
from workbench.backends.device import DeviceBackend, DeviceWeight
from workbench.cli import main
from workbench.engine.generate import Engine, GenerationConfig
from workbench.errors import EXIT_CODES, UserError
from workbench.gguf.quants import block_layout
from workbench.kernels import quant_kernels as qk
from workbench.kernels import toolchain
from workbench.kernels.emulator import EmulatorModule, KernelError
from workbench.kernels.registry import kernels_dir

Q = GGMLQuantizationType
pytestmark = pytest.mark.tool("c++")

# One wave64 MFMA per wave: D = A B + C for each of `waves` independent 16x16x16 problems.
# Lane L loads its operands by the documented layout (j = L % 16, g = L / 16):
#   a = A[j][4g .. 4g+3], b = B[4g .. 4g+3][j], c = C[4g .. 4g+3][j], and stores d likewise.
# A wrong layout in the emulator pairs the wrong elements and D != A B + C.
_BUILTIN_SOURCE = """
#include "wb.h"
WB_KERNEL void mfma16(const uint16_t* A, const uint16_t* B, const float* C, float* D) {
  const int wave = (int)(blockIdx.x * blockDim.x + threadIdx.x) / 64;
  const int lane = (int)threadIdx.x % 64, j = lane % 16, g = lane / 16;
  const uint16_t* a = A + wave * 256;  // (16, 16) row-major: A[i][k] at i * 16 + k
  const uint16_t* b = B + wave * 256;  // B[k][j] at k * 16 + j
  uint64_t abits = 0, bbits = 0;
  wb_f32x4 c;
  for (int e = 0; e < 4; ++e) {
    abits |= (uint64_t)a[j * 16 + 4 * g + e] << (16 * e);
    bbits |= (uint64_t)b[(4 * g + e) * 16 + j] << (16 * e);
    c[e] = C[wave * 256 + (4 * g + e) * 16 + j];
  }
  const wb_f32x4 d = __builtin_amdgcn_mfma_f32_16x16x16f16(
      wb_f16x4_from_bits(abits), wb_f16x4_from_bits(bbits), c, 0, 0, 0);
  for (int e = 0; e < 4; ++e) D[wave * 256 + (4 * g + e) * 16 + j] = d[e];
}
"""


@pytest.fixture(scope="module")
def emu_cache(shared_emu_cache: str) -> str:
    return shared_emu_cache


def _builtin_module(warp_size: int, cache: str) -> EmulatorModule:
    return EmulatorModule(
        code=_BUILTIN_SOURCE, options=(f"-I{kernels_dir()}",), warp_size=warp_size,
        cache_dir=cache, arch="gfx90a",
    )  # fmt: skip


def _mfma_inputs(rng: np.random.Generator, waves: int):
    a = rng.standard_normal((waves, 16, 16)).astype(np.float16)
    b = rng.standard_normal((waves, 16, 16)).astype(np.float16)
    c = rng.standard_normal((waves, 16, 16)).astype(np.float32)
    return a, b, c


def test_mfma_builtin_matches_numpy_on_the_documented_layout(
    emu_cache: str, rng: np.random.Generator
) -> None:
    """Three blocks of two waves: each wave's D equals A @ B + C (fp16 products exact; the sum
    rounded once to fp32), including signed zeros, subnormal and largest fp16 inputs."""
    waves = 6
    a, b, c = _mfma_inputs(rng, waves)
    a[0, 3, :4] = (6.1e-5, -5.96e-8, 65504.0, -0.0)  # smallest normal, subnormal, max, -0
    b[0, :4, 7] = (2.0, 1024.0, 2.0**-10, 3.0)
    d = np.full((waves, 16, 16), np.nan, np.float32)
    kernel = _builtin_module(64, emu_cache).get_function("mfma16")
    kernel((3, 1, 1), (128, 1, 1), (a.view(np.uint16), b.view(np.uint16), c, d))
    ref = a.astype(np.float64) @ b.astype(np.float64) + c
    assert np.allclose(d, ref, rtol=1e-6, atol=1e-6), f"max err {np.abs(d - ref).max()}"
    # The layout is not symmetric in A and B: a transposed operand would give A.T @ B etc.
    assert not np.allclose(d, a.astype(np.float64).transpose(0, 2, 1) @ b + c, atol=1e-3)


def test_mfma_builtin_is_refused_at_warp_32_and_on_a_partial_wave(
    emu_cache: str, rng: np.random.Generator
) -> None:
    a, b, c = _mfma_inputs(rng, 2)
    d = np.zeros((2, 16, 16), np.float32)
    args = (a.view(np.uint16), b.view(np.uint16), c, d)
    with pytest.raises(KernelError, match=r"__builtin_amdgcn_mfma_f32_16x16x16f16 is a wave64"):
        _builtin_module(32, emu_cache).get_function("mfma16")((1, 1, 1), (128, 1, 1), args)
    with pytest.raises(KernelError, match=r"mfma_f32_16x16x16f16 needs all 64 lanes"):
        _builtin_module(64, emu_cache).get_function("mfma16")((1, 1, 1), (96, 1, 1), args)


def test_arch_must_be_an_amd_target(emu_cache: str) -> None:
    with pytest.raises(UserError, match="arch must be an AMD target"):
        EmulatorModule(code=_BUILTIN_SOURCE, arch="sm_90", cache_dir=emu_cache)


# --- the prefill matmul's MFMA body ------------------------------------------------------------

# (n, rows, cols): one partial tile; several tiles each way with ragged edges; k not a multiple of
# the 32-wide k-step (float types) or of the MFMA's 16.
_SHAPES = {
    32: ((1, 7, 32), (3, 33, 96), (33, 65, 160), (40, 130, 64)),
    256: ((2, 9, 256), (35, 70, 512)),
    1: ((1, 5, 1), (5, 17, 37), (34, 66, 90)),
}


@pytest.mark.parametrize(
    "qtype", [Q.Q4_0, Q.Q8_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.F16, Q.F32, Q.BF16], ids=lambda q: q.name
)
def test_matmul_mfma_matches_the_fp16_reference(
    qtype: GGMLQuantizationType, emu_cache: str, rng: np.random.Generator
) -> None:
    """Against the float64 product of the fp16-rounded x and W, within the fp32 accumulation
    bound; against the exact product, within fp16 input rounding. No write past the output."""
    loader = qk.emulator_loader(64, emu_cache, arch="gfx90a")
    for n, rows, cols in _SHAPES[min(block_layout(qtype)[0], 256)]:
        raw = _blocks(rng, qtype, rows, cols)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        out, buf = _poisoned((n, rows))
        qk.launch_matmul(loader, qtype, x, raw, out)
        what = f"{qtype.name} n={n} {rows}x{cols}"
        assert _guard_intact(buf), f"{what}: wrote past the output"
        x16 = np.abs(x.astype(np.float16).astype(np.float64))
        w16 = np.abs(qk.dequant_reference(raw, qtype).astype(np.float16).astype(np.float64))
        err = np.abs(out - qk.matmul_fp16_reference(x, raw, qtype))
        tol = _dot_tolerance(x16, w16.T, cols)
        assert np.all(err <= tol), f"{what}: max err {err.max()} (fp16 inputs, fp32 sums)"
        # fp16 rounding of both inputs: at most 2 u16 |x||w| per term (u16 = 2**-11).
        exact = np.abs(out - qk.matmul_reference(x, raw, qtype))
        assert np.all(exact <= 2.5 * 2.0**-11 * (x16 @ w16.T) + tol), f"{what}: vs exact"


def test_matmul_mfma_is_refused_at_warp_32(emu_cache: str, rng: np.random.Generator) -> None:
    loader = qk.emulator_loader(32, emu_cache, arch="gfx90a")
    raw = _blocks(rng, Q.Q8_0, 4, 64)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(KernelError, match="wave64"):
        qk.launch_matmul(loader, Q.Q8_0, x, raw, np.empty((2, 4), np.float32))


def test_device_backend_prefill_on_emulated_matrix_cores(rng: np.random.Generator) -> None:
    """DeviceBackend(arch="gfx90a") on the emulator takes the MFMA body for prefill (n > 1); the
    default emulates no arch (scalar path, float32 inputs); gfx90a at warp 32 is refused."""
    raw = _blocks(rng, Q.Q4_0, 40, 96)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    w = DeviceWeight("w", Q.Q4_0, (40, 96), raw)
    ref16 = qk.matmul_fp16_reference(x, raw, Q.Q4_0)
    mfma = DeviceBackend("emulator", arch="gfx90a")
    assert mfma.mfma
    assert np.allclose(mfma.linear(w, x), ref16, rtol=1e-5, atol=1e-5)
    assert not DeviceBackend("emulator").mfma
    with pytest.raises(UserError, match="waves of 64"):
        DeviceBackend("emulator", warp_size=32, arch="gfx90a")


# --- tools and ISA -----------------------------------------------------------------------------


@pytest.mark.tool("clang")
def test_matmul_mfma_is_clean_under_the_sanitizers(capsys: pytest.CaptureFixture[str]) -> None:
    """`workbench kernels sanitize --arch gfx90a`: memcheck, racecheck, initcheck and synccheck
    find nothing in the MFMA body (warp 64, the arch's default): the tiles' stores and reads are
    separated by the two barriers."""
    names = ["matmul_q4_0", "matmul_q6_k", "matmul_f32"]
    assert main(["kernels", "sanitize", *names, "--arch", "gfx90a", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["clean"] is True and obj["arch"] == "gfx90a" and obj["warps"] == [64]
    assert [(r["kernel"], r["warp_size"], r["error"]) for r in obj["runs"]] == [
        (n, 64, None) for n in names
    ]


def test_sanitize_refuses_warp_32_on_a_matrix_core_arch(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["kernels", "sanitize", "matmul_q8_0", "--arch", "gfx90a", "--warp", "32"])
    assert code == EXIT_CODES["user"] and "runs waves of 64" in capsys.readouterr().err


@pytest.mark.tool("hipcc")
@pytest.mark.parametrize("arch", ["gfx908", "gfx90a", "gfx940"])
def test_matmul_isa_uses_mfma_on_cdna(arch: str) -> None:
    text = toolchain.asm("matmul_q4_k", arch)
    assert re.search(r"\bv_mfma_f32_16x16x16_?f16\b", text), f"matmul_q4_k: no v_mfma on {arch}"


@pytest.mark.tool("hipcc")
def test_matmul_isa_keeps_the_scalar_path_without_matrix_cores() -> None:
    assert "v_mfma" not in toolchain.asm("matmul_q4_k", "gfx1030")


# --- the engine ---------------------------------------------------------------------------------


def test_engine_on_emulated_matrix_cores_keeps_the_numpy_greedy_tokens(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device backend emulating gfx90a (prefill through the MFMA body, fp16 inputs) generates
    the NumPy backend's greedy tokens, and its prefill logits stay within KL 0.01."""
    import workbench.backends.device as device

    cfg = GenerationConfig(max_tokens=8, temperature=0)
    monkeypatch.setattr(device, "DeviceBackend", functools.partial(DeviceBackend, arch="gfx90a"))
    for kind in ("Q4_1", "F16"):
        ref = Engine(tiny_models[kind], backend="numpy")
        dev = Engine(tiny_models[kind], backend="emulator")
        assert dev.backend.mfma
        prompt = "the cat sat on the mat and"
        a, b = ref.generate(prompt, cfg).run(), dev.generate(prompt, cfg).run()
        assert a.token_ids == b.token_ids, kind
        tokens = np.arange(3, 40, 3)
        la = ref.transformer.forward(tokens, ref.transformer.new_cache(), all_logits=True)
        lb = dev.transformer.forward(tokens, dev.transformer.new_cache(), all_logits=True)
        for x, y in zip(la, lb, strict=True):
            lx = x.astype(np.float64) - np.logaddexp.reduce(x.astype(np.float64))
            ly = y.astype(np.float64) - np.logaddexp.reduce(y.astype(np.float64))
            assert float(np.sum(np.exp(lx) * (lx - ly))) < 0.01, kind


def test_device_arch_names_the_target_without_feature_flags() -> None:
    """What DeviceBackend("cupy") decides `mfma` from: gcnArchName without ``:sramecc+`` etc. on
    ROCm, ``sm_<cc>`` on CUDA (a stand-in for CuPy's runtime API)."""
    from types import SimpleNamespace

    from workbench.kernels.cupy_target import device_arch

    def fake(is_hip: bool, name: object) -> SimpleNamespace:
        runtime = SimpleNamespace(
            is_hip=is_hip, getDeviceProperties=lambda i: {"gcnArchName": name}
        )
        device = SimpleNamespace(id=0, compute_capability="90")
        return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime, Device=lambda: device))

    assert device_arch(fake(True, b"gfx90a:sramecc+:xnack-")) == "gfx90a"
    assert device_arch(fake(True, "gfx942")) == "gfx942" and qk.has_mfma("gfx942")
    assert device_arch(fake(False, "")) == "sm_90" and not qk.has_mfma("sm_90")
    assert not qk.has_mfma("gfx1030") and not qk.has_mfma(None)
