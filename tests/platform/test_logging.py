"""Structured logging: one JSON object per line, context variables, redaction, stdlib lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
import structlog

from flowbuilder.platform import logging as fb_logging
from flowbuilder.platform.logging import (
    REDACTED,
    bind_context,
    clear_context,
    get_logger,
    setup_logging,
)

Start = Callable[[], pytest.CaptureFixture[str]]
_NOISY = ("botocore", "boto3", "urllib3", "kombu", "httpx", "httpcore")


@pytest.fixture
def json_logging(
    capfd: pytest.CaptureFixture[str],
) -> Iterator[Callable[[], pytest.CaptureFixture[str]]]:
    """Call it inside the test: JSON logging to the captured stderr, put back afterwards.

    setup_logging() binds the ``sys.stderr`` of the moment it runs, and pytest swaps that
    stream between the setup and call phases, so configuring must happen in the test body.
    The previous handlers and structlog configuration are restored at teardown.
    """
    root = logging.getLogger()
    saved_handlers = list(root.handlers)
    saved_level = root.level
    saved_noisy = {name: logging.getLogger(name).level for name in _NOISY}
    saved_structlog = structlog.get_config()
    saved_configured = fb_logging._configured

    def start() -> pytest.CaptureFixture[str]:
        clear_context()
        setup_logging("INFO", force=True, json=True)
        capfd.readouterr()
        return capfd

    try:
        yield start
    finally:
        clear_context()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_noisy.items():
            logging.getLogger(name).setLevel(level)
        structlog.configure(**saved_structlog)
        fb_logging._configured = saved_configured


def _lines(capfd: pytest.CaptureFixture[str]) -> list[dict]:
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    # Every line is exactly one JSON object (json.loads fails on anything else).
    return [json.loads(line) for line in lines]


def test_structlog_line_is_one_json_object(json_logging: Start) -> None:
    capfd = json_logging()
    get_logger("flowbuilder.test").info("workflow started", nodes=3, name="demo")
    [record] = _lines(capfd)
    assert record["event"] == "workflow started"
    assert record["level"] == "info"
    assert record["logger"] == "flowbuilder.test"
    assert record["nodes"] == 3 and record["name"] == "demo"
    stamp = datetime.fromisoformat(record["timestamp"])
    assert stamp.utcoffset() == timedelta(0)


def test_context_is_bound_and_cleared(json_logging: Start) -> None:
    capfd = json_logging()
    log = get_logger("flowbuilder.test")
    bind_context(execution_id="exec-123", user_id="user-9")
    log.info("phase done")
    logging.getLogger("x").warning("stdlib inside run")
    clear_context()
    log.info("after the run")
    first, second, third = _lines(capfd)
    assert first["execution_id"] == "exec-123" and first["user_id"] == "user-9"
    # Standard-library lines carry the bound context too.
    assert second["execution_id"] == "exec-123"
    assert "execution_id" not in third and "user_id" not in third
    assert third["event"] == "after the run"


@pytest.mark.parametrize(
    "key",
    ["password", "db_password", "token", "access_token", "authorization", "api_key", "secret"],
)
def test_secret_looking_keys_are_redacted(json_logging: Start, key: str) -> None:
    capfd = json_logging()
    get_logger("flowbuilder.test").info("calling out", user="bob", **{key: "hunter2-value"})
    out = capfd.readouterr().err
    assert "hunter2-value" not in out
    [record] = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert record[key] == REDACTED
    assert record["user"] == "bob"
    assert record["event"] == "calling out"


def test_bound_secret_context_is_redacted(json_logging: Start) -> None:
    capfd = json_logging()
    bind_context(authorization="Bearer abc.def.ghi")
    logging.getLogger("x").warning("stdlib line")
    get_logger("y").warning("structlog line")
    out = capfd.readouterr().err
    assert "abc.def.ghi" not in out
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(records) == 2
    assert all(r["authorization"] == REDACTED for r in records)


def test_stdlib_logging_comes_out_as_json(json_logging: Start) -> None:
    capfd = json_logging()
    logging.getLogger("x").warning("disk at %d%%", 91)
    [record] = _lines(capfd)
    assert record["event"] == "disk at 91%"
    assert record["level"] == "warning"
    assert record["logger"] == "x"
    assert "timestamp" in record


def test_level_filters_lines(json_logging: Start) -> None:
    capfd = json_logging()
    get_logger("flowbuilder.test").debug("hidden")
    logging.getLogger("x").debug("hidden too")
    get_logger("flowbuilder.test").warning("shown")
    assert [r["event"] for r in _lines(capfd)] == ["shown"]


def test_exceptions_are_rendered_inside_the_json_line(
    json_logging: Start,
) -> None:
    capfd = json_logging()
    try:
        raise ValueError("kaboom")
    except ValueError:
        get_logger("flowbuilder.test").exception("node failed")
    [record] = _lines(capfd)
    assert record["level"] == "error"
    assert "ValueError: kaboom" in record["exception"]


def test_setup_is_idempotent_without_force(json_logging: Start) -> None:
    capfd = json_logging()

    def ours() -> list[logging.Handler]:
        return [h for h in logging.getLogger().handlers if h.get_name() == "flowbuilder"]

    [first] = ours()
    setup_logging(json=False)  # already configured: ignored, still JSON
    assert ours() == [first]
    logging.getLogger("x").warning("still json")
    assert [r["event"] for r in _lines(capfd)] == ["still json"]

    setup_logging("INFO", force=True, json=True)  # forced: replaces, never duplicates
    [second] = ours()
    assert second is not first
    logging.getLogger("x").warning("once")
    assert [r["event"] for r in _lines(capfd)] == ["once"]
