"""The relay end to end: a queue adapter in, the InsiteChat emulator over loopback, posts out."""

from __future__ import annotations

import asyncio
import json
import io
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bridge import config
from bridge.app import build_clients
from bridge.clock import ManualClock, SystemClock
from bridge.desk import AlertDesk
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.insitechat import InsiteChatClient
from bridge.messages import Inbound, OutboundKind
from bridge.outbox import Outbox
from bridge.logs import JsonFormatter
from bridge.relay import NOTICES, Outcome, Relay
from bridge.store import JobState, SQLiteStore
from tests.fakes.queue_adapter import QueueAdapter

BOT = SANDBOX_CHATBOT_ID


def settings_for(base_url: str, *, key: str = SANDBOX_KEY, extra: str = "", rate_limit: int = 55, deadline: float = 30):
    return config.loads(
        f"""
insitechat:
  base_url: {base_url}
  api_key: ${{KEY}}
  rate_limit: {rate_limit}
  deadline: {deadline}
slack: {{bot_token: "${{KEY}}", app_token: "${{KEY}}"}}
routes:
  - {{platform: slack, chatbot: {BOT}, reply: mention}}
  - {{platform: slack, channel: CALL, chatbot: {BOT}, reply: all}}
  - {{platform: slack, channel: COFF, chatbot: {BOT}, reply: off}}
{extra}
""",
        env={"KEY": key},
    )



class Harness:
    """A relay wired to the emulator and a queue adapter named "slack"."""

    def __init__(self, settings: config.Settings, store: SQLiteStore, clock=None, clients=None) -> None:  # type: ignore[no-untyped-def]
        self.clock = clock or SystemClock()
        self.store = store
        self.clients: dict[str, InsiteChatClient] = clients or build_clients(settings, self.clock)
        self.outbox = Outbox(store, AlertDesk(settings, store, self.clock), self.clock, jitter=lambda: 0.0)
        self.relay = Relay(settings, store, self.clients, self.outbox, clock=self.clock, queue_notice_after=10)
        self.adapter = QueueAdapter("slack")
        self.relay.register(self.adapter)
        self.outbox.register(self.adapter)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()


@pytest.fixture
async def make_harness(emulator: Emulator, tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kw: object) -> Harness:
        store = SQLiteStore(tmp_path / "state.db")
        harness = Harness(settings_for(emulator.base_url, **kw), store)  # type: ignore[arg-type]
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.close()


def msg(text: str, *, id: str = "100.1", channel: str = "C1", **kw: object) -> Inbound:
    fields = dict(platform="slack", workspace="T1", channel=channel, message_id=id, author_id="U1", text=text)
    fields.update(kw)
    return Inbound(**fields)  # type: ignore[arg-type]


def chat_calls(emulator: Emulator) -> list:  # type: ignore[type-arg]
    return [r for r in emulator.requests if r.path.endswith("/chat")]


async def test_mention_is_answered_in_its_thread_with_working_signal(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    outcome = await h.relay.handle(msg("What is the refund policy?", mentions_bot=True))
    assert outcome is Outcome.ANSWERED
    [post] = h.adapter.sent
    assert post.kind is OutboundKind.ANSWER
    assert post.conversation.thread == "100.1" and post.reply_to == "100.1"
    assert "refund policy" in "".join(post.parts)
    assert h.adapter.working_events == [("enter", "100.1"), ("exit", "100.1")]
    [call] = chat_calls(emulator)
    assert call.json["session_id"] == post.conversation.session_id(0)


async def test_follow_up_in_thread_keeps_context_without_mention(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    await h.relay.handle(msg("first question about pricing", mentions_bot=True))
    outcome = await h.relay.handle(msg("and the second one?", id="100.2", thread="100.1"))
    assert outcome is Outcome.ANSWERED
    second = "".join(h.adapter.sent[1].parts)
    assert "second one" in second and "first question about pricing" in second  # emulator echoes history
    assert h.adapter.sent[1].conversation == h.adapter.sent[0].conversation


async def test_a_bare_mention_says_hello_and_follows_its_thread(make_harness, emulator: Emulator) -> None:
    """"@bot" alone opens the thread "ask me here": the question asked there next, without a mention, is answered."""
    h = make_harness()
    assert await h.relay.handle(msg("", mentions_bot=True)) is Outcome.NOTICE
    assert "".join(h.adapter.sent[0].parts) == NOTICES["hello"]
    assert await h.relay.handle(msg("what are your opening hours?", id="100.2", thread="100.1")) is Outcome.ANSWERED
    assert "opening hours" in "".join(h.adapter.sent[1].parts)
    assert h.adapter.sent[1].conversation == h.adapter.sent[0].conversation


@pytest.mark.parametrize(
    ("inbound", "reason"),
    [
        (msg("hello everyone"), "not addressed in a mention-mode channel"),
        (msg("hi", author_is_bot=True, mentions_bot=True), "from a bot"),
        (msg("hi", author_is_self=True, mentions_bot=True), "own message"),
        (msg("hi", channel="COFF", mentions_bot=True), "route is off"),
        (msg("some reply", id="9.9", thread="1.1"), "thread the bot is not in"),
    ],
)
async def test_messages_the_bot_must_ignore(make_harness, emulator: Emulator, inbound: Inbound, reason: str) -> None:
    h = make_harness()
    assert await h.relay.handle(inbound) is Outcome.IGNORED, reason
    assert h.adapter.sent == [] and chat_calls(emulator) == []


async def test_follow_ups_for_someone_else_or_marked_are_ignored(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    await h.relay.handle(msg("question", mentions_bot=True))
    assert (
        await h.relay.handle(msg("@bob what do you think?", id="100.2", thread="100.1", mentions_others=True))
        is Outcome.IGNORED
    )
    assert await h.relay.handle(msg("!note to self", id="100.3", thread="100.1")) is Outcome.IGNORED
    assert len(chat_calls(emulator)) == 1


async def test_no_route_means_no_answer(emulator: Emulator, tmp_path: Path) -> None:
    settings = settings_for(emulator.base_url)
    h = Harness(settings, SQLiteStore(tmp_path / "s.db"))
    h.adapter.name = "discord"
    h.relay.register(h.adapter)
    assert await h.relay.handle(msg("hi", platform="discord", mentions_bot=True)) is Outcome.IGNORED
    await h.close()


async def test_all_mode_answers_top_level_messages(make_harness) -> None:
    h = make_harness()
    assert await h.relay.handle(msg("anyone know the opening hours?", channel="CALL")) is Outcome.ANSWERED
    assert await h.relay.handle(msg("!skip this", id="100.5", channel="CALL")) is Outcome.IGNORED


async def test_dm_is_answered_and_is_one_conversation(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    await h.relay.handle(msg("dm one", channel="D1", is_dm=True))
    await h.relay.handle(msg("dm two", id="100.2", channel="D1", is_dm=True))
    sessions = {c.json["session_id"] for c in chat_calls(emulator)}
    assert len(sessions) == 1
    assert "dm one" in "".join(h.adapter.sent[1].parts)


async def test_duplicates_concurrent_and_after_restart_give_one_answer(
    make_harness, emulator: Emulator, tmp_path: Path
) -> None:
    h = make_harness()
    # The message + app_mention pair, and a retry arriving while the first is answered.
    emulator.latency = 0.2
    same = msg("only once please", mentions_bot=True)
    outcomes = await asyncio.gather(h.relay.handle(same), h.relay.handle(same), h.relay.handle(same))
    assert sorted(o.value for o in outcomes) == ["answered", "duplicate", "duplicate"]
    # A restart: a new relay and store over the same file; the retry comes in again.
    h2 = make_harness()
    assert await h2.relay.handle(same) is Outcome.DUPLICATE
    assert len(chat_calls(emulator)) == 1 and len(h.adapter.sent) == 1 and h2.adapter.sent == []


async def test_the_same_ts_in_two_channels_is_two_messages_each_answered(make_harness, emulator: Emulator) -> None:
    # Slack ts values are unique per channel only: two posts at the same instant in two
    # channels share one. Neither is a duplicate of the other.
    h = make_harness()
    one = msg("what are the opening hours?", id="1700000100.000100", channel="C1", mentions_bot=True)
    two = msg("where is the office?", id="1700000100.000100", channel="C2", mentions_bot=True)
    assert await h.relay.handle(one) is Outcome.ANSWERED
    assert await h.relay.handle(two) is Outcome.ANSWERED
    assert sorted(post.conversation.channel for post in h.adapter.sent) == ["C1", "C2"]
    assert [c.json["message"] for c in chat_calls(emulator)] == [one.text, two.text]
    jobs = [await h.store.job_by_key(m.dedupe_key) for m in (one, two)]
    assert [job[0].inbound.channel for job in jobs if job and job[0].inbound] == ["C1", "C2"]
    assert all(job is not None and job[1] is JobState.DELIVERED for job in jobs)
    assert await h.relay.handle(two) is Outcome.DUPLICATE  # and each is still one message


async def test_reset_starts_a_fresh_session(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    await h.relay.handle(msg("remember the word pineapple", channel="D1", is_dm=True))
    assert await h.relay.handle(msg("reset", id="100.2", channel="D1", is_dm=True)) is Outcome.RESET
    assert "".join(h.adapter.sent[-1].parts) == NOTICES["reset"]
    await h.relay.handle(msg("what word?", id="100.3", channel="D1", is_dm=True))
    assert "pineapple" not in "".join(h.adapter.sent[-1].parts)
    first, last = chat_calls(emulator)[0], chat_calls(emulator)[-1]
    assert first.json["session_id"] != last.json["session_id"]


async def test_bare_mention_gets_a_greeting_not_silence(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    assert await h.relay.handle(msg("   ", mentions_bot=True)) is Outcome.NOTICE
    assert "".join(h.adapter.sent[0].parts) == NOTICES["hello"]
    assert chat_calls(emulator) == []


async def test_quota_exhausted_tells_the_user(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    account = emulator.add_account("Tiny plan", monthly_quota=1)
    key = emulator.add_key(account, "ic_tiny_plan_key")
    emulator.add_chatbot(account, "Tiny", chatbot_id="22222222-3333-4444-8555-666666666666")
    settings = settings_for(emulator.base_url, key=key).model_copy(
        update={"routes": (config.RouteSettings(chatbot="22222222-3333-4444-8555-666666666666", channel="dm"),)}
    )
    h = Harness(settings, SQLiteStore(tmp_path / "s.db"))
    assert await h.relay.handle(msg("one", channel="D1", is_dm=True)) is Outcome.ANSWERED
    with caplog.at_level(logging.ERROR):
        assert await h.relay.handle(msg("two", id="2", channel="D1", is_dm=True)) is Outcome.NOTICE
    assert "".join(h.adapter.sent[-1].parts) == NOTICES["quota"].format(when="5 minutes")
    # The operator's reason is the product here ("an admin can see why in the logs"): said once, as an error.
    reasons = [r for r in caplog.records if r.name == "bridge.relay" and "monthly quota exhausted" in r.getMessage()]
    assert [r.levelno for r in reasons] == [logging.ERROR]
    # The circuit is open now: the next message gets the notice without another API call.
    calls = len(chat_calls(emulator))
    assert await h.relay.handle(msg("three", id="3", channel="D1", is_dm=True)) is Outcome.NOTICE
    assert len(chat_calls(emulator)) == calls
    await h.close()


async def test_service_down_gives_unavailable_notice(make_harness, emulator: Emulator) -> None:
    h = make_harness(deadline=1.5)
    emulator.inject(status=503, count=None, path_contains="/chat")
    assert await h.relay.handle(msg("anyone there?", channel="D1", is_dm=True)) is Outcome.NOTICE
    assert "".join(h.adapter.sent[-1].parts) == NOTICES["unavailable"]


async def test_bad_key_gives_misconfigured_notice_and_log_without_key(
    make_harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = make_harness(key="ic_revoked_or_wrong")
    with caplog.at_level(logging.INFO):
        assert await h.relay.handle(msg("hi", channel="D1", is_dm=True)) is Outcome.NOTICE
    assert "".join(h.adapter.sent[-1].parts) == NOTICES["misconfigured"]
    assert "ic_revoked_or_wrong" not in caplog.text


async def test_a_failed_post_is_retried_and_the_answer_arrives_once(emulator: Emulator, tmp_path: Path) -> None:
    clock = ManualClock()
    h = Harness(settings_for(emulator.base_url), SQLiteStore(tmp_path / "s.db", clock=clock), clock=clock)
    h.adapter.fail_next_sends = 1
    question = msg("hi", channel="D1", is_dm=True)
    assert await h.relay.handle(question) is Outcome.PENDING  # the answer exists; the platform said no
    assert h.adapter.sent == []
    clock.advance(1.0)  # the chat backoff (jitter 0: half of 1 s)
    assert await h.outbox.deliver_due() == 1
    [answer] = h.adapter.sent  # the answer itself, never an error notice in its place
    assert answer.kind is OutboundKind.ANSWER and answer.delivery is not None and answer.delivery.look_first
    assert (await h.store.job_by_key(question.dedupe_key))[1] is JobState.DELIVERED  # type: ignore[index]
    assert len(chat_calls(emulator)) == 1  # InsiteChat was asked once
    await h.close()


async def test_a_post_refused_for_good_fails_the_job_once(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    h.adapter.refuse_sends = True
    question = msg("hi", channel="D1", is_dm=True)
    assert await h.relay.handle(question) is Outcome.FAILED
    assert (await h.store.job_by_key(question.dedupe_key))[1] is JobState.FAILED
    assert await h.outbox.deliver_due() == 0 and await h.store.outbox_due() == []  # not retried


async def test_queue_notice_when_the_limiter_is_saturated(emulator: Emulator, tmp_path: Path) -> None:
    clock = ManualClock()
    settings = settings_for(emulator.base_url, rate_limit=2)
    h = Harness(settings, SQLiteStore(tmp_path / "s.db"), clock=clock)
    first = asyncio.create_task(h.relay.handle(msg("q1", id="1", channel="D1", is_dm=True)))
    second = asyncio.create_task(h.relay.handle(msg("q2", id="2", channel="D2", is_dm=True)))
    assert [o.value for o in await asyncio.gather(first, second)] == ["answered", "answered"]
    while not h.adapter.posted.empty():
        h.adapter.posted.get_nowait()
    third = asyncio.create_task(h.relay.handle(msg("q3", id="3", channel="D3", is_dm=True)))
    notice = await h.adapter.next_post()
    assert notice.kind is OutboundKind.NOTICE and "number 1 in the queue" in notice.parts[0]
    assert not third.done()
    while not third.done():  # the window slides on the injected clock, never on real time
        clock.advance(5)
        await asyncio.sleep(0.01)
    assert third.result() is Outcome.ANSWERED
    assert len(chat_calls(emulator)) == 3
    await h.close()


async def test_drain_lets_answers_finish_and_keeps_later_ones_for_the_next_start(
    make_harness, emulator: Emulator
) -> None:
    h = make_harness()
    emulator.latency = 0.3
    task = h.relay.submit(msg("slow one", channel="D1", is_dm=True))
    await asyncio.sleep(0.05)
    await h.relay.drain(grace=5)
    assert task.result() is Outcome.ANSWERED
    late = msg("too late", id="2", channel="D1", is_dm=True)
    assert await h.relay.handle(late) is Outcome.DEFERRED  # stored, not answered by a stopping process
    assert await h.relay.handle(late) is Outcome.DUPLICATE
    assert len(chat_calls(emulator)) == 1
    restarted = make_harness()  # the next start, on the same state file
    assert await restarted.relay.recover() == 1
    answer = await restarted.adapter.next_post()
    assert "too late" in "".join(answer.parts) and answer.kind is OutboundKind.ANSWER
    assert len(chat_calls(emulator)) == 2


@pytest.mark.parametrize(("after_restart", "asked_again"), [("ask-again", True), ("notice", False)])
async def test_an_answer_cut_off_by_shutdown_is_finished_by_the_next_start(
    make_harness, emulator: Emulator, after_restart: str, asked_again: bool
) -> None:
    h = make_harness()
    emulator.inject("hang", seconds=30, path_contains="/chat", count=1)
    slow = msg("never answered in time", channel="D1", is_dm=True)
    task = h.relay.submit(slow)
    await asyncio.sleep(0.2)
    await h.relay.drain(grace=0.2)
    assert task.cancelled()
    assert h.adapter.sent == []
    assert (await h.store.job_by_key(slow.dedupe_key))[1] is JobState.ASKED  # the call was out: stays a job
    restarted = make_harness(extra=f"chat: {{after_restart: {after_restart}}}")
    assert await restarted.relay.recover() == 1
    reply = await restarted.adapter.next_post()
    if asked_again:
        assert reply.kind is OutboundKind.ANSWER and "never answered in time" in "".join(reply.parts)
        assert len(chat_calls(emulator)) == 2
    else:
        assert "".join(reply.parts) == NOTICES["restarted"]
        assert len(chat_calls(emulator)) == 1
    assert await restarted.relay.recover() == 0  # taken over once


async def test_a_question_still_in_the_limiters_queue_at_shutdown_is_asked_by_the_next_start_even_in_notice_mode(
    make_harness, emulator: Emulator
) -> None:
    h = make_harness(rate_limit=1)
    emulator.inject("hang", seconds=30, path_contains="/chat", count=1)  # holds the only slot
    out = msg("the call that went out", id="1", channel="D1", is_dm=True)
    queued = msg("still in the queue", id="2", channel="D2", is_dm=True)
    tasks = [h.relay.submit(out), h.relay.submit(queued)]
    limiter = h.clients["default"].limiter
    assert limiter is not None
    while not (chat_calls(emulator) and limiter.waiting == 1):
        await asyncio.sleep(0.01)
    await h.relay.drain(grace=0.1)
    assert all(t.cancelled() for t in tasks)
    assert (await h.store.job_by_key(out.dedupe_key))[1] is JobState.ASKED
    assert (await h.store.job_by_key(queued.dedupe_key))[1] is JobState.ACCEPTED  # never sent
    restarted = make_harness(extra="chat: {after_restart: notice}")
    assert await restarted.relay.recover() == 2
    replies = {
        r.conversation.channel: "".join(r.parts) for r in [await restarted.adapter.next_post() for _ in range(2)]
    }
    assert replies["D1"] == NOTICES["restarted"]
    assert "still in the queue" in replies["D2"]
    assert len(chat_calls(emulator)) == 2
    # The restarted notice, too, clears a working signal the dead run may have left.
    assert ("exit", "1") in restarted.adapter.working_events


async def test_answers_in_one_conversation_never_overlap(make_harness, emulator: Emulator) -> None:
    h = make_harness()
    emulator.latency = 0.1  # every chat call takes at least this long to answer
    dms = [msg(f"question {n}", id=str(n), channel="D1", is_dm=True) for n in range(5)]
    outcomes = await asyncio.gather(*(h.relay.handle(m) for m in dms))
    assert all(o is Outcome.ANSWERED for o in outcomes)
    arrivals = [r.time for r in chat_calls(emulator)]
    # One at a time: each call leaves only after the previous answer came back.
    assert all(later - earlier >= 0.09 for earlier, later in itertools.pairwise(arrivals)), arrivals
    assert len(h.store._locks) == 0  # nothing left behind


async def test_a_replica_that_stops_hands_its_unfinished_answers_over_at_once(
    emulator: Emulator, redis_url: str, redis_prefix: str
) -> None:
    from bridge.store.redis import RedisStore

    settings = settings_for(emulator.base_url)
    stopping = Harness(settings, RedisStore(redis_url, prefix=redis_prefix))  # type: ignore[arg-type]
    other = Harness(settings, RedisStore(redis_url, prefix=redis_prefix))  # type: ignore[arg-type]
    emulator.inject("hang", seconds=30, path_contains="/chat", count=1)
    task = stopping.relay.submit(msg("cut short by a deploy", channel="D1", is_dm=True))
    await asyncio.sleep(0.2)
    late = msg("arrived while stopping", id="2", channel="D2", is_dm=True)
    await stopping.relay.drain(grace=0.2)
    assert task.cancelled()
    assert await stopping.relay.handle(late) is Outcome.DEFERRED  # stored, and not kept by a stopping replica
    # The other replica takes both now, not when a 60 s lease would have run out.
    assert await other.relay.recover() == 2
    replies = {"".join((await other.adapter.next_post()).parts) for _ in range(2)}
    assert any("cut short by a deploy" in r for r in replies) and any("arrived while stopping" in r for r in replies)
    for h in (stopping, other):
        await h.close()
        await h.store.close()


async def test_the_message_line_carries_its_fields_as_json_keys(make_harness, emulator: Emulator) -> None:
    """logging.format: json: per-message fields are keys a log pipeline can filter on, not text in "message"."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    relay_log = logging.getLogger("bridge.relay")
    relay_log.addHandler(handler)
    previous = relay_log.level
    relay_log.setLevel(logging.INFO)
    try:
        h = make_harness()
        assert await h.relay.handle(msg("What is the refund policy?", mentions_bot=True)) is Outcome.ANSWERED
    finally:
        relay_log.removeHandler(handler)
        relay_log.setLevel(previous)
    [line] = [json.loads(text) for text in stream.getvalue().splitlines() if '"outcome"' in text]
    assert line["outcome"] == "answered" and line["platform"] == "slack" and line["channel"] == "C1"
    assert line["route"] == "routes[0]" and line["chatbot"] and line["job"]
    assert isinstance(line["latency_ms"], int)
