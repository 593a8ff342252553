"""What every request to our web server gets: a bounded body read, and one quiet line per malformed request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bridge.logs import as_warning_line

BODY_TIMEOUT = 10.0  # seconds a request body may take to arrive in full (a slow-loris body holds a connection)
QUIET_WINDOW = 60.0  # at most one line per this many seconds about malformed requests; the rest are counted


class BodyTooLarge(Exception):
    """The body grew past the limit; the caller answers 413."""


async def read_body(request: web.Request, *, limit: int, within: float = BODY_TIMEOUT) -> bytes:
    """The whole body, at most `limit` bytes, within `within` seconds.

    Raises BodyTooLarge as soon as it grows past `limit` (never reading all of a huge one), and
    web.HTTPRequestTimeout (408) when it trickles in slower than that.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(within):
            while chunk := await request.content.read(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the request body took too long") from None
    return b"".join(chunks)


class QuietMalformedRequests(logging.Filter):
    """aiohttp logs every malformed request (bad request line, header or chunking) as an ERROR with a traceback.

    Those come from scanners and broken clients, not from us: one WARNING line without the
    traceback, at most one per QUIET_WINDOW, with how many were left out. Errors inside our
    own handlers (a 500) keep their traceback: those are bugs.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._monotonic = monotonic
        self._next = 0.0
        self._skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.msg != "Error handling request from %s" or not isinstance(error, HttpProcessingError):
            return True
        now = self._monotonic()
        if now < self._next:
            self._skipped += 1
            return False
        skipped, self._skipped, self._next = self._skipped, 0, now + QUIET_WINDOW
        reason = error.message if isinstance(error.message, str) and error.message else type(error).__name__
        as_warning_line(
            record,
            "web: refused a malformed request from %s (%d %s)%s",
            (*(record.args or ("?",)), error.code, reason.splitlines()[0][:120],
             f"; {skipped} more in the last {QUIET_WINDOW:.0f} s" if skipped else ""),
        )
        return True


def quiet_malformed_requests() -> None:
    """Install the filter on aiohttp's server logger, once."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietMalformedRequests) for f in server_log.filters):
        server_log.addFilter(QuietMalformedRequests())
