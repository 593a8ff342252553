"""InsiteChat's limits and outages as users live them: quota, the circuit, rate limits (issue 12, items 1-3)."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge import config
from bridge.app import BridgeApp
from bridge.clock import ManualClock
from bridge.desk import AlertDesk
from bridge.emulator import Account, Emulator, RecordedRequest
from bridge.insitechat import InsiteChatClient
from bridge.messages import Inbound
from bridge.outbox import Outbox
from bridge.relay import Outcome, Relay
from bridge.store import SQLiteStore
from tests.fakes.queue_adapter import QueueAdapter

TINY_BOT = "22222222-3333-4444-8555-666666666666"
TINY_KEY = "ic_tiny_plan_key_0123456789"


def chat_calls(emulator: Emulator) -> list[RecordedRequest]:
    return [r for r in emulator.requests if r.path.endswith("/chat")]


def dm(text: str, n: int) -> Inbound:
    return Inbound(
        platform="slack", workspace="T1", channel=f"D{n}", message_id=str(n), author_id="U1", text=text, is_dm=True
    )


def tiny_plan(emulator: Emulator, quota: int | None) -> Account:
    account = emulator.add_account("Tiny plan", monthly_quota=quota)
    emulator.add_key(account, TINY_KEY)
    emulator.add_chatbot(account, "Tiny", chatbot_id=TINY_BOT)
    return account


class Harness:
    """A relay on the emulator with a queue adapter named "slack", on an injected clock."""

    def __init__(self, emulator: Emulator, tmp_path: Path, clock: ManualClock, *, extra: str = "") -> None:
        self.settings = config.loads(
            f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{KEY}}"}}
state: {{sqlite: "{tmp_path / 'state.db'}"}}
slack: {{bot_token: "${{KEY}}", app_token: "${{KEY}}"}}
routes: [{{platform: slack, chatbot: {TINY_BOT}, reply: mention}}]
{extra}
""",
            env={"KEY": TINY_KEY},
        )
        from bridge.app import build_clients

        self.clock = clock
        self.store = SQLiteStore(tmp_path / "state.db", clock=clock)
        self.clients: dict[str, InsiteChatClient] = build_clients(self.settings, clock)
        self.outbox = Outbox(self.store, AlertDesk(self.settings, self.store, clock), clock, jitter=lambda: 0.0)
        self.relay = Relay(self.settings, self.store, self.clients, self.outbox, clock=clock, queue_notice_after=10)
        self.adapter = QueueAdapter("slack")
        self.relay.register(self.adapter)
        self.outbox.register(self.adapter)

    def last_text(self) -> str:
        return "".join(self.adapter.sent[-1].parts)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        await self.store.close()


@pytest.fixture
async def harness(emulator: Emulator, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(emulator, tmp_path, ManualClock())
    yield h
    await h.close()


# --- item 1: a quota 429 is asked again after a few minutes -------------------------------------


async def test_a_quota_pause_asks_again_after_a_few_minutes_and_says_when(
    emulator: Emulator, harness: Harness
) -> None:
    account = tiny_plan(emulator, quota=1)
    h = harness
    assert await h.relay.handle(dm("one", 1)) is Outcome.ANSWERED
    assert await h.relay.handle(dm("two", 2)) is Outcome.NOTICE
    assert "monthly message allowance" in h.last_text() and "in about 5 minutes" in h.last_text()
    h.clock.advance(60.0)
    assert await h.relay.handle(dm("three", 3)) is Outcome.NOTICE
    assert "in about 4 minutes" in h.last_text()
    assert len(chat_calls(emulator)) == 2  # refused here, without asking InsiteChat
    h.clock.advance(240.0)
    # The pause is over: one trial call. The plan is still spent, so another pause begins.
    assert await h.relay.handle(dm("four", 4)) is Outcome.NOTICE
    assert len(chat_calls(emulator)) == 3 and "in about 5 minutes" in h.last_text()
    account.monthly_quota = None  # the admin raises the plan
    h.clock.advance(300.0)
    assert await h.relay.handle(dm("five", 5)) is Outcome.ANSWERED
    assert len(chat_calls(emulator)) == 4
    assert await h.relay.handle(dm("six", 6)) is Outcome.ANSWERED  # closed again: no more trials


def console_bridge_config(emulator: Emulator, state: str) -> str:
    return (
        f"insitechat: {{base_url: '{emulator.base_url}', api_key: '${{INSITECHAT_API_KEY}}'}}\n"
        f"{state}\n"
        "server: {listen: '127.0.0.1:0'}\n"
        "console: {enabled: true}\n"
        f"routes: [{{platform: console, chatbot: {TINY_BOT}}}]\n"
    )


def console_message(text: str, n: int) -> Inbound:
    return Inbound(
        platform="console", workspace="", channel="console", message_id=str(n), author_id="you", text=text, is_dm=True
    )


async def run_check_live(cfg: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INSITECHAT_API_KEY": TINY_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "check", "--live", "--config", str(cfg), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def check_live_ends_the_pause(emulator: Emulator, tmp_path: Path, state: str) -> None:
    account = tiny_plan(emulator, quota=0)
    text = console_bridge_config(emulator, state)
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(text)
    settings = config.loads(text, env={"INSITECHAT_API_KEY": TINY_KEY, "REDIS_URL": os.environ.get("REDIS_URL", "")})
    app = BridgeApp(settings, console_in=io.StringIO(""), console_out=io.StringIO())
    await app.start()
    try:
        assert await app.relay.handle(console_message("one", 1)) is Outcome.NOTICE
        account.monthly_quota = None  # the admin raises the plan, then checks the setup
        assert await app.relay.handle(console_message("two", 2)) is Outcome.NOTICE
        assert len(chat_calls(emulator)) == 1  # still paused here
        code, out = await run_check_live(cfg)
        assert code == 0, out
        assert "quota" in out and "cleared" in out
        assert await app.relay.handle(console_message("three", 3)) is Outcome.ANSWERED
        assert len(chat_calls(emulator)) == 2
    finally:
        await app.stop()


async def test_check_live_ends_a_quota_pause_at_once(emulator: Emulator, tmp_path: Path) -> None:
    await check_live_ends_the_pause(emulator, tmp_path, f"state: {{sqlite: '{tmp_path / 'state.db'}'}}")


async def test_check_live_ends_the_quota_pause_of_every_replica_on_redis(
    emulator: Emulator, tmp_path: Path, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    state = f"state: {{redis_url: '${{REDIS_URL}}', redis_prefix: '{redis_prefix}'}}"
    await check_live_ends_the_pause(emulator, tmp_path, state)


# --- item 2: quota and an open circuit are degraded, not unready ----------------------------------


async def readyz_and_metrics(app: BridgeApp) -> tuple[int, dict[str, object], str]:
    import httpx

    async with httpx.AsyncClient(base_url=app.server_url) as http:
        ready = await http.get("/readyz")
        metrics_text = (await http.get("/metrics")).text
    return ready.status_code, ready.json(), metrics_text


def circuit_gauge(metrics_text: str, state: str) -> float:
    line = f'insitechat_bridge_insitechat_circuit{{key="default",state="{state}"}} '
    [value] = [row[len(line):] for row in metrics_text.splitlines() if row.startswith(line)]
    return float(value)


@pytest.fixture
async def console_app(emulator: Emulator, tmp_path: Path) -> AsyncIterator[BridgeApp]:
    text = console_bridge_config(emulator, f"state: {{sqlite: '{tmp_path / 'state.db'}'}}")
    app = BridgeApp(config.loads(text, env={"INSITECHAT_API_KEY": TINY_KEY}), console_in=io.StringIO(""))
    await app.start()
    yield app
    await app.stop()


async def test_readyz_stays_200_when_the_quota_is_spent_and_says_so_with_metrics(
    emulator: Emulator, console_app: BridgeApp
) -> None:
    tiny_plan(emulator, quota=0)
    status, body, metrics_text = await readyz_and_metrics(console_app)
    assert (status, body["ready"], body["degraded"]) == (200, True, [])
    assert circuit_gauge(metrics_text, "closed") == 1.0
    # Chat gets a notice, but webhooks (escalation alerts) must keep reaching this replica.
    assert await console_app.relay.handle(console_message("one", 1)) is Outcome.NOTICE
    status, body, metrics_text = await readyz_and_metrics(console_app)
    assert (status, body["ready"], body["degraded"]) == (200, True, ["insitechat:default"])
    parts = body["parts"]
    assert isinstance(parts, dict) and parts["insitechat:default"].startswith("ok (degraded: monthly")
    assert (circuit_gauge(metrics_text, "quota"), circuit_gauge(metrics_text, "closed")) == (1.0, 0.0)


async def test_readyz_stays_200_while_the_circuit_is_open_and_says_so_with_metrics(
    emulator: Emulator, console_app: BridgeApp
) -> None:
    tiny_plan(emulator, quota=None)
    emulator.inject(status=500, count=None, path_contains="/chat")
    for n in range(10):  # one request per answer: a chat call is not re-sent after a 500
        assert await console_app.relay.handle(console_message("hello?", n)) is Outcome.NOTICE
        if console_app.clients["default"].circuit_state() == "open":
            break
    status, body, metrics_text = await readyz_and_metrics(console_app)
    assert (status, body["ready"], body["degraded"]) == (200, True, ["insitechat:default"])
    parts = body["parts"]
    assert isinstance(parts, dict) and parts["insitechat:default"].startswith("ok (degraded: InsiteChat is failing")
    assert (circuit_gauge(metrics_text, "open"), circuit_gauge(metrics_text, "closed")) == (1.0, 0.0)


# --- item 3: after an outage or a rate limit ---------------------------------------------------


async def test_after_an_outage_a_question_waits_for_the_trial_and_is_answered(
    emulator: Emulator, tmp_path: Path
) -> None:
    tiny_plan(emulator, quota=None)
    h = Harness(emulator, tmp_path, ManualClock(autojump=True))
    try:
        emulator.inject(status=500, count=5, path_contains="/chat")  # five failures open the circuit
        for n in range(5):
            assert await h.relay.handle(dm("anyone?", n)) is Outcome.NOTICE
        assert h.clients["default"].circuit_state() == "open"
        h.clock.advance(1.0)  # InsiteChat is back, a second later
        started = h.clock.monotonic()
        assert await h.relay.handle(dm("and now?", 9)) is Outcome.ANSWERED  # not "isn't reachable"
        assert h.clock.monotonic() - started == pytest.approx(29.0)  # the trial left at the cooldown's end
    finally:
        await h.close()


async def test_waiting_messages_after_a_retry_after_are_released_through_the_limiter(tmp_path: Path) -> None:
    clock = ManualClock()
    emulator = Emulator(clock=clock, rate_limit=5, retry_after_header=True)
    tiny_plan(emulator, quota=None)
    await emulator.start()
    h = Harness(emulator, tmp_path, clock)
    other = InsiteChatClient(emulator.base_url, TINY_KEY, clock=clock)  # another bridge on the same key
    try:
        for _ in range(5):  # it spends the upstream limit, a second apart
            await other.list_chatbots()
            clock.advance(1.0)
        tasks = [asyncio.create_task(h.relay.handle(dm(f"question {n}", n))) for n in range(5)]
        for _ in range(400):  # the injected clock moves; nothing sleeps for real
            if all(t.done() for t in tasks):
                break
            clock.advance(0.5)
            await asyncio.sleep(0.01)
        assert [t.result() for t in tasks] == [Outcome.ANSWERED] * 5
        refused = [r for r in chat_calls(emulator) if r.status == 429]
        # The first five met the other bridge's minute; after the Retry-After none met it again.
        assert len(refused) == 5, [(r.time, r.status) for r in chat_calls(emulator)]
    finally:
        await other.aclose()
        await h.close()
        await emulator.stop()


async def test_a_rate_limit_wait_without_retry_after_posts_the_queued_notice(tmp_path: Path) -> None:
    clock = ManualClock()
    emulator = Emulator(clock=clock, rate_limit=1)  # no Retry-After: the bridge waits 60 s
    tiny_plan(emulator, quota=None)
    await emulator.start()
    h = Harness(emulator, tmp_path, clock)
    other = InsiteChatClient(emulator.base_url, TINY_KEY, clock=clock)
    try:
        await other.list_chatbots()  # the other bridge took this minute's only request
        task = asyncio.create_task(h.relay.handle(dm("a question", 1)))
        notice = await h.adapter.next_post()
        assert "in the queue" in "".join(notice.parts) and "60 seconds" in "".join(notice.parts)
        assert not task.done()
        while not task.done():
            clock.advance(5.0)
            await asyncio.sleep(0.01)
        assert task.result() is Outcome.ANSWERED
        assert [post.kind.value for post in h.adapter.sent] == ["notice", "answer"]
    finally:
        await other.aclose()
        await h.close()
        await emulator.stop()
