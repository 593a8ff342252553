"""The weekly digest: once at its hour across restarts and replicas, posted by the real Slack and Discord clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.discord import DiscordAdapter
from adapters.discord.alerts import MARKER_PREFIX
from adapters.slack.digest import DIGEST_EVENT_TYPE
from bridge import charts, config
from bridge.app import BridgeApp
from bridge.clock import ManualClock
from bridge.digest import CHECK_EVERY, LATE_LIMIT, scheduled_at, week_key
from bridge.emulator import SANDBOX_KEY
from bridge.store import SQLiteStore
from bridge.store.redis import RedisStore
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET, FakeSlack
from tests.integration.test_report import BOT_A, BOT_B, UNTIL, seeded_facts

ALERTS = "C0ALERTS"
EPOCH = 1_700_000_000.0  # ManualClock.time() = EPOCH + its monotonic time
PNG = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(
    not charts.available(), reason="the charts extra is not installed (pip install 'insitechat-bridge[charts]')"
)


def digest_settings(
    state: str, *, slack: FakeSlack | None = None, discord: bool = False, extra: str = "", redis_url: str = ""
) -> config.Settings:
    platform = (
        f"slack: {{bot_token: '${{SLACK_BOT_TOKEN}}', signing_secret: '${{SLACK_SIGNING_SECRET}}', mode: http, "
        f"api_url: '{slack.api_url}'}}\n" if slack is not None else ""
    ) + ("discord: {token: '${DISCORD_TOKEN}'}\n" if discord else "")
    to = f"slack:{ALERTS}" if slack is not None else f"discord:{fd.ALERTS}"
    return config.loads(
        "insitechat: {base_url: 'http://127.0.0.1:9', api_key: '${IC_KEY}'}\n"
        f"state: {state}\n"
        "server: {listen: '127.0.0.1:0'}\n"
        + platform
        + f"chatbots: [{{id: {BOT_A}, name: Support Bot}}]\n"
        f"routes: [{{platform: {'slack' if slack is not None else 'discord'}, chatbot: {BOT_A}}}]\n"
        f"report: {{digest: {{to: ['{to}'], weekday: Monday, hour: 9{extra}}}}}\n",
        env={
            "IC_KEY": SANDBOX_KEY, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "DISCORD_TOKEN": fd.TOKEN, "TEST_REDIS_URL": redis_url,
        },
    )


def clock_at(epoch: float) -> ManualClock:
    return ManualClock(epoch - EPOCH)


async def eventually(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def slack_digests(slack: FakeSlack) -> list[dict[str, Any]]:
    return [
        m for m in slack.messages.get(ALERTS, []) if (m.get("metadata") or {}).get("event_type") == DIGEST_EVENT_TYPE
    ]


async def seed(path: Path, clock: ManualClock) -> None:
    store = SQLiteStore(path, clock=clock)
    await store.note_facts(seeded_facts())  # the week before Monday 2026-11-30 09:00 UTC
    await store.close()


Apps = Callable[[config.Settings, ManualClock], Awaitable[BridgeApp]]


@pytest.fixture
async def apps() -> AsyncIterator[Apps]:
    started: list[BridgeApp] = []

    async def start(settings: config.Settings, clock: ManualClock) -> BridgeApp:
        app = BridgeApp(settings, clock=clock, grace=0.5)
        started.append(app)
        await app.start()
        await asyncio.wait_for(app.connected(), 15)
        return app

    yield start
    for app in started:
        if not app.stopped.is_set():
            await app.stop()


def test_the_schedule_is_the_wall_clock_weekday_and_hour() -> None:
    digest = digest_settings("{sqlite: ':memory:'}", discord=True).report.digest
    assert digest is not None
    assert scheduled_at(UNTIL, digest, "UTC") == UNTIL  # Monday 09:00 itself is due
    assert scheduled_at(UNTIL - 1, digest, "UTC") == UNTIL - 7 * 86_400  # a second before: last week's
    assert scheduled_at(UNTIL + 3 * 86_400, digest, "UTC") == UNTIL
    # Berlin: 09:00 local is 08:00 UTC in winter and 07:00 UTC in summer (Monday 2026-06-29).
    assert datetime.fromtimestamp(scheduled_at(UNTIL, digest, "Europe/Berlin"), UTC).hour == 8
    summer = datetime(2026, 6, 29, 12, tzinfo=UTC).timestamp()
    assert datetime.fromtimestamp(scheduled_at(summer, digest, "Europe/Berlin"), UTC).hour == 7
    assert week_key(UNTIL, "UTC") == "digest:2026-11-30"


@pytest.mark.parametrize("with_charts", [False, pytest.param(True, marks=needs_matplotlib)])
async def test_slack_gets_the_digest_once_across_a_restart_at_the_scheduled_minute(
    slack: FakeSlack, apps: Apps, tmp_path: Path, with_charts: bool
) -> None:
    path = tmp_path / "state.db"
    clock = clock_at(UNTIL - 30)  # half a minute before Monday 09:00
    await seed(path, clock)
    settings = digest_settings(f"{{sqlite: '{path}'}}", slack=slack, extra=f", charts: {str(with_charts).lower()}")
    first = await apps(settings, clock)
    await asyncio.sleep(0.2)
    assert slack_digests(slack) == []  # not yet: last week's was due too long ago

    clock.advance(CHECK_EVERY)  # 09:00:30, the first check at or after 09:00
    (posted,) = await eventually(lambda: slack_digests(slack), what="the digest")
    await first.stop()
    # A restart within the scheduled minute, then the checks of the next hours: no second digest.
    clock.advance(10)
    second = await apps(settings, clock)
    for _ in range(3):
        clock.advance(CHECK_EVERY)
        await asyncio.sleep(0.1)
    await second.outbox.deliver_due()
    assert slack_digests(slack) == [posted]

    text = " ".join(b["text"]["text"] for b in posted["blocks"] if "text" in b and isinstance(b["text"], dict))
    fields = {f["text"] for b in posted["blocks"] for f in b.get("fields", [])}
    assert "Support Bot" in text and "2026-11-23 09:00 to 2026-11-30 09:00 UTC" in str(posted["blocks"])
    assert {"*Questions answered*\n4", "*Unanswered*\n1 (25%)", "*Alerts still open*\n3"} <= fields
    assert "*Time to claim*\nmedian 2m, p90 10m (4 of 5 alerts claimed)" in fields
    if with_charts:
        await eventually(lambda: len(slack.files) == 2, what="the two charts")
        assert {(f.filename, f.channel, f.thread_ts) for f in slack.files} == {
            ("questions-per-day.png", ALERTS, posted["ts"]), ("time-to-claim.png", ALERTS, posted["ts"])
        }
        assert all(f.data.startswith(PNG) for f in slack.files)
    else:
        assert slack.files == [] and slack.calls_to("files.getUploadURLExternal") == []


async def test_a_post_whose_answer_was_lost_is_found_not_posted_again(
    slack: FakeSlack, apps: Apps, tmp_path: Path
) -> None:
    path = tmp_path / "state.db"
    clock = clock_at(UNTIL + 5)
    await seed(path, clock)
    slack.fail("chat.postMessage", status=500, error="internal_error", after=True)  # posted, answer lost
    slack.fail("conversations.history", status=503, error="service_unavailable")  # then Slack is down a while
    app = await apps(digest_settings(f"{{sqlite: '{path}'}}", slack=slack, extra=", charts: false"), clock)
    await eventually(lambda: slack.calls_to("chat.postMessage"), what="the first attempt")
    for _ in range(3):  # the outbox's retries, minutes apart
        clock.advance(400)
        await app.outbox.deliver_due()
    await eventually(lambda: slack.calls_to("conversations.history"), what="the look before posting again")
    assert len(slack_digests(slack)) == 1
    assert [c.ok for c in slack.calls_to("chat.postMessage")] == [False]  # never a second post


async def test_two_replicas_on_one_redis_queue_the_digest_once(
    slack: FakeSlack, apps: Apps, redis_url: str, redis_prefix: str
) -> None:
    clock = clock_at(UNTIL - 30)
    store = RedisStore(redis_url, prefix=redis_prefix, clock=clock)
    await store.note_facts(seeded_facts())
    await store.close()
    settings = digest_settings(
        f"{{redis_url: '${{TEST_REDIS_URL}}', redis_prefix: '{redis_prefix}'}}",
        slack=slack, extra=", charts: false", redis_url=redis_url,
    )
    one, two = await apps(settings, clock), await apps(settings, clock)
    clock.advance(CHECK_EVERY)  # both replicas check within the scheduled minute
    await eventually(lambda: slack_digests(slack), what="the digest")
    for _ in range(2):
        clock.advance(CHECK_EVERY)
        await asyncio.sleep(0.1)
    await one.outbox.deliver_due()
    await two.outbox.deliver_due()
    (posted,) = slack_digests(slack)
    assert any(f["text"] == "*Questions answered*\n4" for b in posted["blocks"] for f in b.get("fields", []))


@pytest.mark.parametrize(("late", "posted"), [(LATE_LIMIT - 60, True), (LATE_LIMIT + 60, False)])
async def test_after_downtime_a_digest_goes_out_up_to_a_day_late(
    slack: FakeSlack, apps: Apps, tmp_path: Path, late: float, posted: bool
) -> None:
    path = tmp_path / "state.db"
    clock = clock_at(UNTIL + late)  # the bridge was down from Monday morning on
    await seed(path, clock)
    app = await apps(digest_settings(f"{{sqlite: '{path}'}}", slack=slack, extra=", charts: false"), clock)
    if posted:
        (digest,) = await eventually(lambda: slack_digests(slack), what="the late digest")
        assert "2026-11-23 09:00 to 2026-11-30 09:00 UTC" in str(digest["blocks"])  # the same week, not the last 7 days
    else:
        await asyncio.sleep(0.3)
        await app.outbox.deliver_due()
        assert slack_digests(slack) == []


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.1)
    monkeypatch.setattr(DiscordAdapter, "start_timeout", 10.0)
    async with fd.running_fake() as fake:
        yield fake


def discord_digests(fake: FakeDiscord) -> list[dict[str, Any]]:
    return [
        m for m in fake.messages.values()
        if m["channel_id"] == str(fd.ALERTS)
        and any("Weekly InsiteChat report" in e.get("title", "") for e in m["embeds"])
    ]


@pytest.mark.parametrize("with_charts", [False, pytest.param(True, marks=needs_matplotlib)])
async def test_discord_gets_the_digest_once_across_a_restart_with_its_charts_attached(
    fake_discord: FakeDiscord, apps: Apps, tmp_path: Path, with_charts: bool
) -> None:
    path = tmp_path / "state.db"
    clock = clock_at(UNTIL - 30)
    await seed(path, clock)
    settings = digest_settings(f"{{sqlite: '{path}'}}", discord=True, extra=f", charts: {str(with_charts).lower()}")
    await fake_discord.grant("attach_files")
    first = await apps(settings, clock)
    clock.advance(CHECK_EVERY)
    (posted,) = await eventually(lambda: discord_digests(fake_discord), what="the digest")
    await first.stop()
    second = await apps(settings, clock)
    clock.advance(CHECK_EVERY)
    await asyncio.sleep(0.2)
    await second.outbox.deliver_due()
    assert discord_digests(fake_discord) == [posted]

    (embed,) = posted["embeds"]
    field, other = embed["fields"]
    assert field["name"] == f"Support Bot ({BOT_A})" and other["name"] == BOT_B
    assert "**Unanswered:** 2 (67%)" in other["value"]
    assert "**Questions answered:** 4" in field["value"] and "**Alerts still open:** 3" in field["value"]
    assert "**Time to resolve:** median 1h 00m, p90 2h 00m (3 of 5 alerts resolved)" in field["value"]
    assert MARKER_PREFIX in embed["url"]  # found again after a crash, like an alert card
    assert posted["mentions"] == [] and not posted["mention_everyone"]
    uploads = fake_discord.uploads.get(int(posted["id"]), [])
    if with_charts:
        assert [u.filename for u in uploads] == ["questions-per-day.png", "time-to-claim.png"]
        assert all(u.data.startswith(PNG) for u in uploads)
        assert embed["image"]["url"] == "attachment://questions-per-day.png"
    else:
        assert uploads == [] and "image" not in embed


@needs_matplotlib
async def test_without_attach_files_the_discord_digest_goes_out_as_text(
    fake_discord: FakeDiscord, apps: Apps, tmp_path: Path
) -> None:
    path = tmp_path / "state.db"
    clock = clock_at(UNTIL + 5)
    await seed(path, clock)
    await apps(digest_settings(f"{{sqlite: '{path}'}}", discord=True), clock)  # charts: true, the default
    (posted,) = await eventually(lambda: discord_digests(fake_discord), what="the digest")
    assert fake_discord.uploads == {} and "image" not in posted["embeds"][0]
    assert "**Questions answered:** 4" in posted["embeds"][0]["fields"][0]["value"]
