"""Crashes and shutdowns of a real bridge process: kill -9 at each step of a chat job, SIGTERM mid-answer.

The bridge runs as a subprocess (`python -m bridge run --config ...`) against the fakes in
this process (Slack, Discord, the InsiteChat emulator), with one state file that survives
the restarts. Each test kills the process at one point of a job's life (stored, asked,
answered, posted-but-unrecorded), starts it again and checks the outcome where a person
would see it: how many replies the platform shows per question, and how many chat calls
InsiteChat received.

Kill points are reached by observing the fakes (the Socket Mode ack, the chat request at
the emulator, the post at the platform) and, where no platform signal exists (a Discord
message has no ack), the job's row in the state file. "The restarted bridge is done" is
also read from the state file (no open job, no undelivered reply); it is followed by a
SIGTERM, so the counts are final.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, IO

import httpx
import pytest

from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, SANDBOX_WEBHOOK_SECRET, Emulator, sign_webhook
from bridge.relay import NOTICES
from bridge.webhooks import SIGNATURE_HEADER
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, FakeSlack, payload, sign

REPO = Path(__file__).resolve().parents[2]
CHANNEL = "C0GENERAL"
REACTION = "eyes"  # the default working reaction
RESTARTED = NOTICES["restarted"].split(",")[0]  # "I restarted while I was answering this"
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONFAULTHANDLER": "1",  # a bridge that hangs at SIGTERM gets SIGABRT: its stacks land in its log
    "IC_KEY": SANDBOX_KEY,
    "SLACK_BOT_TOKEN": BOT_TOKEN,
    "SLACK_APP_TOKEN": APP_TOKEN,
    "SLACK_SIGNING_SECRET": SIGNING_SECRET,
    "DISCORD_TOKEN": fd.TOKEN,
    "HOOK_SECRET": SANDBOX_WEBHOOK_SECRET,
}


# --- waiting ---------------------------------------------------------------------------------


async def until(
    condition: Callable[[], Any], what: str, timeout: float = 15.0, logs: Callable[[], str] | None = None
) -> Any:
    """Poll condition() until it is truthy; fail saying `what` (and the bridge's log) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except sqlite3.Error:  # the state file does not exist yet, or is mid-write
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n--- bridge log ---\n{logs()}" if logs else ""))
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the state file, read-only ---------------------------------------------------------------


def _read(state: Path, query: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=0.5)) as db:
        return db.execute(query).fetchall()


def job_states(state: Path) -> dict[str, int]:
    """How many chat jobs the state file holds in each state."""
    return {str(s): int(n) for s, n in _read(state, "SELECT state, COUNT(*) FROM jobs GROUP BY state")}


def all_done(state: Path, jobs: int) -> bool:
    """`jobs` jobs exist, none is open, and no reply waits in the outbox: nothing more will be posted."""
    states = job_states(state)
    undelivered = _read(state, "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL")[0][0]
    return sum(states.values()) == jobs and set(states) <= {"delivered", "failed"} and undelivered == 0


# --- the bridge process ----------------------------------------------------------------------


@dataclass
class BridgeProcess:
    """Runs of one bridge config (one state file); each run's log goes to its own file."""

    config: Path
    module: str = "bridge"
    grace: float = 1.0
    env: dict[str, str] = field(default_factory=lambda: dict(ENV))
    proc: asyncio.subprocess.Process | None = None
    runs: int = 0
    _log: IO[bytes] | None = None

    @property
    def state(self) -> Path:
        return self.config.parent / "state.db"

    async def start(self) -> None:
        assert self.proc is None or self.proc.returncode is not None, "a run is still going"
        self.runs += 1
        self._log = open(self.config.parent / f"bridge-run{self.runs}.log", "wb")  # noqa: SIM115 (closed in _ended)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, "run", "--config", str(self.config), "--grace", str(self.grace),
            env=self.env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the bridge."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        self._ended()

    async def terminate(self, timeout: float = 15.0) -> float:
        """SIGTERM and wait for the exit; returns the seconds it took; the exit status must be 0."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            self._ended()
            raise AssertionError(f"the bridge did not exit within {timeout} s of SIGTERM\n{self.logs()}") from None
        took = time.monotonic() - started
        self._ended()
        assert self.proc.returncode == 0, f"exit status {self.proc.returncode}\n{self.logs()}"
        return took

    def _ended(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def logs(self) -> str:
        parts = []
        for run in range(1, self.runs + 1):
            path = self.config.parent / f"bridge-run{run}.log"
            if path.exists():
                parts.append(f"[run {run}]\n" + path.read_text(errors="replace")[-6000:])
        return "\n".join(parts)

    async def wait_done(self, jobs: int, timeout: float = 15.0) -> None:
        await until(lambda: all_done(self.state, jobs), f"{jobs} job(s) delivered", timeout, self.logs)

    async def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._ended()


@pytest.fixture
async def processes() -> AsyncIterator[list[BridgeProcess]]:
    """Bridge processes a test started; any still running at the end is killed."""
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        await bridge.cleanup()


def write_config(
    tmp_path: Path,
    emulator: Emulator,
    *,
    slack: FakeSlack | None = None,
    slack_http: bool = False,
    discord: bool = False,
    after_restart: str = "ask-again",
    listen: str = "127.0.0.1:0",
    rate_limit: int | None = None,
    alerts_to: str = "",
    working_signal: str = "status",
) -> Path:
    limits = f", rate_limit: {rate_limit}, rate_window: 30" if rate_limit else ""
    lines = [
        f'insitechat: {{base_url: "{emulator.base_url}", api_key: "${{IC_KEY}}", timeout: 20, deadline: 30{limits}}}',
        f'state: {{sqlite: "{tmp_path / "state.db"}"}}',
        f'server: {{listen: "{listen}"}}',
        f"chat: {{after_restart: {after_restart}}}",
        "routes:",
    ]
    if slack is not None:
        secret = 'signing_secret: "${SLACK_SIGNING_SECRET}"' if slack_http else 'app_token: "${SLACK_APP_TOKEN}"'
        lines.insert(
            3,
            f'slack: {{bot_token: "${{SLACK_BOT_TOKEN}}", {secret}, api_url: "{slack.api_url}", '
            f"working_signal: {working_signal}}}",
        )
        lines.append(f"  - {{platform: slack, channel: {CHANNEL}, chatbot: {SANDBOX_CHATBOT_ID}}}")
    if discord:
        lines.insert(3, 'discord: {token: "${DISCORD_TOKEN}"}')
        lines.append(f"  - {{platform: discord, chatbot: {SANDBOX_CHATBOT_ID}}}")
    if alerts_to:
        lines.append(f'chatbots: [{{id: {SANDBOX_CHATBOT_ID}, name: Sandbox Bot, webhook_secret: "${{HOOK_SECRET}}"}}]')
        rule = f'chatbot: {SANDBOX_CHATBOT_ID}, events: [conversation.escalated], to: ["{alerts_to}"]'
        lines.append(f"alerts: [{{{rule}}}]")
    path = tmp_path / "bridge.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_calls(emulator: Emulator) -> int:
    """Chat requests that reached the emulator (hung ones included)."""
    return sum(1 for r in emulator.requests if r.method == "POST" and r.path.endswith("/chat"))


def answers_to(texts: list[str], question: str) -> int:
    """How many of the texts are the emulator's answer to `question`."""
    return sum(1 for text in texts if f'you asked "{question}"' in text)


def restarted_notices(texts: list[str]) -> int:
    return sum(1 for text in texts if RESTARTED in text)


# --- Slack -----------------------------------------------------------------------------------


@pytest.fixture
def slack(slack: FakeSlack) -> FakeSlack:
    slack.channels[CHANNEL] = {"name": "general", "is_member": True}
    return slack


_ts_counter = iter(range(1, 10**6))


def slack_question(slack: FakeSlack, text: str, *, thread_ts: str = "") -> dict[str, Any]:
    """A person mentions the bot (in a thread with `thread_ts`).

    The message is stored on the fake, as Slack keeps it.
    """
    ts = f"{int(time.time()) - 5}.{next(_ts_counter):06d}"  # before the bot's replies, never equal to one
    event: dict[str, Any] = {"ts": ts, "event_ts": ts, "text": f"<@UBOT> {text}", "client_msg_id": str(uuid.uuid4())}
    if thread_ts:
        event["thread_ts"] = thread_ts
    body = payload("app_mention", **event)
    body["event_id"] = "Ev" + uuid.uuid4().hex[:10].upper()
    body["event_time"] = int(time.time())
    stored = {"type": "message", "user": "U0ALICE", "text": event["text"], "ts": ts}
    if thread_ts:
        stored["thread_ts"] = thread_ts
    slack.messages.setdefault(CHANNEL, []).append(stored)
    return body


async def ask_over_socket(slack: FakeSlack, text: str, *, thread_ts: str = "") -> str:
    """Mention the bot over Socket Mode and wait for the ack (sent only once the job is stored); returns the ts."""
    body = slack_question(slack, text, thread_ts=thread_ts)
    envelope = await slack.send_envelope(body)
    await asyncio.wait_for(envelope.acked.wait(), 10)
    return str(body["event"]["ts"])


def slack_texts(slack: FakeSlack, thread_ts: str) -> list[str]:
    """What the bot posted in the question's thread, as Slack shows it (a post whose answer was lost counts)."""
    return [
        str(m.get("text") or "")
        for m in slack.messages.get(CHANNEL, [])
        if m.get("thread_ts") == thread_ts and m.get("bot_id")
    ]


async def start_slack(bridge: BridgeProcess, slack: FakeSlack) -> None:
    await bridge.start()
    await slack.wait_for(lambda: slack.sockets, timeout=20)


async def test_slack_kill_after_the_ack_before_the_call_answers_each_accepted_question_once(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    # The first answer hangs at InsiteChat; the follow-up in the same thread waits behind it
    # (answers are serialised per conversation): acknowledged and stored, never asked.
    emulator.inject("hang", path_contains="/chat")
    bridge = BridgeProcess(write_config(tmp_path, emulator, slack=slack))
    processes.append(bridge)
    await start_slack(bridge, slack)
    first = await ask_over_socket(slack, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the first chat call", logs=bridge.logs)
    await ask_over_socket(slack, "and for digital goods", thread_ts=first)
    assert job_states(bridge.state) == {"asked": 1, "accepted": 1}
    await bridge.kill()

    emulator.clear_faults()
    await bridge.start()
    await bridge.wait_done(jobs=2)
    await bridge.terminate()
    texts = slack_texts(slack, first)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert answers_to(texts, "and for digital goods") == 1, texts
    assert restarted_notices(texts) == 0
    assert chat_calls(emulator) == 3  # the hung one, the first again, the follow-up once


async def test_slack_question_still_queued_in_the_rate_limiter_is_answered_after_a_kill_even_in_notice_mode(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    # One chat call per 30 s: the first question's hung call holds the slot, so a second
    # question (another thread) waits in the limiter. It never reached InsiteChat, so after a
    # restart it must be asked, not told "I lost the answer" (that is only true of the first).
    emulator.inject("hang", path_contains="/chat")
    port = free_port()
    config = write_config(
        tmp_path, emulator, slack=slack, after_restart="notice", listen=f"127.0.0.1:{port}", rate_limit=1
    )
    bridge = BridgeProcess(config)
    processes.append(bridge)
    await start_slack(bridge, slack)
    first = await ask_over_socket(slack, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the first chat call", logs=bridge.logs)
    second = await ask_over_socket(slack, "how long does shipping take")

    async with httpx.AsyncClient() as http:
        async def queued() -> bool:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            return 'insitechat_bridge_limiter_queue_depth{key="default"} 1.0' in text

        deadline = time.monotonic() + 10
        while not await queued():
            assert time.monotonic() < deadline, "the second question never waited in the limiter\n" + bridge.logs()
            await asyncio.sleep(0.02)
    await bridge.kill()

    emulator.clear_faults()
    await bridge.start()
    await bridge.wait_done(jobs=2)
    await bridge.terminate()
    assert restarted_notices(slack_texts(slack, first)) == 1
    assert answers_to(slack_texts(slack, first), "what is the refund policy") == 0
    texts = slack_texts(slack, second)
    assert answers_to(texts, "how long does shipping take") == 1, texts
    assert restarted_notices(texts) == 0, texts
    assert chat_calls(emulator) == 2  # the first (hung) once, the second once


async def test_slack_kill_while_the_call_is_out_asks_again_and_answers_once(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", path_contains="/chat")
    bridge = BridgeProcess(write_config(tmp_path, emulator, slack=slack))
    processes.append(bridge)
    await start_slack(bridge, slack)
    question = await ask_over_socket(slack, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the chat call to arrive", logs=bridge.logs)
    await bridge.kill()

    emulator.clear_faults()
    await bridge.start()
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = slack_texts(slack, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert restarted_notices(texts) == 0
    assert chat_calls(emulator) == 2  # asked again: the lost call, and the one answered


async def test_slack_kill_while_the_call_is_out_in_notice_mode_posts_one_restarted_notice_and_asks_no_more(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", path_contains="/chat")
    bridge = BridgeProcess(write_config(tmp_path, emulator, slack=slack, after_restart="notice"))
    processes.append(bridge)
    await start_slack(bridge, slack)
    question = await ask_over_socket(slack, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the chat call to arrive", logs=bridge.logs)
    await bridge.kill()

    emulator.clear_faults()
    await bridge.start()
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = slack_texts(slack, question)
    assert restarted_notices(texts) == 1, texts
    assert answers_to(texts, "what is the refund policy") == 0
    assert len(texts) == 1
    assert chat_calls(emulator) == 1


async def test_slack_kill_after_the_answer_was_stored_posts_it_once_without_asking_again(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    slack.fail("chat.postMessage", status=500, count=None)  # Slack is down for posts
    bridge = BridgeProcess(write_config(tmp_path, emulator, slack=slack))
    processes.append(bridge)
    await start_slack(bridge, slack)
    question = await ask_over_socket(slack, "what is the refund policy")
    # A refused post means the answer was stored with its delivery first (one transaction).
    await slack.wait_for(lambda: slack.calls_to("chat.postMessage"), timeout=10)
    await bridge.kill()

    slack.heal("chat.postMessage")
    await bridge.start()
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = slack_texts(slack, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1
    assert chat_calls(emulator) == 1  # the stored answer was posted; InsiteChat was not asked again


async def test_slack_kill_after_slack_took_the_post_but_before_it_was_recorded_leaves_one_answer(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    # Needs Slack sends that mark their parts (message metadata) and look before re-posting.
    hang = slack.hang_after("chat.postMessage")  # Slack stores the post; its answer never comes back
    bridge = BridgeProcess(write_config(tmp_path, emulator, slack=slack))
    processes.append(bridge)
    await start_slack(bridge, slack)
    question = await ask_over_socket(slack, "what is the refund policy")
    await slack.wait_for(lambda: hang.hung == 1, timeout=10)
    assert answers_to(slack_texts(slack, question), "what is the refund policy") == 1
    await bridge.kill()

    slack.release()
    await bridge.start()
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = slack_texts(slack, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1, texts
    assert chat_calls(emulator) == 1


async def test_slack_sigterm_during_a_slow_answer_exits_promptly_and_the_next_start_answers_once(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", seconds=30, path_contains="/chat")  # an answer that takes 30 s
    bridge = BridgeProcess(write_config(tmp_path, emulator, slack=slack), grace=1.0)
    processes.append(bridge)
    await start_slack(bridge, slack)
    question = await ask_over_socket(slack, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the chat call to arrive", logs=bridge.logs)
    took = await bridge.terminate()
    assert took < 5.0, f"SIGTERM took {took:.1f} s with --grace 1"
    assert slack_texts(slack, question) == []
    assert job_states(bridge.state) == {"asked": 1}  # left for the next start

    emulator.clear_faults()
    await bridge.start()
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = slack_texts(slack, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1
    assert chat_calls(emulator) == 2


@pytest.mark.parametrize("after_restart", ["ask-again", "notice"])
async def test_slack_working_reaction_left_by_a_killed_process_is_removed_after_the_restart_replies(
    after_restart: str, emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", path_contains="/chat")
    # The reaction, not the default loading status: Slack clears a status itself (on the reply, or
    # after two minutes); a reaction stays on the question unless the bridge takes it off.
    config = write_config(tmp_path, emulator, slack=slack, after_restart=after_restart, working_signal="reaction")
    bridge = BridgeProcess(config)
    processes.append(bridge)
    await start_slack(bridge, slack)
    question = await ask_over_socket(slack, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the chat call to arrive", logs=bridge.logs)
    await slack.wait_for(lambda: slack.reactions_on(CHANNEL, question) == {REACTION}, timeout=10)
    await bridge.kill()
    assert slack.reactions_on(CHANNEL, question) == {REACTION}  # left behind

    emulator.clear_faults()
    await bridge.start()
    await bridge.wait_done(jobs=1)
    await bridge.terminate()  # stop() lets pending reaction removals finish
    assert len(slack_texts(slack, question)) == 1
    assert slack.reactions_on(CHANNEL, question) == set()


def signed(body: bytes, *, retry: int = 0) -> dict[str, str]:
    """Headers of Slack's HTTP event delivery (a retry says so)."""
    headers = {"Content-Type": "application/json", **sign(body)}
    if retry:
        headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
    return headers


async def test_slack_http_kill_right_after_the_200_still_answers_once_and_a_late_retry_adds_nothing(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", path_contains="/chat")  # nothing can be answered before the kill
    port = free_port()
    bridge = BridgeProcess(write_config(tmp_path, emulator, slack=slack, slack_http=True, listen=f"127.0.0.1:{port}"))
    processes.append(bridge)
    events = f"http://127.0.0.1:{port}/slack/events"
    body = slack_question(slack, "what is the refund policy")
    raw = json.dumps(body).encode()
    question = str(body["event"]["ts"])

    async with httpx.AsyncClient() as http:

        async def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
            return False

        async def wait_ready() -> None:
            deadline = time.monotonic() + 20
            while not await ready():
                assert time.monotonic() < deadline, "the bridge never became ready\n" + bridge.logs()
                await asyncio.sleep(0.05)

        await bridge.start()
        await wait_ready()
        response = await http.post(events, content=raw, headers=signed(raw))
        assert response.status_code == 200
        await bridge.kill()  # at once: the job is accepted or asked, never answered

        emulator.clear_faults()
        await bridge.start()
        await wait_ready()
        await bridge.wait_done(jobs=1)
        # Slack retries an event whose 200 came late; after the restart it is a duplicate.
        retry = await http.post(events, content=raw, headers=signed(raw, retry=1))
        assert retry.status_code == 200
    await bridge.terminate()
    texts = slack_texts(slack, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1
    assert job_states(bridge.state) == {"delivered": 1}


# --- alert cards ------------------------------------------------------------------------------

ALERTS = "C0ALERTS"


def escalation_webhook() -> tuple[bytes, dict[str, str]]:
    """A signed conversation.escalated webhook from the sandbox chatbot, as InsiteChat sends it."""
    body = {
        "event": "conversation.escalated",
        "chatbot_id": SANDBOX_CHATBOT_ID,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {"session_id": "visitor-7", "conversation_id": "conv-7", "message": "can I talk to a human?"},
    }
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign_webhook(raw, SANDBOX_WEBHOOK_SECRET)}
    return raw, headers


async def ready(http: httpx.AsyncClient) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get("/readyz")).status_code == 200
    return False


def alert_cards(slack: FakeSlack) -> list[dict[str, Any]]:
    """The alert cards Slack shows in the alert channel (a post whose answer was lost counts)."""
    return [m for m in slack.messages.get(ALERTS, []) if m.get("bot_id") and m.get("metadata")]


async def test_slack_kill_after_slack_took_an_alert_card_but_before_it_was_recorded_leaves_one_card(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    # The outbox took the card (its row is "started", no attempt counted) and Slack stored the
    # post, but the process died before the answer came back: the next start must look first.
    slack.channels[ALERTS] = {"name": "alerts", "is_member": True}
    hang = slack.hang_after("chat.postMessage")
    port = free_port()
    config = write_config(tmp_path, emulator, slack=slack, listen=f"127.0.0.1:{port}", alerts_to=f"slack:{ALERTS}")
    bridge = BridgeProcess(config)
    processes.append(bridge)
    raw, headers = escalation_webhook()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

        await start_slack(bridge, slack)
        deadline = time.monotonic() + 20
        while not await ready(http):
            assert time.monotonic() < deadline, "the bridge never became ready\n" + bridge.logs()
            await asyncio.sleep(0.05)
        response = await http.post(f"/webhooks/insitechat/{SANDBOX_CHATBOT_ID}", content=raw, headers=headers)
        assert response.status_code == 200 and response.json() == {"ok": True, "duplicate": False}
        await slack.wait_for(lambda: hang.hung == 1, timeout=10)
        assert len(alert_cards(slack)) == 1
        assert _read(bridge.state, "SELECT started, attempts FROM outbox WHERE delivered_at IS NULL") == [(1, 0)]
        await bridge.kill()

        slack.release()
        looks = len(slack.calls_to("conversations.history"))
        await start_slack(bridge, slack)
        await bridge.wait_done(jobs=0)
    await bridge.terminate()
    cards = alert_cards(slack)
    assert len(cards) == 1, f"the card was posted again after the restart: {cards}"  # found by its metadata
    [card] = cards
    assert "visitor asked for a human" in card["text"]
    assert len(slack.calls_to("conversations.history")) > looks
    assert _read(bridge.state, "SELECT reference FROM outbox") == [(card["ts"],)]


# --- Discord ---------------------------------------------------------------------------------


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.stop()


def discord_bridge(tmp_path: Path, emulator: Emulator, fake: FakeDiscord, **kw: Any) -> BridgeProcess:
    bridge = BridgeProcess(write_config(tmp_path, emulator, discord=True, **kw), module="tests.fakes.bridge_main")
    bridge.env["FAKE_DISCORD_URL"] = fake.base_url
    return bridge


async def start_discord(bridge: BridgeProcess, fake: FakeDiscord) -> None:
    """Start a run; return once it is logged in and has registered its slash commands (after READY)."""
    synced = len(fake.rest("PUT", r"/applications/\d+/commands"))
    await bridge.start()
    await until(
        lambda: len(fake.rest("PUT", r"/applications/\d+/commands")) > synced, "the Discord login", 20, bridge.logs
    )


def discord_texts(fake: FakeDiscord, channel_id: int | str) -> list[str]:
    return [str(m.get("content") or "") for m in fake.bot_posts(int(channel_id))]


async def mention(fake: FakeDiscord, text: str) -> str:
    """A member mentions the bot in #general; the answer goes to a thread whose id is the message's."""
    message = await fake.user_message(fd.GENERAL, text, mention_bot=True)
    return str(message["id"])


async def test_discord_kill_after_the_message_was_stored_before_the_call_answers_each_question_once(
    emulator: Emulator, discord: FakeDiscord, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    # Two DMs are one conversation: the second waits behind the first, whose call hangs.
    # Discord has no ack, so "stored" is read from the state file.
    emulator.inject("hang", path_contains="/chat")
    bridge = discord_bridge(tmp_path, emulator, discord)
    processes.append(bridge)
    await start_discord(bridge, discord)
    await discord.user_message(fd.DM_CHANNEL, "what is the refund policy", dm=True)
    await until(lambda: chat_calls(emulator) == 1, "the first chat call", logs=bridge.logs)
    await discord.user_message(fd.DM_CHANNEL, "and for digital goods", dm=True)
    await until(
        lambda: job_states(bridge.state) == {"asked": 1, "accepted": 1}, "the second job stored", logs=bridge.logs
    )
    await bridge.kill()

    emulator.clear_faults()
    await start_discord(bridge, discord)
    await bridge.wait_done(jobs=2)
    await bridge.terminate()
    texts = discord_texts(discord, fd.DM_CHANNEL)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert answers_to(texts, "and for digital goods") == 1, texts
    assert len(texts) == 2
    assert chat_calls(emulator) == 3


async def test_discord_kill_while_the_call_is_out_asks_again_and_answers_once(
    emulator: Emulator, discord: FakeDiscord, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", path_contains="/chat")
    bridge = discord_bridge(tmp_path, emulator, discord)
    processes.append(bridge)
    await start_discord(bridge, discord)
    question = await mention(discord, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the chat call to arrive", logs=bridge.logs)
    await bridge.kill()

    emulator.clear_faults()
    await start_discord(bridge, discord)
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = discord_texts(discord, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1
    assert chat_calls(emulator) == 2


async def test_discord_kill_while_the_call_is_out_in_notice_mode_posts_one_restarted_notice_and_asks_no_more(
    emulator: Emulator, discord: FakeDiscord, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", path_contains="/chat")
    bridge = discord_bridge(tmp_path, emulator, discord, after_restart="notice")
    processes.append(bridge)
    await start_discord(bridge, discord)
    question = await mention(discord, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the chat call to arrive", logs=bridge.logs)
    await bridge.kill()

    emulator.clear_faults()
    await start_discord(bridge, discord)
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = discord_texts(discord, question)
    assert restarted_notices(texts) == 1, texts
    assert len(texts) == 1
    assert chat_calls(emulator) == 1


async def test_discord_kill_after_the_answer_was_stored_posts_it_once_without_asking_again(
    emulator: Emulator, discord: FakeDiscord, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    posts = r"^/channels/\d+/messages$"
    discord.inject(500, path=posts, method="POST", count=None)  # Discord refuses every post
    bridge = discord_bridge(tmp_path, emulator, discord)
    processes.append(bridge)
    await start_discord(bridge, discord)
    question = await mention(discord, "what is the refund policy")
    await until(lambda: discord.rest("POST", r"/channels/\d+/messages"), "a refused post", logs=bridge.logs)
    await bridge.kill()

    discord.faults.clear()
    await start_discord(bridge, discord)
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = discord_texts(discord, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1
    assert chat_calls(emulator) == 1


async def test_discord_kill_after_discord_took_the_post_but_before_it_was_recorded_leaves_one_answer(
    emulator: Emulator, discord: FakeDiscord, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    hang = discord.hang(path=r"^/channels/\d+/messages$", method="POST", commit=True)
    bridge = discord_bridge(tmp_path, emulator, discord)
    processes.append(bridge)
    await start_discord(bridge, discord)
    question = await mention(discord, "what is the refund policy")
    await until(lambda: hang.hung == 1, "the post to be taken", logs=bridge.logs)
    assert answers_to(discord_texts(discord, question), "what is the refund policy") == 1
    await bridge.kill()

    discord.release()
    await start_discord(bridge, discord)
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = discord_texts(discord, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1, texts
    assert chat_calls(emulator) == 1


async def test_discord_sigterm_during_a_slow_answer_exits_promptly_and_the_next_start_answers_once(
    emulator: Emulator, discord: FakeDiscord, tmp_path: Path, processes: list[BridgeProcess]
) -> None:
    emulator.inject("hang", seconds=30, path_contains="/chat")
    bridge = discord_bridge(tmp_path, emulator, discord)
    processes.append(bridge)
    await start_discord(bridge, discord)
    question = await mention(discord, "what is the refund policy")
    await until(lambda: chat_calls(emulator) == 1, "the chat call to arrive", logs=bridge.logs)
    took = await bridge.terminate()
    assert took < 5.0, f"SIGTERM took {took:.1f} s with --grace 1"
    assert discord_texts(discord, question) == []
    assert job_states(bridge.state) == {"asked": 1}

    emulator.clear_faults()
    await start_discord(bridge, discord)
    await bridge.wait_done(jobs=1)
    await bridge.terminate()
    texts = discord_texts(discord, question)
    assert answers_to(texts, "what is the refund policy") == 1, texts
    assert len(texts) == 1
    assert chat_calls(emulator) == 2
