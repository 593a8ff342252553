"""Three bridge replicas on one Redis, as subprocesses, against the fakes: kills, failover, a rolling restart.

Each replica is `python -m bridge run` (or tests.fakes.bridge_main for Discord) with its own
web port and one shared Redis under a key prefix of the test's own. The test plays the load
balancer and the platforms: Slack HTTP events round-robin over the replicas (a Slack-style
retry of some to another replica), InsiteChat webhooks spread the same way, Socket Mode
envelopes round-robin over the three sockets, Discord events to every open gateway session.

Outcomes are read where people see them: the bot's posts per question thread and the alert
cards on the fakes, and the chat calls in the emulator's request log (never the bridge's log).

INSITECHAT_BRIDGE_LEASE_SCALE (read in bridge/app.py) shortens every lease so that a killed
replica's jobs, locks, outbox items and gateway are taken over in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed")

from bridge.emulator import SANDBOX_CHATBOT_ID, Emulator, sign_webhook  # noqa: E402
from bridge.relay import NOTICES  # noqa: E402
from bridge.webhooks import SIGNATURE_HEADER  # noqa: E402
from tests.fakes import discord_api as fd  # noqa: E402
from tests.fakes.discord_api import FakeDiscord  # noqa: E402
from tests.fakes.slack_api import FakeSlack  # noqa: E402
from tests.integration.test_durability_e2e import (  # noqa: E402
    CHANNEL,
    BridgeProcess,
    answers_to,
    free_port,
    signed,
    slack_question,
    slack_texts,
    until,
)

ALERTS = "C0ALERTS"
WEBHOOK_SECRET = "whsec-replicas"
RATE_LIMIT, RATE_WINDOW = 10, 2  # small: the shared limiter is exercised by a few dozen questions
REPLICAS = 3
WAITING = 20  # the rolling restart's questions unanswered at once: 4 s of the budget, in flight at each SIGTERM
# The courtesy notice of a question that waits long for the shared budget: no answer, and no second one.
QUEUED = re.compile(re.escape(NOTICES["queued"]).replace(r"\{position\}", r"\d+").replace(r"\{seconds\}", r"\d+"))


# --- the replicas ------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    bridge: BridgeProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.bridge.proc is not None and self.bridge.proc.returncode is None


def write_replica_config(
    directory: Path, emulator: Emulator, prefix: str, port: int, *, slack: FakeSlack | None, http: bool, discord: bool
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        f'insitechat: {{base_url: "{emulator.base_url}", api_key: "${{IC_KEY}}", timeout: 10, deadline: 60, '
        f"rate_limit: {RATE_LIMIT}, rate_window: {RATE_WINDOW}}}",
        "state:",
        '  redis_url: "${REDIS_URL}"',
        f'  redis_prefix: "{prefix}"',
        f'server: {{listen: "127.0.0.1:{port}"}}',
        "chat: {after_restart: ask-again}",
        "chatbots:",
        f'  - {{id: {SANDBOX_CHATBOT_ID}, webhook_secret: "${{WH_SECRET}}"}}',
        "routes:",
    ]
    if slack is not None:
        secret = 'signing_secret: "${SLACK_SIGNING_SECRET}"' if http else 'app_token: "${SLACK_APP_TOKEN}"'
        lines.insert(6, f'slack: {{bot_token: "${{SLACK_BOT_TOKEN}}", {secret}, api_url: "{slack.api_url}"}}')
        lines.append(f"  - {{platform: slack, channel: {CHANNEL}, chatbot: {SANDBOX_CHATBOT_ID}}}")
        lines += ["alerts:", f'  - {{chatbot: {SANDBOX_CHATBOT_ID}, events: [lead.captured], to: ["slack:{ALERTS}"]}}']
    if discord:
        lines.insert(6, 'discord: {token: "${DISCORD_TOKEN}"}')
        lines.append(f"  - {{platform: discord, chatbot: {SANDBOX_CHATBOT_ID}}}")
    path = directory / "bridge.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def replicas(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> AsyncIterator[Callable[..., list[Replica]]]:
    """make(emulator, slack=..., http=..., discord=..., scale=...) -> three replicas (not started)."""
    made: list[Replica] = []

    def make(
        emulator: Emulator,
        *,
        slack: FakeSlack | None = None,
        http: bool = False,
        discord: FakeDiscord | None = None,
        scale: float = 0.05,
    ) -> list[Replica]:
        for i in range(REPLICAS):
            port = free_port()
            config = write_replica_config(
                tmp_path / f"r{i}", emulator, redis_prefix, port, slack=slack, http=http, discord=discord is not None
            )
            bridge = BridgeProcess(config, module="tests.fakes.bridge_main" if discord else "bridge", grace=1.0)
            bridge.env |= {
                "REDIS_URL": redis_url,
                "WH_SECRET": WEBHOOK_SECRET,
                "INSITECHAT_BRIDGE_LEASE_SCALE": str(scale),
            }
            if discord is not None:
                bridge.env["FAKE_DISCORD_URL"] = discord.base_url
            made.append(Replica(f"r{i}", bridge, port))
        return made[-REPLICAS:]

    yield make
    for replica in made:
        await replica.bridge.cleanup()


def all_logs(replicas: Iterable[Replica]) -> str:
    return "\n".join(f"=== {r.name} ===\n{r.bridge.logs()}" for r in replicas)


async def readyz(http: httpx.AsyncClient, replica: Replica) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = await http.get(f"{replica.url}/readyz", timeout=2)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
    return None


async def wait_ready(http: httpx.AsyncClient, replicas: Iterable[Replica], timeout: float = 30.0) -> None:
    pending = list(replicas)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [r for r in pending if await readyz(http, r) is None]
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"not ready: {[r.name for r in pending]}\n{all_logs(pending)}")
        await asyncio.sleep(0.05)


async def start_all(http: httpx.AsyncClient, replicas: list[Replica]) -> None:
    for replica in replicas:
        await replica.bridge.start()
    await wait_ready(http, replicas)


def settled(redis_url: str, prefix: str) -> bool:
    """No open chat job and nothing undelivered in the shared store: nothing more will be posted."""
    client = redis.Redis.from_url(redis_url)
    try:
        open_jobs = sum(client.scard(f"{prefix}jobs:{state}") for state in ("accepted", "asked", "answered"))
        return open_jobs == 0 and client.zcard(f"{prefix}outbox:pending") == 0
    finally:
        client.close()


def store_report(redis_url: str, prefix: str) -> str:
    """What is still open in the shared store: each open job and pending outbox item with its lease and owner."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        now = time.time()
        lines = []
        for state in ("accepted", "asked", "answered"):
            for job_id in sorted(client.smembers(f"{prefix}jobs:{state}")):
                job = client.hgetall(f"{prefix}job:{job_id}")
                lease = client.zscore(f"{prefix}jobs:leases", job_id)
                lock = client.hgetall(f"{prefix}lock:{job.get('conversation', '')}")
                lines.append(
                    f"job {job_id} {state} key={job.get('key')} owner={job.get('owner', '')[:8]} "
                    f"asks={job.get('asks')} "
                    f"lease_in={float(lease) - now if lease is not None else None} outbox={job.get('outbox_id')} "
                    f"lock={ {k: (v if k != 'until' else round(float(v) - now, 2)) for k, v in lock.items()} }"
                )
        for item_id in client.zrange(f"{prefix}outbox:pending", 0, -1):
            item = client.hgetall(f"{prefix}item:{item_id}")
            due = client.zscore(f"{prefix}outbox:due", item_id)
            lines.append(
                f"item {item_id} job={item.get('job')} dest={item.get('destination')} attempts={item.get('attempts')} "
                f"started={item.get('started')} lease_in={float(item.get('lease_until', 0)) - now:.2f} "
                f"due_in={float(due) - now if due is not None else None} error={item.get('last_error')}"
            )
        return "\n".join(lines) or "nothing open"
    finally:
        client.close()


def question_report(slack: FakeSlack, events: Iterable[SlackEvent]) -> str:
    """Each accepted question not answered exactly once, with what its thread holds."""
    lines = [
        f"{e.question} (ts {e.ts}): {slack_texts(slack, e.ts)!r}" for e in events if not answered_once(slack, e)
    ]
    return "\n".join(lines) or "every question answered once"


# --- what the emulator saw -------------------------------------------------------------------------


def chat_times(emulator: Emulator) -> list[float]:
    return sorted(r.time for r in emulator.requests if r.method == "POST" and r.path.endswith("/chat"))


def assert_within_budget(emulator: Emulator) -> None:
    """Never more than RATE_LIMIT chat calls arrived in any rolling RATE_WINDOW (a few ms of transit allowed)."""
    times = chat_times(emulator)
    for i in range(len(times) - RATE_LIMIT):
        gap = times[i + RATE_LIMIT] - times[i]
        assert gap >= RATE_WINDOW - 0.05, (
            f"calls {i}..{i + RATE_LIMIT} ({RATE_LIMIT + 1} calls) arrived within {gap:.3f} s < {RATE_WINDOW} s"
        )


# --- Slack over HTTP ---------------------------------------------------------------------------------


@dataclass
class SlackEvent:
    question: str
    body: dict[str, Any]
    raw: bytes
    accepted: bool = False  # some delivery of it got a 200

    @property
    def ts(self) -> str:
        return str(self.body["event"]["ts"])


def new_question(slack: FakeSlack, n: int) -> SlackEvent:
    question = f"replica question {n}"
    body = slack_question(slack, question)
    return SlackEvent(question, body, json.dumps(body).encode())


async def post_event(http: httpx.AsyncClient, replica: Replica, event: SlackEvent, retry: int = 0) -> bool:
    """One delivery to one replica; True when it answered 200 (Slack then never sends it again)."""
    try:
        response = await http.post(
            f"{replica.url}/slack/events", content=event.raw, headers=signed(event.raw, retry=retry), timeout=3
        )
    except httpx.HTTPError:
        return False
    if response.status_code == 200:
        event.accepted = True
        return True
    return False


async def deliver_like_slack(http: httpx.AsyncClient, order: list[Replica], event: SlackEvent) -> None:
    """First delivery to order[0]; without a 200, up to 3 retries (X-Slack-Retry-Num) to the next replicas."""
    for attempt in range(4):
        replica = order[attempt % len(order)]
        if await post_event(http, replica, event, retry=attempt):
            return
        await asyncio.sleep(0.05)


@dataclass
class Webhook:
    email: str
    raw: bytes
    accepted: bool = False


def new_webhook(n: int) -> Webhook:
    email = f"lead{n}-{uuid.uuid4().hex[:6]}@example.com"
    body = {
        "event": "lead.captured", "chatbot_id": SANDBOX_CHATBOT_ID, "timestamp": datetime.now(UTC).isoformat(),
        "data": {"session_id": f"visitor-{n}", "conversation_id": f"conv-{n}", "lead_id": f"L-{n}",
                 "name": f"Lead {n}", "email": email},
    }
    return Webhook(email, json.dumps(body).encode())


async def post_webhook(http: httpx.AsyncClient, replica: Replica, hook: Webhook) -> None:
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign_webhook(hook.raw, WEBHOOK_SECRET)}
    with contextlib.suppress(httpx.HTTPError):
        response = await http.post(
            f"{replica.url}/webhooks/insitechat/{SANDBOX_CHATBOT_ID}", content=hook.raw, headers=headers, timeout=3
        )
        if 200 <= response.status_code < 300:
            hook.accepted = True


def cards_for(slack: FakeSlack, hook: Webhook) -> int:
    """Top-level alert cards naming the lead in the alert channel."""
    return sum(
        1
        for m in slack.messages.get(ALERTS, [])
        if m.get("bot_id") and not m.get("thread_ts") and hook.email in json.dumps(m)
    )


def replies(slack: FakeSlack, event: SlackEvent) -> list[str]:
    """The bot's posts in the question's thread but its queue notices (a question may wait long for the budget)."""
    return [text for text in slack_texts(slack, event.ts) if not QUEUED.fullmatch(text)]


def answered_once(slack: FakeSlack, event: SlackEvent) -> bool:
    texts = replies(slack, event)
    return len(texts) == 1 and answers_to(texts, event.question) == 1


def answered(slack: FakeSlack, event: SlackEvent) -> bool:
    return answers_to(slack_texts(slack, event.ts), event.question) > 0


@pytest.fixture
def slack(slack: FakeSlack) -> FakeSlack:
    slack.channels[CHANNEL] = {"name": "general", "is_member": True}
    slack.channels[ALERTS] = {"name": "alerts", "is_member": True}
    return slack


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The sandbox emulator, slow enough (0.2 s an answer) that answers are in flight at a kill.

    Its own rate limit is out of the way: the assertion is on its request log.
    """
    emu = Emulator.sandbox(rate_limit=10_000, rate_window=60, latency=0.2)
    await emu.start()
    yield emu
    await emu.stop()


async def test_slack_http_three_replicas_with_retries_elsewhere_and_a_kill_answer_each_question_once(
    emulator: Emulator, slack: FakeSlack, replicas: Callable[..., list[Replica]], redis_url: str, redis_prefix: str
) -> None:
    group = replicas(emulator, slack=slack, http=True)
    questions = [new_question(slack, n) for n in range(30)]
    hooks = [new_webhook(n) for n in range(9)]
    async with httpx.AsyncClient() as http:
        await start_all(http, group)
        sends: list[asyncio.Task[None]] = []
        for n, event in enumerate(questions):
            if n == 15:
                await group[1].bridge.kill()  # mid-run: its accepted jobs and held items are the others' now
            order = group[n % REPLICAS:] + group[: n % REPLICAS]  # the balancer's turn, then the others
            sends.append(asyncio.create_task(deliver_like_slack(http, order, event)))
            if n % 4 == 1:
                # A late-ack retry from Slack to another replica while the first may still be handled.
                sends.append(asyncio.create_task(post_event(http, order[1], event, retry=1)))  # type: ignore[arg-type]
            if n % 3 == 0:
                hook = hooks[n // 3 % len(hooks)]
                sends.append(asyncio.create_task(post_webhook(http, group[n % REPLICAS], hook)))
                if n % 6 == 0:  # InsiteChat delivering it again, to another replica
                    sends.append(asyncio.create_task(post_webhook(http, group[(n + 2) % REPLICAS], hook)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*sends)

        accepted = [e for e in questions if e.accepted]
        stored_hooks = [h for h in hooks if h.accepted]
        assert len(accepted) >= 25, f"only {len(accepted)} of 30 questions got a 200"
        assert len(stored_hooks) >= 7
        await until(
            lambda: all(answered_once(slack, e) for e in accepted)
            and all(cards_for(slack, h) == 1 for h in stored_hooks)
            and settled(redis_url, redis_prefix),
            "every accepted question answered and every webhook posted",
            timeout=90,  # a bound for a stuck run, not a timing goal: the shared budget paces the answers
            logs=lambda: all_logs(group),
        )
        for replica in group:
            if replica.alive:
                await replica.bridge.terminate()

    for event in questions:  # a question no replica accepted may still have been stored: never twice
        texts = replies(slack, event)
        assert len(texts) <= 1 and answers_to(texts, event.question) <= 1, (event.question, texts)
        if event.accepted:
            assert answers_to(texts, event.question) == 1, (event.question, texts)
    for hook in hooks:
        assert cards_for(slack, hook) == 1 if hook.accepted else cards_for(slack, hook) <= 1, hook.email
    assert_within_budget(emulator)


# --- Slack Socket Mode ---------------------------------------------------------------------------


async def deliver_envelope(slack: FakeSlack, event: SlackEvent, *, ack_timeout: float = 1.0) -> None:
    """Slack's delivery: one connection; without an ack in time, up to 3 retries to another connection."""
    envelope = await slack.send_envelope(event.body)
    for _ in range(3):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(envelope.acked.wait(), ack_timeout)
        if envelope.acked.is_set():
            event.accepted = True
            return
        envelope = await slack.retry_envelope(envelope)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(envelope.acked.wait(), ack_timeout)
    event.accepted = envelope.acked.is_set()


async def test_slack_socket_mode_three_connections_and_a_kill_answer_each_acked_question_once(
    emulator: Emulator, slack: FakeSlack, replicas: Callable[..., list[Replica]], redis_url: str, redis_prefix: str
) -> None:
    slack.round_robin = True
    group = replicas(emulator, slack=slack)
    questions = [new_question(slack, n) for n in range(30)]
    async with httpx.AsyncClient() as http:
        await start_all(http, group)
        await until(lambda: len(slack.sockets) == REPLICAS, "one socket per replica", 20, lambda: all_logs(group))
        sends = []
        for n, event in enumerate(questions):
            if n == 15:
                # Frozen first, so that Slack still sends to its open socket and gets no ack...
                assert group[0].bridge.proc is not None
                group[0].bridge.proc.send_signal(signal.SIGSTOP)
            if n == 18:
                await group[0].bridge.kill()  # ...then gone: those envelopes are retried elsewhere
            sends.append(asyncio.create_task(deliver_envelope(slack, event)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*sends)
        spread = {e.socket for e in slack.envelopes.values()}
        assert len(spread) >= REPLICAS, f"envelopes went to connections {spread} only"
        assert any(e.retry_attempt for e in slack.envelopes.values()), "no envelope was retried after the kill"

        accepted = [e for e in questions if e.accepted]
        assert len(accepted) >= 25, f"only {len(accepted)} of 30 acked"
        await until(
            lambda: all(answered_once(slack, e) for e in accepted) and settled(redis_url, redis_prefix),
            "every acked question answered",
            timeout=90,  # a bound for a stuck run, not a timing goal: the shared budget paces the answers
            logs=lambda: all_logs(group),
        )
        for replica in group:
            if replica.alive:
                await replica.bridge.terminate()

    for event in questions:
        texts = replies(slack, event)
        assert len(texts) <= 1 and answers_to(texts, event.question) <= 1, (event.question, texts)
        if event.accepted:
            assert answers_to(texts, event.question) == 1, (event.question, texts)
    assert_within_budget(emulator)


# --- Discord: one gateway leader, a failover ---------------------------------------------------


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.stop()


async def gateway_holders(http: httpx.AsyncClient, group: Iterable[Replica]) -> list[Replica]:
    """Replicas whose /readyz says the gateway is held (and live) there."""
    holders = []
    for replica in group:
        if not replica.alive:
            continue
        body = await readyz(http, replica)
        if body is not None and str(body["parts"].get("discord", "")).startswith("ok (gateway held here"):
            holders.append(replica)
    return holders


async def wait_for_gateway(http: httpx.AsyncClient, fake: FakeDiscord, group: list[Replica], timeout: float) -> Replica:
    deadline = time.monotonic() + timeout
    while True:
        holders = await gateway_holders(http, group)
        if len(holders) == 1 and fake.open_sessions() == 1:
            return holders[0]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no single gateway holder: {[r.name for r in holders]}, {fake.open_sessions()} sessions\n"
                f"{all_logs(group)}"
            )
        await asyncio.sleep(0.05)


def asked(emulator: Emulator, question: str) -> bool:
    return any(
        r.method == "POST" and r.path.endswith("/chat") and question in json.dumps(r.json) for r in emulator.requests
    )


def discord_answered_once(fake: FakeDiscord, question_id: str, question: str) -> bool:
    texts = [str(m.get("content") or "") for m in fake.bot_posts(int(question_id))]
    return len(texts) == 1 and answers_to(texts, question) == 1


async def test_discord_three_replicas_one_gateway_a_killed_leader_is_replaced_and_each_heard_question_answered_once(
    emulator: Emulator, discord: FakeDiscord, replicas: Callable[..., list[Replica]], redis_url: str, redis_prefix: str
) -> None:
    group = replicas(emulator, discord=discord, scale=0.1)  # a 1 s gateway lease, 6 s job leases
    counted: dict[str, str] = {}  # message id -> question: each must be answered exactly once
    gap: dict[str, str] = {}  # sent while no session was live: lost by Discord's rules, never doubled
    async with httpx.AsyncClient() as http:
        await start_all(http, group)
        leader = await wait_for_gateway(http, discord, group, timeout=20)

        for n in range(8):
            question = f"discord question {n}"
            message = await discord.user_message(fd.GENERAL, question, mention_bot=True)
            counted[str(message["id"])] = question
            await asyncio.sleep(0.05)
        # Every one was received (stored and asked) before the kill; some answers are still on their way.
        await until(
            lambda: all(asked(emulator, q) for q in counted.values()),
            "the questions asked",
            15,
            lambda: all_logs(group),
        )
        heard = {mid for session, event, mid in discord.dispatched if event == "MESSAGE_CREATE"}
        assert set(counted) <= heard
        await leader.bridge.kill()
        killed_at = time.monotonic()

        for n in range(3):  # into the gap: no session may be open to hear them
            question = f"discord gap question {n}"
            message = await discord.user_message(fd.GENERAL, question, mention_bot=True)
            gap[str(message["id"])] = question
            await asyncio.sleep(0.05)

        successor = await wait_for_gateway(http, discord, group, timeout=15)
        took = time.monotonic() - killed_at
        assert successor is not leader
        for n in range(8):
            question = f"discord later question {n}"
            message = await discord.user_message(fd.GENERAL, question, mention_bot=True)
            counted[str(message["id"])] = question
            await asyncio.sleep(0.05)

        await until(
            lambda: (
                all(discord_answered_once(discord, mid, q) for mid, q in counted.items())
                and settled(redis_url, redis_prefix)
            ),
            "every heard question answered",
            timeout=90,  # a bound for a stuck run, not a timing goal: the shared budget paces the answers
            logs=lambda: all_logs(group),
        )
        for replica in group:
            if replica.alive:
                await replica.bridge.terminate()

    assert took < 5, f"the gateway took {took:.1f} s to come back with a 1 s lease"
    for mid, question in {**counted, **gap}.items():
        texts = [str(m.get("content") or "") for m in discord.bot_posts(int(mid))]
        assert len(texts) <= 1, (question, texts)
        if mid in counted:
            assert answers_to(texts, question) == 1, (question, texts)
    assert_within_budget(emulator)


# --- a rolling restart ---------------------------------------------------------------------------


async def test_slack_http_rolling_restart_of_three_replicas_loses_nothing_and_doubles_nothing(
    emulator: Emulator, slack: FakeSlack, replicas: Callable[..., list[Replica]], redis_url: str, redis_prefix: str
) -> None:
    group = replicas(emulator, slack=slack, http=True)
    questions: list[SlackEvent] = []
    async with httpx.AsyncClient() as http:
        await start_all(http, group)
        done = asyncio.Event()

        async def keep_asking() -> None:
            sends = []
            n = 0
            while not done.is_set():
                # People wait for their answers: the asker waits while WAITING questions are unanswered.
                # Else a loaded machine's slower restarts would pile up questions beyond the shared
                # budget (5 a second), and the wait for the last answers would grow with them.
                if sum(not answered(slack, e) for e in questions) >= WAITING:
                    await asyncio.sleep(0.1)
                    continue
                event = new_question(slack, n)
                questions.append(event)
                order = group[n % REPLICAS:] + group[: n % REPLICAS]
                sends.append(asyncio.create_task(deliver_like_slack(http, order, event)))
                n += 1
                await asyncio.sleep(0.1)
            await asyncio.gather(*sends)

        asking = asyncio.create_task(keep_asking())
        for replica in group:  # one at a time, as a deploy does: SIGTERM, clean exit, start, ready
            await asyncio.sleep(0.3)
            await replica.bridge.terminate()
            await replica.bridge.start()
            await wait_ready(http, [replica])
        await asyncio.sleep(0.3)
        done.set()
        await asking

        accepted = [e for e in questions if e.accepted]
        assert len(accepted) == len(questions), f"{len(questions) - len(accepted)} questions never got a 200"
        await until(
            lambda: all(answered_once(slack, e) for e in accepted) and settled(redis_url, redis_prefix),
            "every accepted question answered",
            timeout=90,  # a bound for a stuck run, not a timing goal: the shared budget paces the answers
            logs=lambda: (
                f"--- not answered once ---\n{question_report(slack, accepted)}\n"
                f"--- open in the store ---\n{store_report(redis_url, redis_prefix)}\n{all_logs(group)}"
            ),
        )
        for replica in group:
            await replica.bridge.terminate()

    assert len(questions) >= 20
    for event in questions:
        texts = replies(slack, event)
        assert len(texts) == 1 and answers_to(texts, event.question) == 1, (event.question, texts)
    assert_within_budget(emulator)
