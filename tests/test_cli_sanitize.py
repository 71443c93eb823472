"""`workbench kernels sanitize` and `workbench kernels profile` on the instrumented emulator."""

from __future__ import annotations

import json

import pytest

from workbench.cli import main
from workbench.errors import EXIT_CODES
from workbench.kernels.instrument import TARGETS, Finding, KernelReport
from workbench.kernels.sanitize_report import SanitizeRun


@pytest.mark.tool("clang")
def test_sanitize_registered_kernels_clean_at_both_warp_widths(capsys):
    assert main(["kernels", "sanitize", "add", "rmsnorm", "--warp", "32,64"]) == 0
    out = capsys.readouterr()
    assert "2 kernel(s) x warp 32,64 under memcheck, racecheck, initcheck, synccheck" in out.out
    assert "4 of 4 runs clean" in out.out and "kind" not in out.out


@pytest.mark.tool("clang")
def test_sanitize_json_names_each_run_and_its_tools(capsys):
    assert main(["kernels", "sanitize", "swiglu", "--tools", "memcheck", "--warp", "32",
                 "--json"]) == 0  # fmt: skip
    obj = json.loads(capsys.readouterr().out)
    assert obj["clean"] is True and obj["findings"] == [] and obj["tools"] == ["memcheck"]
    (run,) = obj["runs"]
    assert run["kernel"] == "swiglu" and run["warp_size"] == 32 and run["error"] is None
    assert run["report"]["tools"] == ["memcheck"] and obj["seed"] == 0


def test_sanitize_prints_one_row_per_finding_and_exits_1(monkeypatch, capsys):
    import workbench.engine.kernel_sanitize as ks

    race = Finding(
        tool="racecheck", kind="shared_race_war", file="/x/kernels/sampling.hip", line=120,
        block=(0, 0, 0), thread=(5, 0, 0), message="add a __syncthreads() between the lines",
        count=7, other_file="/x/kernels/sampling.hip", other_line=98,
    )  # fmt: skip
    report = KernelReport("argmax", "gfx90a", 64, ("racecheck",), [race])
    runs = [
        SanitizeRun("argmax", 64, report),
        SanitizeRun("add", 64, None, "kernel.fault: stopped"),
    ]
    seen = {}

    def fake(names, *, tools, warps, seed, progress, arch):
        seen.update(names=names, tools=tools, warps=warps, seed=seed, arch=arch)
        progress(0, 1, "argmax (warp 64)")
        progress(1, 1, "done")
        return runs

    monkeypatch.setattr(ks, "sanitize_kernels", fake)
    rc = main(
        ["kernels", "sanitize", "argmax", "--tools", "racecheck", "--warp", "64", "--seed", "5"]
    )
    assert rc == 1
    out = capsys.readouterr()
    assert seen == {
        "names": ["argmax"],
        "tools": ("racecheck",),
        "warps": (64,),
        "seed": 5,
        "arch": None,
    }
    lines = out.out.splitlines()
    assert "0 of 2 runs clean" in lines[0]
    assert lines[1].split()[:5] == ["kernel", "warp", "tool", "kind", "where"]
    assert "sampling.hip:120 vs sampling.hip:98" in lines[3] and " 7 " in lines[3]
    assert "launch" in lines[4] and "kernel.fault: stopped" in lines[4]
    assert "sanitize" in out.err  # the progress bar is on stderr


def test_sanitize_refuses_an_unknown_tool_or_warp(capsys):
    for bad in (["--tools", "leakcheck"], ["--warp", "48"]):
        with pytest.raises(SystemExit) as e:
            main(["kernels", "sanitize", "add", *bad])
        assert e.value.code == 2
    assert "unknown tool" in capsys.readouterr().err


@pytest.mark.tool("clang")
def test_profile_counts_agree_with_hand_arithmetic(capsys):
    # add: out[i] = a[i] + b[i] over 4096 floats, one element per thread, warps of 32: every
    # request is 32 lanes x 4 bytes = 128 bytes in four whole 32-byte sectors.
    args = ["kernels", "profile", "add", "--shape", "count=4096", "--target", "sm_90"]
    assert main([*args, "--no-occupancy", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    totals = obj["report"]["totals"]
    assert totals["requests"] == 3 * 4096 / 32
    assert totals["bytes_requested"] == totals["bytes_moved"] == 3 * 4096 * 4
    assert totals["efficiency"] == 1.0 and totals["shared_requests"] == 0
    floor = obj["floor"]
    assert floor["memory_s"] == pytest.approx(3 * 4096 * 4 / (TARGETS["sm_90"].peak_gb_s * 1e9))
    assert floor["flops"] == 4096 and floor["bound"] == "memory"
    assert obj["occupancy"] is None and obj["occupancy_note"].startswith("occupancy: skipped")
    counted = [r for r in obj["source_view"] if r["access"]]
    assert {r["file"] for r in counted} == {"elementwise.hip"}
    assert any("out[i] = a[i] + b[i];" in r["source"] for r in counted)


@pytest.mark.tool("clang")
def test_profile_prints_the_source_view_totals_and_the_floor(capsys):
    rc = main(["kernels", "profile", "add", "--shape", "count=1024", "--target", "gfx942",
               "--no-occupancy"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "add [count=1024] on the CPU emulator, counted for gfx942 (warp 64)" in out
    assert "out[i] = a[i] + b[i];" in out and "global load" in out and "100.0%" in out
    assert "time floor on gfx942 (AMD Instinct MI300X, warp 64)" in out
    assert "a floor, not a prediction" in out and "occupancy: skipped" in out


def test_profile_bad_shape_is_a_user_error(capsys):
    assert main(["kernels", "profile", "add", "--shape", "rows=3"]) == EXIT_CODES["user"]
    assert "add takes shape keys count" in capsys.readouterr().err


@pytest.mark.tool("clang")
def test_profile_occupancy_from_the_offline_compiler_or_why_not(capsys):
    import shutil

    assert main(["kernels", "profile", "add", "--shape", "count=256", "--target", "sm_90"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    if shutil.which("nvcc"):  # add: 256-thread blocks, few registers: every warp slot filled
        assert last.startswith("sm_90: theoretical occupancy 100% (64 of 64 warps per SM at 256")
    else:
        assert last.startswith("occupancy: n/a (") and "nvcc" in last


def test_a_stopped_launch_is_a_row_and_the_sweep_goes_on(monkeypatch):
    import workbench.kernels.sanitize as ks
    from workbench.engine.kernel_sanitize import sanitize_kernels
    from workbench.kernels.emulator import KernelBoundsError

    wild = Finding(
        tool="memcheck", kind="out_of_bounds_write", file="/k/add.hip", line=3, block=(0, 0, 0),
        thread=(0, 0, 0), message="writes far outside every buffer",
    )  # fmt: skip

    def fake(names, tools, warps, *, seed, progress=None, arch=None):
        out = []
        for name in names:
            if progress is not None:
                progress(name, warps[0])
            report = KernelReport(name, "gfx90a", warps[0], tools)
            if name == "swiglu" and warps[0] == 32:
                report.findings.append(wild)
                raise KernelBoundsError("kernel.out_of_bounds", "stopped", report=report)
            out.append(report)
        return out

    monkeypatch.setattr(ks, "sanitize_registered", fake)
    seen = []
    runs = sanitize_kernels(
        ["add", "swiglu", "argmax"], warps=(32, 64), progress=lambda *a: seen.append(a)
    )
    assert [(r.kernel, r.warp_size, r.clean) for r in runs] == [
        ("add", 32, True), ("swiglu", 32, False), ("argmax", 32, True),
        ("add", 64, True), ("swiglu", 64, True), ("argmax", 64, True),
    ]  # fmt: skip
    stopped = runs[1]
    assert stopped.error == "kernel.out_of_bounds: stopped" and stopped.report.findings == [wild]
    # warp 32's batch stopped at swiglu, so its kernels were counted again one at a time
    assert [d for d, _, _ in seen] == [0, 1, 0, 1, 2, 3, 4, 5, 6] and seen[-1] == (6, 6, "done")
