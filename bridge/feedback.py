"""Votes on answers: 👍 / 👎 under each answer, one per person and answer, and a 👎 as an answer.flagged alert."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge import metrics
from bridge.alerts import FLAGGED, Event
from bridge.cards import cut
from bridge.clock import Clock
from bridge.config import ReplyMode, Settings
from bridge.desk import ALERT_TTL, AlertDesk
from bridge.facts import FactLog
from bridge.messages import Inbound
from bridge.store import ChatJob, FactKind, Store, StoreError

log = logging.getLogger(__name__)

VOTE = "vote"  # store kind: "<job id>|<voter>" -> StoredVote, the person's last vote on that answer
VOTE_TTL = ALERT_TTL  # as long as the flagged answer's alert
REASON_LIMIT = 500  # characters of a 👎's reason kept (the modals allow as many)
_CAS_TRIES = 20  # only one person's clicks on one answer ever collide


class Vote(str, enum.Enum):
    UP = "up"
    DOWN = "down"


class VoteResult(enum.Enum):
    """What a click on 👍 / 👎 came to; each has one text the voter reads."""

    RECORDED = "recorded"  # a first vote, or a changed one
    UNCHANGED = "unchanged"  # the same vote again (a double click)
    STALE = "stale"  # the answer is no longer known (its job expired) or is not from this platform
    FAILED = "failed"  # the store failed: clicking again may work


TEXTS = {
    (VoteResult.RECORDED, Vote.UP): "Thanks for the feedback: glad it helped!",
    (VoteResult.RECORDED, Vote.DOWN): "Thanks for the feedback: the team that looks after the chatbot will see "
    "this answer.",
    (VoteResult.UNCHANGED, Vote.UP): "You already gave this answer a 👍.",
    (VoteResult.UNCHANGED, Vote.DOWN): "You already gave this answer a 👎: the team will see it.",
}
STALE_TEXT = "This answer is too old to rate now."
FAILED_TEXT = "Something went wrong while recording that. Please try again."
REASON_THANKS = "Thanks: your reason was added for the team."
REASON_TITLE = "What was wrong?"  # the 👎 modal's title and field, the same on every platform
REASON_LABEL = "What was wrong with this answer? (optional)"
REASON_PLACEHOLDER = "Wrong, out of date, not what I asked…"


def thanks_for(reason: str) -> str:
    """What the voter reads after the 👎 modal: thanks for the reason, or for the 👎 when they gave none."""
    return REASON_THANKS if reason.strip() else TEXTS[(VoteResult.RECORDED, Vote.DOWN)]


@dataclass(frozen=True)
class VoteOutcome:
    """A click's result; `changed_from` is the vote it replaced."""

    result: VoteResult
    vote: Vote
    changed_from: Vote | None = None

    @property
    def text(self) -> str:
        """What the voter reads (only they)."""
        if self.result is VoteResult.STALE:
            return STALE_TEXT
        if self.result is VoteResult.FAILED:
            return FAILED_TEXT
        return TEXTS[(self.result, self.vote)]


@dataclass(frozen=True)
class StoredVote:
    """One person's vote on one answer, as stored."""

    vote: Vote
    at: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"vote": self.vote.value, "at": self.at, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredVote:
        return cls(Vote(data["vote"]), float(data.get("at") or 0.0), str(data.get("reason") or ""))


def flagged_key(chatbot: str, job_id: str) -> str:
    """The semantic key of an answer's answer.flagged alert: one card per answer."""
    return Event(FLAGGED, chatbot, None, {"job": job_id}).semantic_key


class Feedback:
    """The one place that decides about votes, for every platform (adapters only render and translate).

    The outbox asks `offered` before it posts an answer (the buttons carry the answer's job
    id); an adapter turns a click into `vote` and a 👎's modal into `reason`, and shows the
    outcome's text. A vote is a store record per (answer, person), changed by compare-and-set,
    so every replica and every restart sees one vote per person: the last.
    """

    def __init__(
        self, settings: Settings, store: Store, clock: Clock, *, desk: AlertDesk | None, facts: FactLog | None
    ) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._desk = desk
        self._facts = facts

    def offered(self, inbound: Inbound) -> bool:
        """Whether the answer to `inbound` carries 👍 / 👎: its route wants them (`routes[].feedback`)."""
        route = self._settings.route_for(inbound.platform, inbound.workspace, inbound.channel, inbound.is_dm)
        return route is not None and route.feedback and route.reply is not ReplyMode.OFF

    async def vote(self, job_id: str, voter: str, vote: Vote, *, platform: str, who: str = "") -> VoteOutcome:
        """`voter` (a platform user id) clicked `vote` under the answer of job `job_id`; `who` names them on cards.

        A 👎 raises the answer's answer.flagged alert at the click (where a rule routes it), so
        nothing is lost when the reason's modal is dismissed; a second 👎, by anyone, raises nothing new.
        """
        try:
            job = await self._store.get_job(job_id)
            if job is None or job.place.platform != platform:
                return VoteOutcome(VoteResult.STALE, vote)
            before = await self._change(job_id, voter, lambda old: self._replaced(old, vote))
        except StoreError as exc:
            log.error("a vote on %s could not be recorded: %s", job_id, exc)
            return VoteOutcome(VoteResult.FAILED, vote)
        route = self._route(job)
        previous = before.vote if before is not None else None
        # Also on a repeated 👎: a card the first click could not store is raised now (the desk dedupes).
        # Before the vote is counted, so that a counted 👎 has its card stored.
        flagged = vote is not Vote.DOWN or await self._flag(job, voter, who or voter, route)
        if previous is not vote:
            metrics.VOTES.labels(job.chatbot, route, vote.value).inc()
            if previous is not None:
                metrics.VOTE_CHANGES.labels(job.chatbot, route, previous.value).inc()
            if self._facts is not None:
                # The report counts the last vote of each person: a later fact replaces this one.
                self._facts.note(FactKind.VOTE, job.id, chatbot=job.chatbot, route=route, actor=voter, value=vote.value)
            was = f", was {previous.value}" if previous is not None else ""
            log.info("vote %s on %s (%s) by %s%s", vote.value, job.id, job.chatbot, voter, was)
        if not flagged:
            return VoteOutcome(VoteResult.FAILED, vote, previous)  # the vote stands; clicking again raises the card
        result = VoteResult.UNCHANGED if previous is vote else VoteResult.RECORDED
        return VoteOutcome(result, vote, previous)

    async def reason(self, job_id: str, voter: str, text: str, *, platform: str, who: str = "") -> VoteOutcome:
        """The reason `voter` gave in the 👎 modal: kept with their vote and added to the answer's card.

        Submitting it is a 👎 (recorded if the click's was not); an empty reason changes nothing more.
        """
        outcome = await self.vote(job_id, voter, Vote.DOWN, platform=platform, who=who)
        reason = cut(" ".join(text.split()), REASON_LIMIT)
        if outcome.result in (VoteResult.STALE, VoteResult.FAILED) or not reason:
            return outcome
        try:
            job = await self._store.get_job(job_id)
            await self._change(job_id, voter, lambda old: StoredVote(Vote.DOWN, self._clock.time(), reason))
            if job is not None and self._desk is not None:
                alert_id = await self._desk.current_alert(flagged_key(job.chatbot, job.id))
                if alert_id:
                    await self._desk.add_reason(alert_id, who or voter, reason)
        except StoreError as exc:
            log.error("the reason for a 👎 on %s could not be recorded: %s", job_id, exc)
            return VoteOutcome(VoteResult.FAILED, Vote.DOWN)
        return outcome

    def _replaced(self, old: StoredVote | None, vote: Vote) -> StoredVote:
        """The person's vote after a click: the same vote keeps its reason, a changed one starts without."""
        if old is not None and old.vote is vote:
            return old
        return StoredVote(vote, self._clock.time())

    async def _change(
        self, job_id: str, voter: str, make: Callable[[StoredVote | None], StoredVote]
    ) -> StoredVote | None:
        """Store `make(previous)` as the person's vote, atomically; returns the previous vote."""
        key = f"{job_id}|{voter}"
        for _ in range(_CAS_TRIES):
            found = await self._store.get_versioned(VOTE, key)
            old = StoredVote.from_json(found.value) if found is not None else None
            new: StoredVote = make(old)
            if old is not None and old.vote is new.vote and old.reason == new.reason:
                return old  # nothing to write
            if await self._store.put_if(
                VOTE, key, new.to_json(), revision=found.revision if found else None, ttl=VOTE_TTL
            ):
                return old
        raise StoreError(f"the vote {key} kept changing under concurrent clicks")

    async def _flag(self, job: ChatJob, voter: str, who: str, route: str) -> bool:
        """Raise the answer's answer.flagged alert unless it was raised before; False when it could not be stored."""
        if self._desk is None:
            return True
        inbound = job.inbound
        data = {
            "job": job.id,
            "conversation": job.conversation,
            "route": route,
            # Gone after state.keep_text_hours: the card then says so instead of quoting them.
            "message": inbound.text.strip() if inbound is not None else "",
            "answer": job.reply,
            "flagged_by": who,
            "reasons": [],
        }
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        try:
            alert_id = await self._desk.raise_flagged(Event(FLAGGED, job.chatbot, now, data))
        except StoreError as exc:
            log.error("the answer.flagged alert for %s could not be stored: %s", job.id, exc)
            return False
        if alert_id is None:
            return True  # flagged before: its card stands
        metrics.FLAGGED.labels(job.chatbot, route).inc()
        if alert_id and self._facts is not None:
            self._facts.note(FactKind.FLAGGED, job.id, chatbot=job.chatbot, route=route, actor=voter)
        return True

    def _route(self, job: ChatJob) -> str:
        place = job.place
        is_dm = job.inbound.is_dm if job.inbound is not None else not place.thread
        return self._settings.route_name(place.platform, place.workspace, place.channel, is_dm)
