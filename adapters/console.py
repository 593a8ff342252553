"""The console adapter: a terminal chat with the relay, one line in, the answer out."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TextIO

from bridge.alerts import Alert, AlertState
from bridge.cards import QUOTE_LIMIT, cut, facts, plain_title, state_line
from bridge.desk import AlertDesk
from bridge.formatting import neutralise_plain, to_plain
from bridge.messages import Conversation, Inbound, Outbound, OutboundKind

log = logging.getLogger(__name__)

CHANNEL = "console"

# A sandbox command: gets the rest of the line, returns lines to print.
ConsoleCommand = Callable[[str], Awaitable[list[str]]]


class ConsoleAdapter:
    """Reads questions from a stream (stdin) and prints the answers; end of input ends it.

    Alerts routed to `console:<name>` are printed too; `/claim` and `/resolve` play the
    buttons, and `commands` adds the sandbox's own (`/visitor`, `/lead`...).
    """

    name = "console"

    def __init__(
        self,
        on_message: Callable[[Inbound], Awaitable[object]],
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        user: str = "you",
        desk: AlertDesk | None = None,
        commands: Mapping[str, ConsoleCommand] | None = None,
    ) -> None:
        self._on_message = on_message
        self._desk = desk
        self._commands = dict(commands or {})
        self._alerts: list[str] = []  # printed alerts with buttons, newest last: /claim takes the newest
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._user = user
        # Message ids must be unique across runs: the dedupe store outlives the process.
        self._ids = (f"{time.time_ns()}-{n}" for n in itertools.count(1))
        self._reader_task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()  # set at end of input

    async def start(self) -> None:
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(), name="console-reader")

    async def stop(self) -> None:
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)

    def render(self, markdown: str) -> list[str]:
        """Readable plain text, kept whole: a terminal has no message limit."""
        return to_plain(markdown)

    async def send(self, outbound: Outbound) -> list[str]:
        prefix = "bot" if outbound.kind is OutboundKind.ANSWER else "bot (notice)"
        for part in outbound.parts:
            self._stdout.write(f"{prefix}> {part}\n")
        self._stdout.flush()
        return [next(self._ids) for _ in outbound.parts]

    @asynccontextmanager
    async def working(self, inbound: Inbound) -> AsyncIterator[None]:
        yield

    # --- alerts (AlertPoster) ---

    def render_card(self, alert: Alert, mentions: tuple[str, ...]) -> dict[str, Any]:
        return console_card(alert, mentions)

    async def post_alert(self, channel: str, card: dict[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        if card["actionable"]:
            self._alerts.append(card["id"])
        self._print("alert", card["lines"])
        return f"{card['id']}:{next(self._ids)}"

    async def find_alert(self, channel: str, key: str, *, since: float, thread: str) -> str | None:
        return None  # a terminal cannot be searched; printing twice after a crash is harmless here

    async def update_alert(self, channel: str, reference: str, card: dict[str, Any]) -> None:
        self._print("alert update", card["lines"])

    async def permalink(self, conversation: Conversation) -> str | None:
        return None

    def _print(self, prefix: str, lines: list[str]) -> None:
        for line in lines:
            self._stdout.write(f"{prefix}> {line}\n")
        self._stdout.flush()

    async def _run_command(self, text: str) -> bool:
        """Handle a /command line; False when it is not one of ours (then it is a question)."""
        name, _, rest = text.partition(" ")
        if name in ("/claim", "/resolve") and self._desk is not None:
            if not self._alerts:
                self._print("sandbox", ["no alert to act on yet"])
                return True
            alert = await self._desk.act(self._alerts[-1], name[1:], self._user)
            if alert is None:
                self._print("sandbox", ["that alert has expired"])
            return True
        command = self._commands.get(name)
        if command is None:
            return False
        self._print("sandbox", await command(rest.strip()))
        return True

    async def _read_loop(self) -> None:
        interactive = _is_tty(self._stdin)
        try:
            self._prompt(interactive)
            async for line in _lines(self._stdin):
                text = line.strip()
                if not text or (text.startswith("/") and await self._run_command(text)):
                    self._prompt(interactive)
                    continue
                inbound = Inbound(
                    platform="console",
                    workspace="",
                    channel=CHANNEL,
                    message_id=next(self._ids),
                    author_id=self._user,
                    author_name=self._user,
                    text=text,
                    is_dm=True,
                )
                # Answer in order, like a person typing one question after another.
                await self._on_message(inbound)
                self._prompt(interactive)
        finally:
            self.finished.set()

    def _prompt(self, interactive: bool) -> None:
        # Piped input gets clean output (one line per answer); a terminal gets a prompt.
        if interactive:
            self._stdout.write(f"{self._user}> ")
            self._stdout.flush()


def console_card(alert: Alert, mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    """Plain lines for a terminal; `/claim` and `/resolve` stand in for the buttons."""
    lines = [f"{plain_title(alert)}  [alert {alert.id[:8]}]"]
    if alert.event.visitor_text:
        lines.append(f'  "{cut(alert.event.visitor_text, QUOTE_LIMIT)}"')
    lines += [f"  {key}: {value}" for key, value in facts(alert)]
    lines += [f"  {who}: {cut(said, 300)}" for who, said in alert.history[-4:]]
    status = state_line(alert, lambda text: text)
    if status:
        lines.append(f"  {status}")
    actionable = alert.can_be_claimed and alert.state is not AlertState.RESOLVED
    if actionable:
        lines.append("  (type /claim or /resolve)")
    return {"id": alert.id, "actionable": actionable, "lines": [neutralise_plain(line) for line in lines]}


async def _lines(stream: TextIO) -> AsyncIterator[str]:
    """Lines of a stream without blocking the loop and without a thread."""
    mode = os.fstat(stream.fileno()).st_mode if _has_fileno(stream) else 0
    if not mode or stat.S_ISREG(mode):
        # Regular files (and in-memory streams) never block: read them directly.
        for line in stream:
            yield line
            await asyncio.sleep(0)
        return
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stream)
    try:
        while line_bytes := await reader.readline():
            yield line_bytes.decode("utf-8", errors="replace")
    finally:
        transport.close()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


def _has_fileno(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    return True
