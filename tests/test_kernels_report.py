"""`workbench kernels report`: one decode token's launches recorded on the instrumented emulator,
turned into per-role rows (bytes moved vs ideal, efficiency, bank conflicts, VGPRs, time floor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from tests.synth import TinyConfig, write_tiny_llama
from workbench.cli import main
from workbench.engine import decode_launches, decode_report
from workbench.errors import UserError
from workbench.kernels.instrument import target_spec

POSITION = 40  # the tiny models' context is 96


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q4_1 model of 3 layers: the first a kind of its own, the other two one kind."""
    path = tmp_path_factory.mktemp("report") / "tiny-3.gguf"
    return write_tiny_llama(path, TinyConfig(qtype=Q.Q4_1, n_layers=3), seed=1)


@pytest.fixture(scope="module")
def record(three_layers: Path) -> dict:
    return decode_launches.record_decode(
        three_layers, position=POSITION, target="gfx942", warp_size=64, resources_arch=None
    )


@pytest.mark.tool("clang")
def test_record_follows_the_forward_pass_of_one_layer_kind(record):
    # the first layer apart (it also runs the embedding's norm), then layers 1 and 2: one kind,
    # one of them run and counted twice
    assert record["layers"] == {
        "layer 0": {"index": 0, "count": 1},
        "layer 1": {"index": 1, "count": 2},
    }
    roles = [c["role"] for c in record["calls"]]
    assert roles[0] == "embed token_embd" and roles[-1] == "sample_token"
    for want in (
        "norm_quant attn_norm",
        "linear_qkv attn_q",
        "rope_kv",
        "attention_quant",
        "linear_add attn_output",
        "linear_swiglu ffn_gate",
        "linear_add ffn_down",
    ):
        assert want in roles
    attention = next(c for c in record["calls"] if c["role"] == "attention_quant")
    assert attention["section"] == "layer 0"
    # every launch carries real counters
    for call in record["calls"]:
        assert call["launches"], call["role"]
        for launch in call["launches"]:
            assert launch["totals"]["bytes_moved"] > 0, (call["role"], launch["symbol"])
    assert record["kv_dtype"] == "float16"


@pytest.mark.tool("clang")
def test_rows_are_never_below_the_ideal_and_efficiency_is_a_fraction(record):
    report = decode_report.build_report(record)
    assert report.rows
    for r in report.rows:
        assert 0 < r.ideal_bytes <= r.bytes_moved, r.role
        # Requested bytes count every lane, so a load many lanes make of one address (a
        # broadcast: attention's query) can exceed the segments moved; products never do.
        assert r.efficiency > 0, r.role
        if r.role.startswith("linear"):
            assert r.efficiency <= 1, r.role
        assert r.bank_conflict_ways >= 1.0, r.role
    assert 0 < report.ideal_bytes <= report.bytes_moved
    peak = target_spec("gfx942").peak_gb_s * 1e9
    assert report.floor_s == pytest.approx(report.bytes_moved / peak)


@pytest.mark.tool("clang")
def test_layer_rows_are_the_recorded_layer_times_its_kind(record):
    report = decode_report.build_report(record)
    first = [c for c in record["calls"] if c["section"] == "layer 0"]
    later = [c for c in record["calls"] if c["section"] == "layer 1"]
    n_first, n_later = (sum(len(c["launches"]) for c in calls) for calls in (first, later))
    assert report.launches_per_layer == {"layer 0 (x1)": n_first, "layer 1 (x2)": n_later}
    assert n_first == n_later + 1  # the first layer's own RMSNorm launch
    model_launches = sum(len(c["launches"]) for c in record["calls"] if c["section"] == "model")
    assert report.launches == n_first + 2 * n_later + model_launches

    def qkv(calls: list[dict]) -> tuple[int, int]:
        call = next(c for c in calls if c["role"] == "linear_qkv attn_q")
        return sum(int(lc["totals"]["bytes_moved"]) for lc in call["launches"]), len(
            call["launches"]
        )

    (moved0, n0), (moved1, n1) = qkv(first), qkv(later)
    q = next(r for r in report.rows if r.role == "linear_qkv attn_q")
    assert q.per_layer and q.bytes_moved == moved0 + 2 * moved1 and q.launches == n0 + 2 * n1
    norm = next(r for r in report.rows if r.role == "norm_quant attn_norm")
    assert (q.layers, norm.layers) == (3, 1)  # the embedding's norm: the first layer only


@pytest.mark.tool("clang")
def test_attention_traffic_grows_with_the_position(three_layers, record):
    later = decode_launches.record_decode(
        three_layers, position=90, target="gfx942", warp_size=64, resources_arch=None
    )

    def attention(rec: dict) -> tuple[int, int]:
        row = next(r for r in decode_report.build_report(rec).rows if r.role == "attention_quant")
        return row.bytes_moved, row.ideal_bytes

    (moved_40, ideal_40), (moved_90, ideal_90) = attention(record), attention(later)
    assert moved_90 > moved_40 and ideal_90 > ideal_40


@pytest.mark.tool("clang")
def test_markdown_has_a_row_per_role_and_the_totals(record):
    report = decode_report.build_report(record)
    text = decode_report.markdown(report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| role |"))
    assert lines[header] == "| " + " | ".join(decode_report.COLUMNS) + " |"
    body = lines[header + 2 :]
    assert len(body) == len(report.rows) + 1
    assert body[-1].startswith("| **total per token** |")
    assert any(line.startswith("| linear_qkv attn_q (x3) | `matvec_fused<WB_Q4_1>` |")
               for line in body)  # fmt: skip
    assert any(line.startswith("| norm_quant attn_norm (x1) | `rmsnorm_q8_1` |") for line in body)
    assert "- method: " in text and "time floor per token on AMD Instinct MI300X" in text


@pytest.mark.tool("clang")
def test_cli_json_on_a_tiny_model(tiny_models, capsys):
    args = ["kernels", "report", "--model", str(tiny_models["Q4_1"]), "--position", "8",
            "--no-resources", "--json"]  # fmt: skip
    assert main(args) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["target"] == "gfx942" and obj["position"] == 8 and obj["warp_size"] == 64
    assert obj["resources_note"] == "skipped"
    totals = obj["totals"]
    assert 0 < totals["ideal_bytes"] <= totals["bytes_moved"]
    assert 0 < totals["efficiency"] <= 1
    assert totals["launches"] == sum(r["launches"] for r in obj["rows"])
    assert obj["method"] == decode_report.METHOD


def test_resources_say_why_without_the_compiler(monkeypatch):
    from workbench.errors import BackendError
    from workbench.kernels import toolchain

    def missing(arch: str, **_: object) -> str:
        raise BackendError("backend.compiler_missing", "hipcc not found")

    monkeypatch.setattr(toolchain, "compiler_for", missing)
    launches = [{"symbol": "add", "source": "elementwise.hip", "options": []}]
    res = decode_launches.kernel_resources(launches, "gfx90a")
    assert res["kernels"] == {} and res["note"] == "n/a: hipcc not found"


@pytest.mark.tool("hipcc")
def test_resources_from_hipcc_name_vgprs_and_occupancy(record):
    launches = [launch for call in record["calls"] for launch in call["launches"]]
    some = [lc for lc in launches if lc["symbol"] in ("argmax", "rope_kv")]  # small sources
    res = decode_launches.kernel_resources(some, "gfx90a")
    assert res["note"] == ""
    for sym in ("argmax", "rope_kv"):
        found = res["kernels"][sym]
        assert found["vgprs"] > 0 and 1 <= found["occupancy"] <= 10, (sym, found)


def test_exported_tree_of_a_revision_holds_its_package_and_kernels():
    with decode_report.exported_tree("HEAD") as tree:
        assert (tree / "workbench" / "engine" / "model.py").is_file()
        assert (tree / "kernels" / "wb.h").is_file()
    with (
        pytest.raises(UserError, match="no-such-revision"),
        decode_report.exported_tree("no-such-revision"),
    ):
        pass


def test_kernels_dir_must_look_like_kernels(tmp_path):
    with (
        pytest.raises(UserError, match="not a kernels directory"),
        decode_report.exported_tree(kernels=tmp_path),
    ):
        pass


@pytest.mark.tool("clang")
def test_a_kernels_dir_runs_in_its_own_process_with_the_same_counters(three_layers, record):
    # the path --rev and --kernels-dir take: a copied tree, a separate Python process
    from workbench.kernels.registry import kernels_dir

    steps: list[str] = []
    other = decode_report.decode_report(
        three_layers, position=POSITION, resources=False, kernels=kernels_dir(),
        progress=lambda phase, *_: steps.append(phase),
    )  # fmt: skip
    here = decode_report.build_report(record)
    assert other.source == f"kernels from {kernels_dir()}"
    assert [(r.role, r.kernels, r.launches, r.bytes_moved, r.ideal_bytes) for r in other.rows] == [
        (r.role, r.kernels, r.launches, r.bytes_moved, r.ideal_bytes) for r in here.rows
    ]
    assert "build" in steps and "decode" in steps  # the child's progress reached us
