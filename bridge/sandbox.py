"""The local sandbox: the embedded InsiteChat emulator, SQLite state and a terminal chat with alerts."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from bridge import config
from bridge.app import GRACE, BridgeApp
from bridge.config import Settings
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_GAP_TOPIC, SANDBOX_KEY, SANDBOX_WEBHOOK_SECRET, Emulator

log = logging.getLogger(__name__)

VISITOR_SESSION = "website-visitor-1"
HELP = [
    "Type a question to ask the Sandbox Bot; 'reset' starts over; Ctrl-D quits.",
    "Play a website visitor: /visitor <message>  (say 'human' to escalate)   /lead <name> <email>",
    "Alerts print here; /claim and /resolve act on the newest one.",
    "Rate the last answer: /up, or /down [reason] (a 👎 raises an answer.flagged alert).",
    f"The bot knows nothing about the {SANDBOX_GAP_TOPIC}: ask about it to see its fallback message and a "
    "knowledge-gap alert.",
    "/report [7d] prints the report: answers, gaps, votes, alerts and how fast they were claimed.",
    "On a terminal: arrow keys edit the line, up and down recall earlier lines.",
]


def sandbox_settings(base_url: str, state_dir: Path) -> Settings:
    """A console-only bridge on the emulator, with the sandbox chatbot's alerts printed to the console."""
    return config.loads(
        f"""
insitechat:
  base_url: {base_url}
  api_key: ${{SANDBOX_KEY}}
state: {{sqlite: "{state_dir / 'state.db'}"}}
server: {{listen: "127.0.0.1:0"}}
console: {{enabled: true}}
chatbots:
  - {{id: {SANDBOX_CHATBOT_ID}, name: Sandbox Bot, webhook_secret: "${{SANDBOX_SECRET}}"}}
routes:
  - {{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}
alerts:
  - chatbot: {SANDBOX_CHATBOT_ID}
    events: [conversation.escalated, lead.captured, answer.unanswered, answer.flagged]
    to: ["console:alerts"]
""",
        source="<sandbox>",
        env={"SANDBOX_KEY": SANDBOX_KEY, "SANDBOX_SECRET": SANDBOX_WEBHOOK_SECRET},
    )


class Sandbox:
    """Owns the emulator and the bridge; the emulator's webhooks point at the bridge's receiver."""

    def __init__(self, *, grace: float = GRACE, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self.emulator = Emulator.sandbox()
        self.state_dir = Path(tempfile.mkdtemp(prefix="insitechat-sandbox-"))
        self._grace = grace
        self._stdin = stdin
        self._stdout = stdout
        self.app: BridgeApp | None = None
        self._opening: asyncio.Task[None] | None = None  # opens the console's input (started())

    async def prepare(self) -> BridgeApp:
        base_url = await self.emulator.start("127.0.0.1", 0)
        commands = {"/visitor": self._visitor, "/lead": self._lead, "/help": self._help, "/report": self._report}
        self.app = BridgeApp(
            sandbox_settings(base_url, self.state_dir),
            grace=self._grace,
            console_in=self._stdin,
            console_out=self._stdout,
            console_commands=commands,
        )
        if self.app.console is not None:
            self.app.console.input_ready.clear()  # until started() printed the banner
        return self.app

    def banner(self) -> str:
        assert self.app is not None
        server = f"web server at {self.app.server_url} (webhooks, /healthz), " if self.app.server_url else ""
        return (
            f"insitechat-bridge sandbox: local InsiteChat emulator at {self.emulator.base_url}, {server}console chat "
            f"and alerts, state in {self.state_dir} (removed on exit). /help lists the commands; Ctrl-D quits."
        )

    def started(self) -> None:
        """The bridge listens: webhooks go there, the banner says where, then the console takes input."""
        assert self.app is not None
        self.connect_webhooks()
        out = self._stdout or sys.stdout
        out.write(self.banner() + "\n")
        out.flush()
        if self.app.console is not None:
            self._opening = asyncio.get_running_loop().create_task(self._open_input(self.app), name="sandbox-input")

    async def _open_input(self, app: BridgeApp) -> None:
        """The console takes questions once the chatbot's fallback message is known: the first can be a gap."""
        try:
            await app.relay.read_fallbacks()
        except Exception:
            log.exception("reading the sandbox chatbot's fallback message failed; gaps show from a later answer")
        finally:
            if app.console is not None:
                app.console.input_ready.set()

    def connect_webhooks(self) -> None:
        """Once the bridge listens, the emulated chatbot sends its webhooks there, signed."""
        assert self.app is not None
        bot = self.emulator.chatbots[SANDBOX_CHATBOT_ID]
        bot.webhook_url = f"{self.app.server_url}/webhooks/insitechat/{SANDBOX_CHATBOT_ID}"

    async def close(self) -> None:
        """Stop the emulator and remove the state directory (the bridge has closed its store by now)."""
        try:
            await self.emulator.stop()
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    async def _visitor(self, text: str) -> list[str]:
        if not text:
            return ["usage: /visitor <what the website visitor writes>"]
        answer = await self.emulator.visitor_message(SANDBOX_CHATBOT_ID, text, session_id=VISITOR_SESSION)
        await self.emulator.wait_for_webhooks()  # so an alert prints right after the line that caused it
        return [f"the visitor sees: {answer}"]

    async def _lead(self, text: str) -> list[str]:
        if not text:
            return ["usage: /lead <name> <email>  (either may be left out, not both)"]
        name, _, email = text.rpartition(" ") if "@" in text else (text, "", "")
        await self.emulator.capture_lead(SANDBOX_CHATBOT_ID, name=name.strip(), email=email.strip())
        await self.emulator.wait_for_webhooks()
        return ["the visitor submitted the lead form"]

    async def _help(self, text: str) -> list[str]:
        return HELP

    async def _report(self, text: str) -> list[str]:
        """The report over this sandbox's store, as `insitechat-bridge report` prints it."""
        from bridge.report import gather_report, parse_duration, render_text

        assert self.app is not None
        try:
            window = parse_duration(text or "7d")
        except ValueError as exc:
            return [f"usage: /report [7d | 24h | 90m]: {exc}"]
        await self.app.facts.flush()  # the last second's facts are not written yet
        now = self.app.clock.time()
        names = {bot.id: bot.name for bot in self.app.settings.chatbots if bot.name}
        report = await gather_report(
            self.app.store, since=now - window, until=now, names=names, timezone=self.app.settings.report.timezone
        )
        return render_text(report).splitlines()
