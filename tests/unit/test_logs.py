"""Log set-up: JSON lines parse, and configured secrets are masked even in tracebacks."""

from __future__ import annotations

import io
import json
import logging

import pytest

from bridge.logs import setup_logging


@pytest.fixture(autouse=True)
def keep_root_logger():  # type: ignore[no-untyped-def]
    """setup_logging replaces the root handlers; give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in ("httpx", "httpcore", "aiohttp.access", "discord", "slack_bolt", "slack_sdk"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_json_lines_with_extra_fields_and_masked_secrets() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", secrets=["xoxb-masked-token"], stream=stream)
    log = logging.getLogger("bridge.test")
    log.info("answered in %d ms with token %s", 12, "xoxb-masked-token", extra={"platform": "slack"})
    try:
        raise RuntimeError("failed with xoxb-masked-token")
    except RuntimeError:
        log.exception("boom")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "answered in 12 ms with token ***"
    assert lines[0]["platform"] == "slack" and lines[0]["level"] == "info"
    assert "xoxb-masked-token" not in stream.getvalue()
    assert "RuntimeError" in lines[1]["error"]


def test_text_format_is_readable() -> None:
    stream = io.StringIO()
    setup_logging("WARNING", "text", stream=stream)
    logging.getLogger("bridge.test").info("hidden at warning level")
    logging.getLogger("bridge.test").warning("shown")
    assert "hidden" not in stream.getvalue() and "WARNING bridge.test: shown" in stream.getvalue()
