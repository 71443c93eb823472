"""workbench.report and `workbench report`: fingerprint, run records, the notebook as HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from workbench import report
from workbench.cli import main
from workbench.errors import UserError


def test_fingerprint_names_versions_device_and_commit():
    fp = report.fingerprint()
    assert fp.packages["numpy"] == __import__("numpy").__version__
    assert fp.device["kind"] in ("cpu", "gpu") and fp.device["name"]
    commit, _ = report.git_state()
    assert fp.git_commit == commit
    if commit is not None:  # this checkout is a git repository
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
    rows = dict(fp.rows())
    assert rows["python"] == fp.python and "package gguf" in rows
    assert "<table" in fp._repr_html_() and "git commit" in fp._repr_html_()


def test_run_records_round_trip_through_json_lines(tmp_path):
    fp = report.fingerprint()
    rec = report.record("demo", {"n": 3}, lambda: {"sum": 6}, fp=fp, labels={"who": "test"})
    assert rec.result == {"sum": 6} and rec.duration_s >= 0
    path = tmp_path / "runs" / "records.jsonl"
    report.save_records(path, [rec])
    report.save_records(path, [rec])  # appends
    back = report.load_records(path)
    assert len(back) == 2 and back[0] == rec
    assert json.loads(path.read_text().splitlines()[0])["fingerprint"]["python"] == fp.python


def test_a_broken_record_file_names_its_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"kind": "x"}\n')
    with pytest.raises(UserError, match=r"r.jsonl:1 is not a run record"):
        report.load_records(path)


def test_kernel_bench_record_on_the_emulator():
    rec = report.run_kernel_bench(["add"], backend="numpy", warmup_ms=0, rep_ms=1)
    assert rec.params["backend"] == "emulator" and rec.kind == "bench_kernels"
    (row,) = rec.result
    assert row["kernel"] == "add" and row["p50_ms"] > 0 and row["bytes"] > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rep_ms=100", ("rep_ms", 100)),
        ('kernels=["add"]', ("kernels", ["add"])),
        ("model=smollm2", ("model", "smollm2")),
        ("records=", ("records", "")),
    ],
)
def test_parse_param(text, expected):
    assert report.parse_param(text) == expected


@pytest.mark.parametrize("text", ["rep_ms", "=3", "not a name=1"])
def test_parse_param_rejects_malformed(text):
    with pytest.raises(UserError):
        report.parse_param(text)


def test_report_notebook_parameters_are_the_documented_ones():
    params = report.notebook_parameters(report.notebooks_dir() / report.REPORT_NOTEBOOK)
    assert {"model", "backend", "kernels", "warmup_ms", "rep_ms", "records"} <= set(params)
    assert params["model"] == "smollm2"


def test_unknown_parameter_is_a_user_error(tmp_path, capsys):
    rc = main(["report", "-o", str(tmp_path / "r.html"), "--param", "no_such_knob=1"])
    assert rc == 2
    assert "no parameter no_such_knob" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.timeout(300)
def test_workbench_report_writes_html_with_fingerprint_table_and_plot(tiny_model, tmp_path):
    out, records = tmp_path / "report.html", tmp_path / "runs.jsonl"
    executed = tmp_path / "executed.ipynb"
    rc = main([
        "report", "-o", str(out), "--model", str(tiny_model), "--backend", "numpy",
        "--executed", str(executed),
        "--param", 'kernels=["rmsnorm", "add"]', "--param", "warmup_ms=0",
        "--param", "rep_ms=2", "--param", "max_tokens=3", "--param", f"records={records}",
    ])  # fmt: skip
    assert rc == 0
    page = out.read_text()
    # The fingerprint (as a table), the generation, the timing table and the roofline image.
    assert "workbench-fingerprint" in page and "git commit" in page
    assert "finish: length, 3 tokens" in page
    tables = re.findall(r"<table[^>]*class=\"dataframe\".*?</table>", page, re.S)
    assert any("rmsnorm" in t and "p50_ms" in t and "gb_s" in t for t in tables)
    assert re.search(r"<img[^>]+src=\"data:image/png;base64,", page)
    assert "report.run_kernel_bench" not in page  # the code cells are left out
    # What produced it: a title naming the model and backend, and the parameter values.
    title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
    assert title == f"workbench report: {tiny_model}, backend numpy"
    params = re.search(r"parameter value.*?</table>", page, re.S).group(0)
    for name, value in (("max_tokens", "3"), ("kernels", "rmsnorm, add"), ("rep_ms", "2")):
        assert re.search(rf"<th[^>]*>{name}</th><td[^>]*>{re.escape(value)}</td>", params), name
    # Token counts are integers, not 5.000000.
    assert re.search(r"<th[^>]*>generated_tokens</th><td[^>]*>3</td>", page)
    # It opens offline: no script or style fetched from the network.
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=\"https?://", page)
    # The run records were appended, and the executed notebook was kept.
    recs = report.load_records(records)
    assert [r.kind for r in recs] == ["generate", "bench_kernels"]
    assert recs[0].params["model_path"] == str(tiny_model)
    assert len(recs[0].result["token_ids"]) == 3
    assert Path(executed).is_file()


@pytest.mark.parametrize(
    ("value", "text"),
    [(5, "5"), (5.0, "5"), (0.2018451, "0.2018"), (["a", "b"], "a, b"), (None, "None"),
     (True, "True"), ("x", "x")],
)  # fmt: skip
def test_value_text(value, text):
    assert report.value_text(value) == text
