"""The web server's quiet line per malformed request: rate-limited with an injected clock, bugs left loud."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import BadHttpMessage

from bridge.webserver import QUIET_WINDOW, QuietMalformedRequests


def record_of(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                             ("10.0.0.9",), exc_info)


def test_one_line_per_window_then_a_count_of_the_rest() -> None:
    now = [100.0]
    quiet = QuietMalformedRequests(monotonic=lambda: now[0])
    first = record_of(BadHttpMessage("Invalid header"))
    assert quiet.filter(first) and first.exc_info is None and first.levelno == logging.WARNING
    assert first.getMessage() == "web: refused a malformed request from 10.0.0.9 (400 Invalid header)"
    assert not quiet.filter(record_of(BadHttpMessage("again")))
    assert not quiet.filter(record_of(BadHttpMessage("and again")))
    now[0] += QUIET_WINDOW
    later = record_of(BadHttpMessage("Invalid header"))
    assert quiet.filter(later)
    assert later.getMessage().endswith(f"; 2 more in the last {QUIET_WINDOW:.0f} s")


def test_an_error_in_our_own_handler_keeps_its_traceback() -> None:
    bug = record_of(RuntimeError("a bug"))
    assert QuietMalformedRequests().filter(bug)
    assert bug.exc_info is not None and bug.levelno == logging.ERROR
