"""The console adapter: a terminal chat with the relay, one line in, the answer out."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import logging
import os
import re
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TextIO

from bridge.alerts import Alert, AlertState
from bridge.cards import QUOTE_LIMIT, cut, facts, plain_title, state_line
from bridge.desk import AlertDesk
from bridge.feedback import Feedback, Vote, VoteResult, thanks_for
from bridge.formatting import neutralise_plain, to_plain
from bridge.messages import Conversation, Inbound, Outbound, OutboundKind

log = logging.getLogger(__name__)

CHANNEL = "console"
# Escape sequences (arrow keys, function keys, colours) and other control characters: never part
# of a question. A terminal's keys are read by LineEditor; this cleans piped input.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[O][@-~]?|\x1b.?|[\x00-\x08\x0b-\x1f\x7f]")
_COMMAND = re.compile(r"/[A-Za-z][\w-]*")  # "/claim", "/lead"; "/etc/hosts ..." is a question
_CLEAR_LINE = "\r\x1b[K"

# A sandbox command: gets the rest of the line, returns lines to print.
ConsoleCommand = Callable[[str], Awaitable[list[str]]]


class ConsoleAdapter:
    """Reads questions from a stream (stdin) and prints the answers; end of input ends it.

    Alerts routed to `console:<name>` are printed too; `/claim` and `/resolve` play the
    buttons, `/up` and `/down [reason]` the 👍 / 👎 under the last answer, and `commands` adds the
    sandbox's own (`/visitor`, `/lead`...).
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
        feedback: Feedback | None = None,
    ) -> None:
        self._on_message = on_message
        self._desk = desk
        self._feedback = feedback
        self._last_answer = ""  # the job id of the newest answer that offers 👍 / 👎: what /up and /down rate
        self._commands = dict(commands or {})
        self._alerts: list[str] = []  # printed alerts with buttons, newest last: /claim takes the newest
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._user = user
        # Message ids must be unique across runs: the dedupe store outlives the process.
        self._ids = (f"{time.time_ns()}-{n}" for n in itertools.count(1))
        self._reader_task: asyncio.Task[None] | None = None
        self._editor: LineEditor | None = None  # on a terminal: the line being typed
        self._prompt_text = ""  # a terminal without line editing: the prompt, reprinted after late output
        self._prompt_shown = False
        self.finished = asyncio.Event()  # set at end of input
        self.input_ready = asyncio.Event()  # cleared by the sandbox until its banner is out
        self.input_ready.set()

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
        self._print(prefix, list(outbound.parts))
        if outbound.feedback_job:
            self._last_answer = outbound.feedback_job
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
        """Lines out; on a terminal showing the prompt, above it, and the prompt with what was typed comes back."""
        text = "".join(f"{prefix}> {line}\n" for line in lines)
        editor = self._editor
        if editor is not None and editor.active:
            text = _CLEAR_LINE + text + editor.render()
        elif self._prompt_shown:  # a terminal without line editing: the prompt on a line of its own again
            text = "\n" + text + self._prompt_text
        self._stdout.write(text)
        self._stdout.flush()

    @property
    def command_names(self) -> list[str]:
        """The /commands this console knows, in the order /help would list them."""
        return [
            *self._commands,
            *(["/claim", "/resolve"] if self._desk is not None else []),
            *(["/up", "/down"] if self._feedback is not None else []),
        ]

    async def _run_command(self, text: str) -> bool:
        """Handle a /command line; False when the line is not a command (then it is a question)."""
        name, _, rest = text.partition(" ")
        if not _COMMAND.fullmatch(name):
            return False  # "/etc/hosts is what?" is a question
        if name in ("/claim", "/resolve") and self._desk is not None:
            self._print("sandbox", await self._act(self._desk, name[1:]))
            return True
        if name in ("/up", "/down") and self._feedback is not None:
            self._print("sandbox", await self._vote(self._feedback, Vote.UP if name == "/up" else Vote.DOWN, rest))
            return True
        command = self._commands.get(name)
        if command is None:
            known = ", ".join(self.command_names) or "none here"
            self._print("sandbox", [f"unknown command {name}; the commands are: {known} (anything else is a question)"])
            return True
        self._print("sandbox", await command(rest.strip()))
        return True

    async def _vote(self, feedback: Feedback, vote: Vote, reason: str) -> list[str]:
        """👍 / 👎 on the last answer; a 👎 may carry a reason (the modal of the other platforms)."""
        if not self._last_answer:
            return ["no answer to rate yet: ask a question first"]
        if vote is Vote.DOWN and reason.strip():
            outcome = await feedback.reason(self._last_answer, self._user, reason, platform="console", who=self._user)
            if outcome.result not in (VoteResult.STALE, VoteResult.FAILED):
                return [thanks_for(reason)]
        else:
            outcome = await feedback.vote(self._last_answer, self._user, vote, platform="console", who=self._user)
        return [outcome.text]

    async def _act(self, desk: AlertDesk, action: str) -> list[str]:
        """Claim or resolve the newest alert; what to say when that changed nothing."""
        if not self._alerts:
            return ["no alert to act on yet"]
        alert_id = self._alerts[-1]
        before = await desk.load(alert_id)
        alert = await desk.act(alert_id, action, self._user)
        if alert is None:
            return ["that alert has expired"]
        if before is None or alert.version != before.version:
            return []  # the card's update says it
        if alert.state is AlertState.RESOLVED:
            who = "you" if alert.resolved_by == self._user else alert.resolved_by
            return [f"alert {alert_id[:8]} is already resolved by {who}: nothing to {action}"]
        if alert.state is AlertState.CLAIMED:
            who = "you" if alert.claimed_by == self._user else alert.claimed_by
            return [f"alert {alert_id[:8]} is already claimed by {who}"]
        return [f"alert {alert_id[:8]} cannot be {action}ed"]  # a lead or a notice: no buttons

    async def _read_loop(self) -> None:
        interactive = _is_tty(self._stdin)
        try:
            await self.input_ready.wait()  # the sandbox's banner comes first
            async for line in self._input(interactive):
                text = clean_line(line)
                if not text or (text.startswith("/") and await self._run_command(text)):
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
        finally:
            self.finished.set()

    async def _input(self, interactive: bool) -> AsyncIterator[str]:
        """The lines typed, a prompt before each on a terminal; piped input gets clean output, no prompt."""
        fd = self._stdin.fileno() if interactive else -1
        saved = _cbreak(fd) if interactive and _is_tty(self._stdout) else None
        if saved is None:
            self._prompt_text = f"{self._user}> " if interactive else ""
            self._show_prompt()
            async for line in _lines(self._stdin):
                self._prompt_shown = False
                yield line
                self._show_prompt()
            return
        editor = self._editor = LineEditor(f"{self._user}> ")
        typed: asyncio.Queue[tuple[str | None, bool]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                typed.put_nowait((None, False))
                return
            echo, lines = editor.feed(decoder.decode(data))
            if echo:
                self._stdout.write(echo)
                self._stdout.flush()
            for line in lines:
                typed.put_nowait(line)

        # Keys are read as they come (no thread, nothing blocks the loop): a small readline.
        loop.add_reader(fd, readable)
        try:
            while True:
                if typed.empty():
                    self._stdout.write(editor.show())
                    self._stdout.flush()
                entered, echoed = await typed.get()
                if entered is None:
                    return
                if not echoed:  # typed ahead while the bot was busy: shown now, as if typed here
                    self._stdout.write(f"{editor.prompt}{entered}\n")
                yield entered
        finally:
            loop.remove_reader(fd)
            if editor.active:
                self._stdout.write("\n")
                self._stdout.flush()
            self._editor = None
            _restore(fd, saved)

    def _show_prompt(self) -> None:
        if self._prompt_text:
            self._stdout.write(self._prompt_text)
            self._stdout.flush()
            self._prompt_shown = True


class LineEditor:
    """Line editing and history for a terminal in cbreak mode; pure, the adapter does the I/O.

    Keys: left/right, Home/End (and Ctrl-A/E), up/down (and Ctrl-P/N) through this run's
    history, Backspace, Delete, Ctrl-U/K/W; Enter submits; Ctrl-D on an empty line is end of
    input. Every other escape sequence and control character is dropped, never typed.
    """

    def __init__(self, prompt: str, history: list[str] | None = None) -> None:
        self.prompt = prompt
        self.active = False  # the prompt is on screen and keys are echoed
        self.history: list[str] = list(history or [])  # this run's only: nothing typed is written to disk
        self._buffer = ""
        self._cursor = 0
        self._recall = len(self.history)  # index into history while browsing; len(history) = the line being typed
        self._draft = ""
        self._escape = ""  # an escape sequence read so far (it may end in the next read)

    @property
    def text(self) -> str:
        return self._buffer

    def show(self) -> str:
        """The prompt comes up; returns what to write."""
        self.active = True
        return self.render()

    def render(self) -> str:
        """The whole line redrawn, the cursor where it belongs."""
        back = len(self._buffer) - self._cursor
        return f"{_CLEAR_LINE}{self.prompt}{self._buffer}" + (f"\x1b[{back}D" if back else "")

    def feed(self, keys: str) -> tuple[str, list[tuple[str | None, bool]]]:
        """Apply keys; returns what to echo and the lines completed (None: end of input; bool: echoed)."""
        echo: list[str] = []
        done: list[tuple[str | None, bool]] = []
        for key in keys:
            before = (self._buffer, self._cursor)
            if self._escape or key == "\x1b":
                self._escape = key if key == "\x1b" else self._escape + key  # a new ESC starts over
                sequence = self._escape
                if _escape_complete(sequence):
                    self._escape = ""
                    self._sequence(sequence)
            elif key in "\r\n":
                line, echoed = self._buffer, self.active
                if self.active:
                    echo.append(self.render() + "\n")
                    self.active = False
                if line.strip() and (not self.history or self.history[-1] != line):
                    self.history.append(line)
                self._buffer, self._cursor, self._recall, self._draft = "", 0, len(self.history), ""
                done.append((line, echoed))
                continue
            elif key == "\x04":  # Ctrl-D
                if not self._buffer:
                    if self.active:
                        echo.append("\n")
                        self.active = False
                    done.append((None, False))
                    return "".join(echo), done
                self._delete(self._cursor, self._cursor + 1)
            else:
                self._control(key)
            if self.active and (self._buffer, self._cursor) != before:
                echo.append(self.render())
        return "".join(echo), done

    def _control(self, key: str) -> None:
        if key in ("\x7f", "\b"):
            self._delete(self._cursor - 1, self._cursor)
        elif key == "\x01":
            self._cursor = 0
        elif key == "\x05":
            self._cursor = len(self._buffer)
        elif key == "\x02":
            self._cursor = max(self._cursor - 1, 0)
        elif key == "\x06":
            self._cursor = min(self._cursor + 1, len(self._buffer))
        elif key == "\x10":
            self._browse(-1)
        elif key == "\x0e":
            self._browse(1)
        elif key == "\x15":
            self._delete(0, self._cursor)
        elif key == "\x0b":
            self._delete(self._cursor, len(self._buffer))
        elif key == "\x17":
            start = len(self._buffer[: self._cursor].rstrip().rpartition(" ")[0])
            self._delete(start + (1 if start else 0), self._cursor)
        elif key == "\t":
            self._insert(" ")
        elif key >= " ":
            self._insert(key)
        # any other control character: dropped

    def _sequence(self, sequence: str) -> None:
        final, params = sequence[-1], sequence[2:-1]
        if sequence[1:2] not in ("[", "O"):
            return  # Alt+key and the like
        if final == "D":
            self._cursor = max(self._cursor - 1, 0)
        elif final == "C":
            self._cursor = min(self._cursor + 1, len(self._buffer))
        elif final == "A":
            self._browse(-1)
        elif final == "B":
            self._browse(1)
        elif final == "H" or (final == "~" and params in ("1", "7")):
            self._cursor = 0
        elif final == "F" or (final == "~" and params in ("4", "8")):
            self._cursor = len(self._buffer)
        elif final == "~" and params == "3":
            self._delete(self._cursor, self._cursor + 1)
        # function keys, bracketed paste markers, focus events...: dropped

    def _insert(self, text: str) -> None:
        self._buffer = self._buffer[: self._cursor] + text + self._buffer[self._cursor :]
        self._cursor += len(text)

    def _delete(self, start: int, end: int) -> None:
        start, end = max(start, 0), min(end, len(self._buffer))
        if start < end:
            self._buffer = self._buffer[:start] + self._buffer[end:]
            self._cursor = start

    def _browse(self, step: int) -> None:
        if self._recall == len(self.history):
            self._draft = self._buffer  # the line being typed comes back after the newest entry
        index = min(max(self._recall + step, 0), len(self.history))
        if index == self._recall:
            return
        self._recall = index
        self._buffer = self.history[index] if index < len(self.history) else self._draft
        self._cursor = len(self._buffer)


def _escape_complete(sequence: str) -> bool:
    """Whether an escape sequence (ESC [ ... final, ESC O x, ESC x) has been read to its end."""
    if len(sequence) < 2:
        return False
    if sequence[1] == "[":
        # The Linux console's F1-F5 are ESC [ [ A..E: that second [ is not the end.
        return len(sequence) > 2 and "@" <= sequence[-1] <= "~" and sequence[2:] != "["
    if sequence[1] == "O":
        return len(sequence) > 2
    return True


def clean_line(line: str) -> str:
    """A line as a question: escape sequences and control characters removed, spaces trimmed."""
    return _CONTROL.sub("", line).strip()


def _cbreak(fd: int) -> list[Any] | None:
    """Keys one by one, no echo (the editor echoes), signals kept (Ctrl-C); None where that is not possible."""
    try:
        import termios
        import tty
    except ImportError:  # not a POSIX terminal
        return None
    try:
        saved: list[Any] = termios.tcgetattr(fd)
        tty.setcbreak(fd, termios.TCSANOW)  # TCSANOW: keys typed before the prompt are kept
    except (termios.error, OSError):
        return None
    return saved


def _restore(fd: int, saved: list[Any]) -> None:
    import termios

    with contextlib.suppress(termios.error, OSError):
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


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
    if not mode or stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not _is_tty(stream)):
        # Regular files, in-memory streams and devices such as /dev/null (a service's stdin) never
        # block, and epoll cannot watch them: read them directly.
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
