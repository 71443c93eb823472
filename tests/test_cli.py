"""The CLI: every flag documented, errors as one line with the category's exit status."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from workbench.cli import build_parser, main
from workbench.errors import EXIT_CODES

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _walk(parser: argparse.ArgumentParser, prefix: str = "workbench"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{prefix} {name}")


def test_every_command_and_flag_is_documented():
    text = DOCS.read_text()
    for command, parser in _walk(build_parser()):
        assert f"`{command}" in text, f"{command} is not in docs/cli.md"
        for action in parser._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in text, f"{command} {opt} is not in docs/cli.md"


def test_exit_codes_are_documented():
    text = DOCS.read_text()
    for category, code in EXIT_CODES.items():
        assert re.search(rf"\|\s*{code}\s*\|\s*`?{category}", text), (category, code)


def test_generate_json(tiny_model, capsys):
    rc = main(["generate", "hello", "--model", str(tiny_model), "--json", "--temperature", "0",
               "--max-tokens", "5", "--logprobs", "2"])  # fmt: skip
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["finish_reason"] in ("stop", "length")
    assert len(obj["token_ids"]) == obj["generated_tokens"] <= 5
    assert obj["prompt_tokens"] > 0 and "decode_tok_s" in obj["timings"]
    assert all(len(lp["top"]) == 2 for lp in obj["logprobs"])


def test_generate_streams_text_and_a_summary(tiny_model, capsys):
    assert main(["generate", "hi", "-m", str(tiny_model), "--temperature", "0", "-n", "4"]) == 0
    out = capsys.readouterr()
    assert "prompt tokens" in out.err and "decode" in out.err and "tok/s" in out.err


def test_tokenize_json_matches_the_tokenizer(tiny_model, capsys):
    assert main(["tokenize", "the cat", "<|im_end|>", "--model", str(tiny_model), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2
    assert "".join(rows[0]["pieces"]) == "the cat"
    assert len(rows[1]["ids"]) > 1  # special tokens are not parsed by default
    assert main(["tokenize", "<|im_end|>", "-m", str(tiny_model), "--json", "--special"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["ids"]) == 1


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["generate", "x", "--model", "/nonexistent/m.gguf"], 3, "does not exist"),
        (["generate", "x", "--model", "no-such-model"], 2, "unknown model"),
        (["generate", "x", "--temperature", "-1"], 2, "temperature"),
        (["generate", "x", "--top-p", "0"], 2, "top_p"),
        (["generate", "x", "--top-k", "-3"], 2, "top_k"),
        (["generate", "   "], 2, "empty"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, code, needle, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_magic_and_too_long_prompt(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope" * 10)
    assert main(["generate", "x", "--model", str(bad)]) == 3
    assert "not a GGUF file" in capsys.readouterr().err
    long_prompt = "the " * 200  # the tiny model's context is 96 tokens
    assert main(["generate", long_prompt, "--model", str(tiny_model), "--raw"]) == 2
    assert "context" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "generate", "x", "--model", str(tmp_path / "missing.gguf")])


def test_bench_generate_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "generate", "-m", str(tiny_model), "--prompt-tokens", "8", "--gen-tokens",
            "4", "--runs", "1", "--json", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj == json.loads(out.read_text())
    for key in ("prefill_tok_s", "decode_tok_s", "threads", "backend", "peak_rss_mb"):
        assert key in obj
    assert obj["prefill_tok_s"] > 0 and obj["decode_tok_s"] > 0 and obj["backend"] == "numpy"
