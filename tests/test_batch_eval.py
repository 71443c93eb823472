"""Batch generation (workbench.engine.batch_eval, `workbench eval`): input checks, order,
workers, resuming, and a Ray actor killed mid-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.engine import batch_eval
from workbench.engine.batch_eval import SamplingSpec, read_prompts, run_eval
from workbench.errors import UserError

GREEDY = SamplingSpec(max_tokens=6)


def _write_prompts(path: Path, n: int, seed: int) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    lines = [json.dumps({"prompt": " ".join(words[(seed + i * j) % 8] for j in range(1 + i % 5))})
             for i in range(n)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def _outputs(path: Path) -> list[tuple]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["index"], r["id"], r["text"], r["token_ids"], r["finish_reason"], r["error"])
            for r in recs]  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (['{"prompt": "a"}', "{not json"], "line 2: not JSON"),
        (['{"prompt": "a"}', "", '["a"]'], "line 3: each line is a JSON object"),
        (['{"prompt": "a", "messages": []}'], "line 1: give exactly one of prompt or messages"),
        (['{"prompt": ""}'], "line 1: prompt must be a non-empty string"),
        (['{"messages": [{"role": "user"}]}'], "line 1: messages must be"),
        (['{"prompt": "a", "max_tokens": 0}'], "line 1: max_tokens must be"),
        ([""], "holds no prompts"),
    ],
)
def test_bad_prompt_lines_are_named(tmp_path: Path, lines: list[str], words: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        read_prompts(path)
    assert words in e.value.message


def test_outputs_follow_input_order_with_timings(tiny_model, tmp_path, seed) -> None:
    prompts = _write_prompts(tmp_path / "p.jsonl", 9, seed)
    with prompts.open("a") as f:  # a chat prompt, an id and a per-prompt limit
        f.write('\n{"messages": [{"role": "user", "content": "hi"}], "id": "chat", '
                '"max_tokens": 2}\n')  # fmt: skip
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    s1 = run_eval(prompts, one, tiny_model, sampling=GREEDY, workers=1)
    run_eval(prompts, two, tiny_model, sampling=GREEDY, workers=2)
    assert (s1.total, s1.generated, s1.failed) == (10, 10, 0)
    assert _outputs(one) == _outputs(two)
    recs = [json.loads(line) for line in one.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(10))
    assert recs[0]["id"] == "1" and recs[-1]["id"] == "chat"
    assert len(recs[-1]["token_ids"]) <= 2
    assert all(r["timings"]["total_s"] > 0 and r["timings"]["prompt_tokens"] > 0 for r in recs)


def test_rerun_resumes_without_recomputing(tiny_model, tmp_path, seed, monkeypatch) -> None:
    prompts = _write_prompts(tmp_path / "p.jsonl", 8, seed)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    run_eval(prompts, full, tiny_model, sampling=GREEDY)
    lines = full.read_text().splitlines()
    # A run killed while writing its sixth result: five whole lines and a torn one.
    part.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    calls: list[int] = []
    real = batch_eval.generate_one

    def counting(engine, item, sampling):
        calls.append(item.index)
        return real(engine, item, sampling)

    monkeypatch.setattr(batch_eval, "generate_one", counting)
    summary = run_eval(prompts, part, tiny_model, sampling=GREEDY)
    assert calls == [5, 6, 7] and (summary.skipped, summary.generated) == (5, 3)
    assert _outputs(part) == _outputs(full)
    calls.clear()
    run_eval(prompts, part, tiny_model, sampling=GREEDY)  # all there: nothing to do
    assert calls == [] and _outputs(part) == _outputs(full)


def test_cli_eval_writes_results_and_names_bad_lines(tiny_model, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"prompt": "a dog"}\n')
    out = tmp_path / "o.jsonl"
    rc = main(["eval", str(prompts), "-o", str(out), "-m", str(tiny_model), "-n", "3"])
    err = capsys.readouterr().err
    assert rc == 0 and "2 prompts, 0 already done, 2 generated, 0 failed" in err
    assert [r[0] for r in _outputs(out)] == [0, 1]
    prompts.write_text('{"prompt": "the cat"}\n{"prompt": 5}\n')
    assert main(["eval", str(prompts), "-o", str(out), "-m", str(tiny_model)]) == 2
    assert "line 2: prompt must be a non-empty string" in capsys.readouterr().err
