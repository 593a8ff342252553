"""The load side: emulator and fake platforms in this process, the bridge in its own, and the senders."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.common import ENV, ROOT, Child, CpuMeter, free_port, percentile, rss_mb
from bench.fakes import GatedEmulator, TimedDiscord, TimedSlack
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY
from tests.fakes import discord_api as fd
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, payload, sign

BOT = SANDBOX_CHATBOT_ID
ANSWER_TIMEOUT = 120.0  # longer than any queue a run builds up; an answer later than this counts as lost
ACK_TIMEOUT = 10.0  # a Socket Mode envelope not acked by then is counted as refused (Slack retries after 3 s)
CONVERSATIONS = itertools.count(1)  # unique across a run: the bridge dedupes on (team, channel, ts)


@dataclass
class Sample:
    """One message: when it was sent, acknowledged by the receiver, and answered on the fake platform."""

    channel: str
    sent: float
    token: str = ""  # in the question, echoed by the emulator's answer
    acked: float | None = None
    upstream: float | None = None  # when the chat request reached the emulator
    answered: float | None = None


class Harness:
    """The emulator and the fake platforms on loopback, a scratch folder, an HTTP client for events."""

    def __init__(self, tmp: Path, emulator: GatedEmulator, slack: TimedSlack, discord: TimedDiscord | None) -> None:
        self.tmp = tmp
        self.emulator = emulator
        self.slack = slack
        self.discord = discord
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
        self.children: list[Child] = []

    def mark_upstream(self, samples: list[Sample]) -> None:
        """Fill in when each question reached the emulator, to split the overhead into its two legs."""
        arrivals = {
            str(r.json.get("message", "")).rsplit(" ", 1)[-1]: r.time
            for r in self.emulator.requests
            if r.path.endswith("/chat") and isinstance(r.json, dict)
        }
        for sample in samples:
            sample.upstream = arrivals.get(sample.token)

    def bridge(
        self,
        name: str,
        *,
        platforms: tuple[str, ...],
        rate_limit: int,
        rate_window: float,
        alerts: bool = False,
        slack_mode: str = "http",
        source: Path | None = None,
        trace: Path | None = None,
    ) -> Child:
        """The real bridge (`insitechat-bridge run --config ...`) as a child process, configured for the fakes.

        `source`: the tree whose `bridge` and `adapters` the child imports (another revision's
        checkout); None: this one. `trace`: the child writes every SQL statement it runs there.
        """
        port = free_port()
        folder = self.tmp / name
        folder.mkdir()
        lines = [
            "insitechat:",
            f"  base_url: {self.emulator.base_url}",
            "  api_key: ${BENCH_IC_KEY}",
            f"  rate_limit: {rate_limit}",
            f"  rate_window: {rate_window}",
            "chatbots:",
            f'  - {{id: {BOT}, name: Bench Bot, webhook_secret: "${{BENCH_WEBHOOK_SECRET}}"}}',
            f'state: {{sqlite: "{folder / "state.db"}"}}',
            f'server: {{listen: "127.0.0.1:{port}"}}',
            "logging: {level: INFO}",
            "routes:",
        ]
        lines += [f"  - {{platform: {p}, chatbot: {BOT}, reply: mention}}" for p in platforms]
        if "slack" in platforms:
            lines += [
                "slack:",
                "  bot_token: ${BENCH_SLACK_BOT_TOKEN}",
                "  signing_secret: ${BENCH_SLACK_SIGNING_SECRET}",
                f"  mode: {slack_mode}",
                f"  api_url: {self.slack.api_url}",
            ]
            if slack_mode == "socket":
                lines.append("  app_token: ${BENCH_SLACK_APP_TOKEN}")
        env: dict[str, str] = {}
        if "discord" in platforms:
            assert self.discord is not None
            lines += ["discord:", "  token: ${BENCH_DISCORD_TOKEN}", "  message_content_intent: true"]
            env = {"BENCH_DISCORD_URL": self.discord.base_url, "BENCH_DISCORD_TOKEN": fd.TOKEN}
        if alerts:
            lines += ["alerts:", f'  - {{chatbot: {BOT}, events: [conversation.escalated], to: ["slack:CALERTS"]}}']
        config = folder / "config.yaml"
        config.write_text("\n".join(lines) + "\n")
        run = ["run", "--config", str(config), "--grace", "2"]
        if trace is not None:
            env["BENCH_SQL_TRACE"] = str(trace)
        if source is None:
            child = Child(name, ["-m", "bench.bridge_proc", *run], port, folder / "bridge.log", env)
        else:
            # -P: the launcher's own folder is not put on sys.path, so `bridge` and `adapters`
            # come from PYTHONPATH (that tree), ahead of this checkout's editable install.
            env |= {"PYTHONPATH": str(source), "BENCH_SOURCE": str(source)}
            launcher = str(ROOT / "bench" / "bridge_proc.py")
            child = Child(name, ["-P", launcher, *run], port, folder / "bridge.log", env, cwd=source)
        self.children.append(child)
        return child

    def baseline(self, name: str, module: str, env: dict[str, str] | None = None) -> Child:
        """A baseline (a module of bench/baselines/) as a child process on the same fakes; `env` adds to its own."""
        port = free_port()
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        child_env = {
            "PORT": str(port),
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": self.slack.api_url,
            "INSITECHAT_BASE_URL": self.emulator.base_url,
            "INSITECHAT_CHATBOT_ID": BOT,
            "INSITECHAT_API_KEY": SANDBOX_KEY,
            **(env or {}),
        }
        child = Child(name, ["-m", module], port, folder / f"{name}.log", child_env)
        self.children.append(child)
        return child


@asynccontextmanager
async def harness(
    *, latency: float, rate_limit: int = 10**9, rate_window: float = 60.0, discord: bool = False
) -> AsyncIterator[Harness]:
    """Start the fakes; on exit stop every child process, then the fakes (always, even on failure)."""
    assert ENV["BENCH_IC_KEY"] == SANDBOX_KEY and ENV["BENCH_SLACK_APP_TOKEN"] == APP_TOKEN
    # Retry-After tells the bridge the scaled window's real remaining time; without it a 429 costs the
    # unscaled 60 s default wait, which would say nothing about a 6 s window.
    emulator = GatedEmulator.sandbox(
        latency=latency, rate_limit=rate_limit, rate_window=rate_window, retry_after_header=True
    )
    slack = TimedSlack()
    fake_discord = TimedDiscord() if discord else None
    await emulator.start()
    await slack.start()
    if fake_discord is not None:
        await fake_discord.start()
    with tempfile.TemporaryDirectory(prefix="insitechat-bench-") as tmp:
        h = Harness(Path(tmp), emulator, slack, fake_discord)
        try:
            yield h
        finally:
            for child in h.children:
                await child.stop()
            await h.http.close()
            if fake_discord is not None:
                await fake_discord.stop()
            await slack.stop()
            await emulator.stop()


# --- senders: one message in, one answer out --------------------------------------------------------


class Sender(Protocol):
    async def post(self, conversation: int, k: int, channel: str) -> tuple[Sample, asyncio.Future[float]]: ...

    def forget(self, conversation: int) -> None: ...


def _token(conversation: int, k: int) -> str:
    # Letters around the numbers: "q1k2z" is never a prefix of "q1k20z".
    return f"q{conversation}k{k}z"


class SlackSender:
    """Slack in HTTP mode: a signed app_mention event POSTed to the receiver, answer on the fake Slack."""

    def __init__(self, h: Harness, events_url: str) -> None:
        self.h = h
        self.events_url = events_url
        self.template = payload("app_mention")
        # Message ts of now, as Slack's are: a bridge treats a question older than its own start
        # as one a dead run may have left its reaction on, and removes it (one more call).
        self.epoch = int(time.time()) + 1

    def _body(self, conversation: int, k: int, channel: str) -> tuple[bytes, str, str]:
        body, root, token = self.event(conversation, k, channel)
        return json.dumps(body).encode(), root, token

    def event(self, conversation: int, k: int, channel: str) -> tuple[dict[str, Any], str, str]:
        """The event callback for message k of a conversation, its thread root and its token."""
        root = f"{self.epoch + conversation}.000000"
        ts = f"{self.epoch + conversation}.{k:06d}"
        token = _token(conversation, k)
        text = f"<@UBOT> question {token}"
        event: dict[str, Any] = {
            **self.template["event"], "ts": ts, "event_ts": ts, "channel": channel, "text": text,
            "client_msg_id": f"bench-{conversation}-{k}",
            "blocks": [{"type": "rich_text", "block_id": "b1", "elements": [
                {"type": "rich_text_section", "elements": [{"type": "text", "text": text}]}]}],
        }
        if k:
            event["thread_ts"] = root
        body = {**self.template, "event": event, "event_id": f"EvB{conversation}x{k}", "event_time": int(time.time())}
        return body, root, token

    async def post(self, conversation: int, k: int, channel: str) -> tuple[Sample, asyncio.Future[float]]:
        raw, root, token = self._body(conversation, k, channel)
        headers = {"Content-Type": "application/json", **sign(raw)}
        answer = self.h.slack.answers.expect(root, token)
        sample = Sample(channel, time.monotonic(), token)
        try:
            async with self.h.http.post(self.events_url, data=raw, headers=headers) as response:
                await response.read()
                if response.status == 200:
                    sample.acked = time.monotonic()
        except (TimeoutError, aiohttp.ClientError):
            pass
        return sample, answer

    def forget(self, conversation: int) -> None:
        self.h.slack.answers.forget(f"{self.epoch + conversation}.000000")


class SocketSender(SlackSender):
    """Slack in Socket Mode: the same event as an `events_api` envelope on the fake's socket; acked = its ack."""

    def __init__(self, h: Harness) -> None:
        super().__init__(h, "")

    async def post(self, conversation: int, k: int, channel: str) -> tuple[Sample, asyncio.Future[float]]:
        body, root, token = self.event(conversation, k, channel)
        answer = self.h.slack.answers.expect(root, token)
        sample = Sample(channel, time.monotonic(), token)
        envelope = await self.h.slack.send_envelope(body)
        try:
            await asyncio.wait_for(envelope.acked.wait(), ACK_TIMEOUT)
            sample.acked = time.monotonic()
        except TimeoutError:
            pass
        self.h.slack.envelopes.pop(envelope.envelope_id, None)
        return sample, answer


class MentionPairSender(SocketSender):
    """Slack in Socket Mode as real Slack delivers a mention: a `message` event and an `app_mention`
    event for the same post (same channel and ts, their own event ids), each in its own envelope,
    each needing its ack. acked = when the later of the two was acked; both must be, or it is refused.

    Which one comes first varies in real Slack; here the order alternates from message to message.
    """

    async def post(self, conversation: int, k: int, channel: str) -> tuple[Sample, asyncio.Future[float]]:
        mention, root, token = self.event(conversation, k, channel)
        message = {
            **mention,
            "event": {**mention["event"], "type": "message", "channel_type": "channel"},
            "event_id": mention["event_id"] + "m",
        }
        answer = self.h.slack.answers.expect(root, token)
        sample = Sample(channel, time.monotonic(), token)
        first, second = (message, mention) if k % 2 == 0 else (mention, message)
        envelopes = [await self.h.slack.send_envelope(first), await self.h.slack.send_envelope(second)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.acked.wait() for e in envelopes)), ACK_TIMEOUT)
            sample.acked = time.monotonic()
        except TimeoutError:
            pass
        for envelope in envelopes:
            self.h.slack.envelopes.pop(envelope.envelope_id, None)
        return sample, answer


class DiscordSender:
    """Discord: a MESSAGE_CREATE mentioning the bot through the fake gateway; the answer lands in its thread."""

    def __init__(self, h: Harness) -> None:
        assert h.discord is not None
        self.fake = h.discord

    @staticmethod
    def _root(conversation: int) -> int:
        return 1400000000000000000 + conversation * 10_000  # clear of the fake's own ids; k < 10,000

    async def post(self, conversation: int, k: int, channel: str) -> tuple[Sample, asyncio.Future[float]]:
        root = self._root(conversation)
        token = _token(conversation, k)
        answer = self.fake.answers.expect(str(root), token)
        # The first message goes to the channel (the bot answers in a new thread on it); follow-ups go in that thread.
        where = fd.GENERAL if k == 0 else root
        sample = Sample(channel, time.monotonic(), token)
        await self.fake.user_message(where, f"question {token}", mention_bot=True, message_id=root + k)
        sample.acked = time.monotonic()  # written to the gateway socket
        return sample, answer

    def forget(self, conversation: int) -> None:
        self.fake.answers.forget(str(self._root(conversation)))


async def answered(sender: Sender, conversation: int, sample: Sample, answer: asyncio.Future[float]) -> Sample:
    """Wait for the answer (not past ANSWER_TIMEOUT); a refused event is never answered."""
    if sample.acked is None:
        sender.forget(conversation)
        return sample
    try:
        sample.answered = await asyncio.wait_for(answer, ANSWER_TIMEOUT)
    except TimeoutError:
        sender.forget(conversation)
    return sample


# --- closed-loop load ---------------------------------------------------------------------------------


@dataclass
class Level:
    """One load level: every sample, the measured window and the CPU use inside it."""

    concurrency: int
    latency: float
    samples: list[Sample]
    window: tuple[float, float]
    cpu: dict[str, float] = field(default_factory=dict)
    load: float = float("nan")  # the machine's 1-minute load average at the end of the window
    rss: float = float("nan")  # MiB resident in the process under test at the end of the window

    @property
    def answered(self) -> list[Sample]:
        return [s for s in self.samples if s.answered is not None]

    @property
    def lost(self) -> int:
        return len(self.samples) - len(self.answered)

    @property
    def throughput(self) -> float:
        low, high = self.window
        return sum(1 for s in self.answered if low <= s.answered <= high) / (high - low)  # type: ignore[operator]

    @property
    def ideal(self) -> float:
        """Answers per second if the only cost were the upstream latency (closed loop, no think time)."""
        return self.concurrency / self.latency

    def overhead(self, q: float) -> float:
        return percentile([s.answered - s.sent - self.latency for s in self.answered], q)  # type: ignore[operator]

    def e2e(self, q: float) -> float:
        return percentile([s.answered - s.sent for s in self.answered], q)  # type: ignore[operator]

    def inbound(self, q: float) -> float:
        """Event sent -> chat request at the emulator."""
        return percentile([s.upstream - s.sent for s in self.answered if s.upstream is not None], q)

    def outbound(self, q: float) -> float:
        """Chat request at the emulator + latency -> answer on the fake platform (includes the emulator's own work)."""
        return percentile(
            [s.answered - s.upstream - self.latency for s in self.answered if s.upstream is not None], q  # type: ignore[operator]
        )

    def ack(self, q: float) -> float:
        return percentile([s.acked - s.sent for s in self.samples if s.acked is not None], q)


async def closed_loop(
    sender: Sender, *, concurrency: int, duration: float, latency: float, pid: int | None, channels: int = 10
) -> Level:
    """`concurrency` conversations, each sending its next message as soon as the last is answered.

    Starts are spread over one upstream round trip, as real conversations do not all begin in the
    same millisecond; sending stops after `duration`, and every message sent is waited for.
    Throughput is counted from the first answers on (after the ramp) to the end of sending.
    """
    samples: list[Sample] = []
    start = time.monotonic()
    ramp = min(latency, duration / 4)
    stop_at = start + duration
    # Answers before the first round trip is over only measure the ramp, not the steady state.
    window = (start + ramp + latency, stop_at) if ramp + latency < duration else (start, stop_at)

    async def conversation(index: int) -> None:
        await asyncio.sleep(ramp * index / concurrency)
        number = next(CONVERSATIONS)
        k = 0
        while time.monotonic() < stop_at:
            sample = await answered(sender, number, *await sender.post(number, k, f"C0BENCH{index % channels}"))
            samples.append(sample)
            if sample.answered is None:
                return
            k += 1

    cpu: dict[str, float] = {}
    machine: dict[str, float] = {}

    async def meter() -> None:
        await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
        reading = CpuMeter(pid)
        await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
        cpu.update(reading.read())
        machine["load"] = os.getloadavg()[0]
        if pid:
            machine["rss"] = rss_mb(pid, children=True)

    await asyncio.gather(meter(), *(conversation(i) for i in range(concurrency)))
    return Level(concurrency, latency, samples, window, cpu, **machine)


async def burst(sender: Sender, messages: list[str]) -> list[Sample]:
    """One new conversation per entry (its channel), posted one after another in this order; all answers awaited."""
    waits = []
    for channel in messages:
        number = next(CONVERSATIONS)
        sample, answer = await sender.post(number, 0, channel)
        waits.append(asyncio.ensure_future(answered(sender, number, sample, answer)))
    return list(await asyncio.gather(*waits))
