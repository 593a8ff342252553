"""Platforms that start and fail on their own: the bridge takes webhooks while Slack or Discord is down,
connects when they come back, reconnects a dead client, and stops or fails /healthz on a refusal that cannot heal."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import discord.gateway
import discord.http
import httpx
import pytest
import yarl

from adapters.discord import DiscordAdapter
from adapters.slack import SlackAdapter
from bridge import config
from bridge.app import BridgeApp
from bridge.clock import SystemClock
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator, sign_webhook
from bridge.backoff import Backoff
from bridge.webhooks import SIGNATURE_HEADER
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack

BOT = SANDBOX_CHATBOT_ID
SECRET = "whsec-supervision"
SLACK_ALERTS = "C0ALERTS"
QUICK = Backoff(base=0.05, cap=0.2)  # between connection attempts: fast, still exponential and jittered
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class ShiftedClock(SystemClock):
    """The real clock, moved forward on demand: the outbox's next try "minutes later", without the wait."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset


def later(app: BridgeApp, clock: ShiftedClock) -> bool:
    """Ten minutes go by: the outbox's backoff so far has run out, and it is told to look."""
    clock.offset += 600
    app.outbox.wake()
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll a condition (plain or awaitable) until it is truthy; fail after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def slack_yaml(
    api_url: str, *, state: Path, emulator_url: str, bot_token: str = "${SLACK_BOT_TOKEN}", listen: str = "127.0.0.1:0"
) -> str:
    return f"""
insitechat: {{base_url: "{emulator_url}", api_key: "${{IC_KEY}}"}}
state: {{sqlite: "{state}"}}
server: {{listen: "{listen}"}}
slack:
  bot_token: {bot_token}
  app_token: ${{SLACK_APP_TOKEN}}
  mode: socket
  api_url: {api_url}
chatbots:
  - {{id: {BOT}, name: Support Bot, webhook_secret: "${{HOOK_SECRET}}"}}
routes:
  - {{platform: slack, chatbot: {BOT}, reply: mention}}
alerts:
  - {{chatbot: {BOT}, events: [conversation.escalated], to: ["slack:{SLACK_ALERTS}"]}}
"""


def discord_yaml(*, state: Path, emulator_url: str, listen: str = "127.0.0.1:0") -> str:
    return f"""
insitechat: {{base_url: "{emulator_url}", api_key: "${{IC_KEY}}"}}
state: {{sqlite: "{state}"}}
server: {{listen: "{listen}"}}
discord: {{token: "${{DISCORD_TOKEN}}", message_content_intent: true}}
chatbots:
  - {{id: {BOT}, name: Support Bot, webhook_secret: "${{HOOK_SECRET}}"}}
routes:
  - {{platform: discord, chatbot: {BOT}, reply: mention}}
alerts:
  - {{chatbot: {BOT}, events: [conversation.escalated], to: ["discord:{fd.ALERTS}"]}}
"""


SECRETS = {
    "IC_KEY": SANDBOX_KEY, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_APP_TOKEN": APP_TOKEN,
    "DISCORD_TOKEN": fd.TOKEN, "HOOK_SECRET": SECRET,
}


def escalation() -> tuple[bytes, dict[str, str]]:
    body = json.dumps({
        "event": "conversation.escalated", "chatbot_id": BOT, "timestamp": datetime.now(UTC).isoformat(),
        "data": {"session_id": "web-9", "conversation_id": "conv-9", "message": "a human please", "message_count": 2},
    }).encode()
    return body, {"Content-Type": "application/json", SIGNATURE_HEADER: sign_webhook(body, SECRET)}


async def part(http: httpx.AsyncClient, name: str) -> tuple[int, str]:
    answer = await http.get("/readyz")
    return answer.status_code, answer.json()["parts"][name]


@pytest.fixture(autouse=True)
def fast_discord(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.1)
    monkeypatch.setattr(DiscordAdapter, "start_timeout", 10.0)
    monkeypatch.setattr(BridgeApp, "backoff", QUICK)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator.sandbox(webhook_secret=SECRET)
    await emu.start()
    yield emu
    await emu.stop()


# --- down at start: webhooks taken at once, delivered when the platform is back -----------------


@pytest.mark.parametrize("outage", ["refuses connections", "answers 500"])
async def test_slack_down_at_start_takes_the_webhook_and_delivers_it_once_slack_is_back(
    emulator: Emulator, tmp_path: Path, outage: str
) -> None:
    port = free_port()
    slack = FakeSlack()
    if outage == "answers 500":
        await slack.start(port=port)
        slack.fail("auth.test", status=500, count=None)
    text = slack_yaml(f"http://127.0.0.1:{port}/api/", state=tmp_path / "state.db", emulator_url=emulator.base_url)
    clock = ShiftedClock()
    app = BridgeApp(config.loads(text, env=SECRETS), clock=clock, grace=1)
    await app.start()
    try:
        async with httpx.AsyncClient(base_url=app.server_url) as http:
            body, headers = escalation()
            accepted = await http.post(f"/webhooks/insitechat/{BOT}", content=body, headers=headers)
            assert accepted.status_code == 200  # stored, whatever Slack does
            expected = "cannot reach the Slack API" if outage == "refuses connections" else "auth.test: fatal_error"
            status, slack_part = await until(lambda: _failed_attempt(http, "slack", expected), what="a failed attempt")
            assert status == 503 and slack_part.startswith("connecting (attempt ")
            assert (await http.get("/healthz")).status_code == 200  # down is not dead: no restart wanted
            if outage == "answers 500":
                slack.heal()
            else:
                await slack.start(port=port)
            await asyncio.wait_for(app.connected(), 15)
            # The outbox tried while Slack was down and waits before its next try: let that time pass.
            [card] = await until(lambda: later(app, clock) and slack.messages.get(SLACK_ALERTS), what="the card")
            assert "asked for a human" in card["text"]
            assert await part(http, "slack") == (200, "ok")
    finally:
        await app.stop()
        await slack.stop()


async def _failed_attempt(http: httpx.AsyncClient, name: str, expected: str) -> tuple[int, str] | None:
    status, text = await part(http, name)
    return (status, text) if expected in text else None


async def test_discord_down_at_start_takes_the_webhook_and_delivers_it_once_discord_is_back(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    # Where discord.py will find Discord once it is back; nothing listens there yet.
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(f"ws://127.0.0.1:{port}/gateway"))
    clock = ShiftedClock()
    app = BridgeApp(
        config.loads(discord_yaml(state=tmp_path / "state.db", emulator_url=emulator.base_url), env=SECRETS),
        clock=clock,
        grace=1,
    )
    await app.start()
    fake = FakeDiscord()
    try:
        async with httpx.AsyncClient(base_url=app.server_url) as http:
            body, headers = escalation()
            assert (await http.post(f"/webhooks/insitechat/{BOT}", content=body, headers=headers)).status_code == 200
            status, discord_part = await until(
                lambda: _failed_attempt(http, "discord", "could not connect to Discord"), what="a failed attempt"
            )
            assert status == 503 and discord_part.startswith("connecting (attempt ")
            assert (await http.get("/healthz")).status_code == 200
            await fake.start(port=port)
            await asyncio.wait_for(app.connected(), 15)
            [card] = await until(
                lambda: later(app, clock) and [m for m in fake.bot_posts(fd.ALERTS) if m["embeds"]], what="the card"
            )
            assert "asked for a human" in card["embeds"][0]["title"]
            assert await part(http, "discord") == (200, "ok")
    finally:
        await app.stop()
        await fake.stop()


# --- after connecting: a dead client comes back; a refused token fails /healthz -------------------


@pytest.fixture
async def discord_fake() -> AsyncIterator[FakeDiscord]:
    async with fd.running_fake() as fake:
        yield fake


@pytest.fixture
async def discord_bridge(emulator: Emulator, discord_fake: FakeDiscord, tmp_path: Path) -> AsyncIterator[BridgeApp]:
    app = BridgeApp(
        config.loads(discord_yaml(state=tmp_path / "state.db", emulator_url=emulator.base_url), env=SECRETS), grace=1
    )
    await app.start()
    await asyncio.wait_for(app.connected(), 15)
    yield app
    await app.stop()


@pytest.mark.parametrize(
    "death",
    [
        "a frame discord.py cannot handle",  # a dispatch without the field its parser reads
        "a close discord.py does not resume",  # 4011, sharding required: client.start() raises ConnectionClosed
    ],
)
async def test_a_dead_discord_client_is_replaced_and_answers_the_next_message(
    discord_bridge: BridgeApp, discord_fake: FakeDiscord, death: str
) -> None:
    fake = discord_fake
    first = await fake.user_message(fd.GENERAL, "before", mention_bot=True)
    await until(lambda: fake.bot_posts(int(first["id"])), what="the first answer")
    if death.startswith("a frame"):
        await fake.send_raw(json.dumps({"op": 0, "t": "GUILD_ROLE_UPDATE", "s": 999, "d": {}}))
    else:
        await fake.close_gateway(4011)
    await until(lambda: len(fake.identifies) == 2, what="a new gateway session")
    await asyncio.wait_for(discord_bridge.connected(), 15)
    question = await fake.user_message(fd.GENERAL, "still there after that?", mention_bot=True)
    [answer] = await until(lambda: fake.bot_posts(int(question["id"])), what="the answer after the reconnect")
    assert "still there after that?" in answer["content"]
    async with httpx.AsyncClient(base_url=discord_bridge.server_url) as http:
        assert (await http.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (4004, "discord: Discord refused the bot token (discord.token)"),
        (4014, "discord: Discord refused the Message Content intent (gateway close code 4014)"),
    ],
)
async def test_a_discord_refusal_after_connecting_fails_healthz_with_the_reason(
    discord_bridge: BridgeApp, discord_fake: FakeDiscord, code: int, reason: str
) -> None:
    await discord_fake.close_gateway(code)
    async with httpx.AsyncClient(base_url=discord_bridge.server_url) as http:
        health = await until(lambda: _status(http, "/healthz", 503), what="/healthz to fail")
        assert health["status"] == "failing" and health["reason"].startswith(reason)
        status, discord_part = await part(http, "discord")
        assert status == 503 and discord_part.startswith("refused: ")
        # Still alive for the orchestrator to restart: webhooks are taken meanwhile.
        body, headers = escalation()
        assert (await http.post(f"/webhooks/insitechat/{BOT}", content=body, headers=headers)).status_code == 200
    assert len(discord_fake.identifies) == 1  # not tried again with a token that cannot work
    assert not discord_bridge.stopped.is_set() and discord_bridge.failure == ""


async def _status(http: httpx.AsyncClient, path: str, status: int) -> dict[str, Any] | None:
    answer = await http.get(path)
    return answer.json() if answer.status_code == status else None


@pytest.mark.parametrize("token", ["app token", "bot token"])
async def test_a_slack_token_revoked_mid_run_fails_healthz_with_the_reason(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setattr(SlackAdapter, "token_check_interval", 0.05 if token == "bot token" else 3600.0)
    text = slack_yaml(slack.api_url, state=tmp_path / "state.db", emulator_url=emulator.base_url)
    app = BridgeApp(config.loads(text, env=SECRETS), grace=1)
    await app.start()
    try:
        await asyncio.wait_for(app.connected(), 15)
        await slack.wait_for(lambda: slack.sockets)
        if token == "app token":
            slack.app_token = "xapp-rotated"
            await slack.close_sockets()  # Slack drops the socket; the SDK's reconnect is refused
            reason = "slack: Slack refused the app token (apps.connections.open: invalid_auth)"
        else:
            slack.bot_token = "xoxb-rotated"
            reason = "slack: Slack refused the bot token (auth.test: invalid_auth)"
        async with httpx.AsyncClient(base_url=app.server_url) as http:
            health = await until(lambda: _status(http, "/healthz", 503), what="/healthz to fail")
            assert health["reason"] == reason
            assert (await part(http, "slack"))[1] == "refused: " + reason.removeprefix("slack: ")
        assert not app.stopped.is_set()
    finally:
        await app.stop()


# --- `run` as a user starts it ------------------------------------------------------------------

# discord.py has no setting for its endpoints: the child points its two class attributes at the fake.
DISCORD_LAUNCHER = """
import sys, discord.gateway, discord.http, yarl
base = sys.argv.pop(1)
discord.http.Route.BASE = base + "/api/v10"
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http://", "ws://") + "/gateway")
from bridge.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def run_to_exit(args: list[str], env: dict[str, str], timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, err.decode()


async def test_run_exits_1_with_the_reason_when_slack_refuses_the_bot_token(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path
) -> None:
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(slack_yaml(slack.api_url, state=tmp_path / "state.db", emulator_url=emulator.base_url))
    env = {**ENV, **SECRETS, "SLACK_BOT_TOKEN": "xoxb-wrong-token"}
    code, err = await run_to_exit(["-m", "bridge", "run", "--config", str(cfg)], env)
    assert code == 1, err
    assert err.strip().splitlines()[-1] == "error: slack: Slack refused the bot token (auth.test: invalid_auth)"
    assert "Traceback" not in err and "xoxb-wrong-token" not in err
    assert len(slack.calls_to("auth.test")) == 1  # said once, not retried


async def test_run_exits_1_with_the_reason_when_discord_closes_the_gateway_with_4004(
    emulator: Emulator, discord_fake: FakeDiscord, tmp_path: Path
) -> None:
    discord_fake.identify_close_code = 4004  # the REST login passes; the gateway refuses the token
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(discord_yaml(state=tmp_path / "state.db", emulator_url=emulator.base_url))
    code, err = await run_to_exit(
        ["-c", DISCORD_LAUNCHER, discord_fake.base_url, "run", "--config", str(cfg)], {**ENV, **SECRETS}
    )
    assert code == 1, err
    assert err.strip().splitlines()[-1] == (
        "error: discord: Discord refused the bot token (discord.token): "
        "copy a fresh token from the Developer Portal, Bot tab"
    ), err  # all of it: a CI run once ended with a bare FileNotFoundError line here
    assert "Traceback" not in err and fd.TOKEN not in err
    assert len(discord_fake.identifies) == 1


async def test_run_keeps_serving_while_slack_is_unreachable_and_stops_cleanly(
    emulator: Emulator, tmp_path: Path
) -> None:
    listen, nowhere = free_port(), free_port()
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(slack_yaml(
        f"http://127.0.0.1:{nowhere}/api/", state=tmp_path / "state.db", emulator_url=emulator.base_url,
        listen=f"127.0.0.1:{listen}",
    ))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "--config", str(cfg), env={**ENV, **SECRETS},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen}") as http:

            async def answers() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    assert proc.returncode is None, "the bridge exited"
                    return False

            await until(answers, timeout=30, what="the bridge to serve /healthz")
            body, headers = escalation()
            assert (await http.post(f"/webhooks/insitechat/{BOT}", content=body, headers=headers)).status_code == 200
            status, _slack_part = await until(
                lambda: _failed_attempt(http, "slack", "cannot reach the Slack API"), what="readyz"
            )
            assert status == 503
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
