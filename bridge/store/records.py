"""The typed records the store keeps: chat jobs, outbox items, versioned values."""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, fields, replace
from typing import Any

from bridge.messages import Conversation, Inbound

DAY = 86_400.0
LOCK_LEASE = 30.0  # a conversation lock's lease across replicas; renewed every third of it while held
# follow() may leave a thread's stored expiry this share of its TTL behind the latest call
# (a day of 30), so that a follow-up costs no write: the Followed protocol's promise.
FOLLOW_LAG = 1 / 30


class JobState(str, enum.Enum):
    """Where one accepted question stands. Each step is stored before the next begins."""

    ACCEPTED = "accepted"  # stored with its claim, before the platform was told "received"
    ASKED = "asked"  # the InsiteChat call went out (it may have been received)
    ANSWERED = "answered"  # the reply (answer or notice) is stored and queued for delivery
    DELIVERED = "delivered"  # the platform accepted every part
    FAILED = "failed"  # the platform refused for good (channel gone, bot removed)

    @property
    def open(self) -> bool:
        """Still needs a worker: the reply does not exist yet."""
        return self in (JobState.ACCEPTED, JobState.ASKED)


class ReplyKind(str, enum.Enum):
    ANSWER = "answer"
    NOTICE = "notice"


@dataclass(frozen=True)
class ChatJob:
    """One accepted question, from its claim to its delivered reply."""

    id: str
    inbound: Inbound | None  # None once the text is no longer kept (delivered + the keep window)
    key: str  # the platform message identity (Inbound.dedupe_key): one job per key
    conversation: str  # Conversation.key: answers in one conversation keep their order
    chatbot: str
    created_at: float
    state: JobState = JobState.ACCEPTED
    reply: str = ""
    reply_kind: ReplyKind = ReplyKind.ANSWER
    offer_human: bool = False
    asks: int = 0  # InsiteChat calls sent for it (a restart after "asked" may send one more)

    @classmethod
    def new(cls, inbound: Inbound, *, chatbot: str, now: float) -> ChatJob:
        return cls(
            id=uuid.uuid4().hex,
            inbound=inbound,
            key=inbound.dedupe_key,
            conversation=inbound.conversation.key,
            chatbot=chatbot,
            created_at=now,
        )

    @property
    def delivery_key(self) -> str:
        """Marks the reply's posts, so a delivery after a crash can find what was posted."""
        return f"job:{self.id}"

    @property
    def place(self) -> Conversation:
        return Conversation.from_key(self.conversation)

    def answered(self, reply: str, kind: ReplyKind, *, offer_human: bool = False) -> ChatJob:
        return replace(self, state=JobState.ANSWERED, reply=reply, reply_kind=kind, offer_human=offer_human)


# Fields added after 0.1, written only when set: a replica of the version before (a rolling
# deploy) reads every other job as it always did.
_WRITTEN_WHEN_SET = ("own_thread",)
_INBOUND_FIELDS = frozenset(field.name for field in fields(Inbound))


def inbound_to_json(inbound: Inbound) -> dict[str, Any]:
    # Inbound holds only str and bool fields: its __dict__ is the JSON object (dataclasses.asdict
    # deep-copies, which showed in the profile of every answer).
    data = dict(vars(inbound))
    for name in _WRITTEN_WHEN_SET:
        if not data[name]:
            del data[name]
    return data


def inbound_from_json(data: dict[str, Any]) -> Inbound:
    # Fields this version does not know (written by a newer replica mid-deploy) are left out.
    return Inbound(**{name: value for name, value in data.items() if name in _INBOUND_FIELDS})


class NewJob(str, enum.Enum):
    """What `create_job` did with a new job."""

    CREATED = "created"
    DUPLICATE = "duplicate"  # its platform message has a job already
    HELD = "held"  # the record it was held back by exists (a human has the conversation): nothing stored


@dataclass(frozen=True)
class RecordRef:
    """Where a record is kept: its kind and key."""

    kind: str
    key: str


@dataclass(frozen=True)
class OutboxItem:
    """One delivery to make: a payload for one destination, retried until it is done."""

    id: int
    key: str  # unique per (event, destination): adding it twice is a no-op
    destination: str
    payload: dict[str, Any]
    attempts: int
    created_at: float
    next_attempt_at: float
    started: bool = False  # an earlier attempt began: it may have posted before a crash
    held: bool = False  # the caller holds it for this attempt already (job_answered with a lease): no outbox_take


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to queue: `key` unique per (event, destination)."""

    key: str
    destination: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Versioned:
    """A stored value and its revision, for compare-and-set."""

    value: Any
    revision: int


@dataclass(frozen=True)
class NewRecord:
    """A small JSON value to keep under (kind, key), for `ttl` seconds or for good."""

    kind: str
    key: str
    value: Any
    ttl: float | None = None


FACTS_KEPT = 35 * DAY  # what the report can look back on: a month, and the week before it


class FactKind(str, enum.Enum):
    """What happened, for the report. `subject` names the answer (its job id) or the alert."""

    ANSWERED = "answered"  # the chatbot answered (subject: the job)
    UNANSWERED = "unanswered"  # it answered with its fallback message: a knowledge gap
    VOTE = "vote"  # 👍 / 👎 on an answer (actor: the voter; value: "up" or "down"); the last vote counts
    FLAGGED = "flagged"  # an answer became an answer.flagged alert
    ALERT_RAISED = "alert_raised"  # an alert was stored for delivery (value: its event name)
    ALERT_CLAIMED = "alert_claimed"  # the first claim (actor: who)
    ALERT_RESOLVED = "alert_resolved"  # (actor: who)


@dataclass(frozen=True)
class Fact:
    """One thing the report counts. Noted once per identity; a vote replaces the person's earlier one."""

    kind: FactKind
    subject: str
    at: float  # epoch seconds
    chatbot: str = ""
    route: str = ""
    actor: str = ""
    value: str = ""

    @property
    def identity(self) -> str:
        return f"{self.kind.value}|{self.subject}|{self.actor}"

    @property
    def replaces(self) -> bool:
        """A later fact with this identity replaces the stored one (a changed vote); otherwise the first stays."""
        return self.kind is FactKind.VOTE

    def to_json(self) -> str:
        return json.dumps([self.kind.value, self.subject, self.at, self.chatbot, self.route, self.actor, self.value])

    @classmethod
    def from_json(cls, text: str) -> Fact:
        kind, subject, at, chatbot, route, actor, value = json.loads(text)
        return cls(FactKind(kind), subject, float(at), chatbot, route, actor, value)
