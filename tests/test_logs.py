"""Logging setup: JSON lines with request ids, no prompt text above DEBUG, env config."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from workbench.errors import UserError
from workbench.observe.logs import configure, configure_from_env, redact, request_context

log = logging.getLogger("workbench.test")


@pytest.fixture(autouse=True)
def _restore_logger() -> Iterator[None]:
    logger = logging.getLogger("workbench")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for h in logger.handlers:
        if h not in saved[0]:
            logger.removeHandler(h)
            h.close()
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_request_id_and_extras_but_no_prompt_at_info() -> None:
    out = io.StringIO()
    configure(level="info", fmt="json", stream=out)
    prompt = "my secret prompt text"
    with request_context("req-42"):
        log.info("request started", extra={"prompt": prompt, "max_tokens": 8})
        log.debug("not shown at info")
    log.warning("outside")
    first, second = _lines(out)
    assert first["request_id"] == "req-42" and first["message"] == "request started"
    assert first["level"] == "info" and first["logger"] == "workbench.test"
    assert first["max_tokens"] == 8 and "ts" in first
    assert prompt not in out.getvalue()
    assert first["prompt"] == f"<{len(prompt)} chars>"
    assert second["request_id"] is None and second["level"] == "warning"


def test_prompt_text_is_kept_at_debug() -> None:
    out = io.StringIO()
    configure(level="debug", fmt="json", stream=out)
    log.debug("sampled", extra={"completion": "hello world"})
    assert _lines(out)[0]["completion"] == "hello world"


def test_text_format_with_and_without_colour() -> None:
    out = io.StringIO()
    configure(level="warning", fmt="text", stream=out)  # StringIO is no TTY: no colour
    with request_context("r-7"):
        log.warning("fell back", extra={"to": "numpy", "prompt": "abc"})
    line = out.getvalue()
    assert "WARNING" in line and "[r-7]" in line and "fell back" in line and "to='numpy'" in line
    assert "\033[" not in line and "abc" not in line
    out = io.StringIO()
    configure(level="warning", stream=out, colour=True)
    log.error("boom")
    assert "\033[31m" in out.getvalue()


def test_reconfiguring_replaces_our_handler() -> None:
    a, b = io.StringIO(), io.StringIO()
    configure(stream=a)
    configure(stream=b)
    log.warning("once")
    assert a.getvalue() == "" and b.getvalue().count("once") == 1


def test_configure_from_env(tmp_path) -> None:
    path = tmp_path / "wb.log"
    env = {"WORKBENCH_LOG_LEVEL": "INFO", "WORKBENCH_LOG_FORMAT": "json",
           "WORKBENCH_LOG_FILE": str(path)}  # fmt: skip
    logger = configure_from_env(env)
    assert logger.level == logging.INFO
    log.info("to the file")
    for h in logger.handlers:
        h.flush()
    assert json.loads(path.read_text())["message"] == "to the file"
    assert configure_from_env({}, stream=io.StringIO()).level == logging.WARNING


def test_redact() -> None:
    assert redact("hello", logging.DEBUG) == "hello"
    assert redact("hello", logging.INFO) == "<5 chars>"


@pytest.mark.parametrize(
    "env",
    [
        {"WORKBENCH_LOG_LEVEL": "loud"},
        {"WORKBENCH_LOG_FORMAT": "xml"},
        {"WORKBENCH_LOG_FILE": "/nonexistent-dir/x/wb.log"},
    ],
)
def test_bad_config_is_a_user_error(env) -> None:
    with pytest.raises(UserError):
        configure_from_env(env, stream=io.StringIO())


def test_bad_level_number_is_a_user_error() -> None:
    with pytest.raises(UserError):
        configure(level=7)
