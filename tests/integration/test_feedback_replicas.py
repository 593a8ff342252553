"""Votes on Redis: two replicas, concurrent clicks; one vote per person, one flagged card, one flag fact."""

from __future__ import annotations

import asyncio
import io

from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.feedback import Vote, VoteResult, flagged_key
from bridge.messages import Inbound
from bridge.relay import Outcome
from bridge.store import FactKind
from tests.integration.test_slack_alerts import until

BOT = SANDBOX_CHATBOT_ID


def settings_for(emulator: Emulator, redis_url: str, prefix: str) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{KEY}}"}}
state: {{redis_url: "${{REDIS_URL}}", redis_prefix: "{prefix}"}}
server: {{listen: "127.0.0.1:0"}}
console: {{enabled: true}}
routes: [{{platform: console, chatbot: {BOT}}}]
alerts: [{{chatbot: {BOT}, events: [answer.flagged], to: ["console:alerts"]}}]
webhooks: {{verify_signatures: false}}
""",
        env={"KEY": SANDBOX_KEY, "REDIS_URL": redis_url},
    )


async def test_two_replicas_count_one_vote_per_person_and_flag_the_answer_once(
    emulator: Emulator, redis_url: str, redis_prefix: str
) -> None:
    outs = [io.StringIO(), io.StringIO()]
    apps = [
        BridgeApp(settings_for(emulator, redis_url, redis_prefix), console_in=io.StringIO(""), console_out=out)
        for out in outs
    ]
    for app in apps:
        app.console = None  # the console adapter stays (it shows the cards); its empty input must not stop the app
        await app.start()
    first, second = apps
    try:
        question = Inbound("console", "", "console", "q-1", "you", "What is the refund policy?", is_dm=True)
        assert await first.relay.handle(question) is Outcome.ANSWERED
        found = await first.store.job_by_key(question.dedupe_key)
        assert found is not None
        job = found[0].id

        # Concurrent clicks on both replicas: "you" changes their mind twice at once, three people 👎.
        outcomes = await asyncio.gather(
            first.feedback.vote(job, "you", Vote.UP, platform="console"),
            second.feedback.vote(job, "you", Vote.DOWN, platform="console"),
            first.feedback.vote(job, "bob", Vote.DOWN, platform="console"),
            second.feedback.vote(job, "carol", Vote.DOWN, platform="console"),
            second.feedback.vote(job, "dave", Vote.DOWN, platform="console"),
        )
        assert all(o.result is VoteResult.RECORDED for o in outcomes)
        mine = await first.store.get("vote", f"{job}|you")
        assert mine["vote"] in ("up", "down")
        alert = await second.desk.current_alert(flagged_key(BOT, job))
        assert alert is not None

        async def cards_shown() -> int:
            await asyncio.gather(*(app.outbox.deliver_due() for app in apps))
            return sum(out.getvalue().count("alert> 👎 An answer was flagged") for out in outs)

        await until(cards_shown)
        for app in apps:
            await app.facts.flush()
        facts = [f for f in await first.store.facts_since(0) if f.subject == job]
        assert len([f for f in facts if f.kind is FactKind.FLAGGED]) == 1
        assert {f.actor for f in facts if f.kind is FactKind.VOTE} == {"you", "bob", "carol", "dave"}
        assert await cards_shown() == 1
    finally:
        for app in apps:
            await app.stop()
