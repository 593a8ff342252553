"""What the bridge keeps across restarts, as small protocols by concern; every backend fits all of them.

Each read-modify-write is one explicit atomic operation (a transaction, an increment, a
compare-and-set), so that a networked backend is exactly as safe as the embedded one.
Every failure of the backend itself is raised as `StoreError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from bridge.store.records import (
    DAY,
    ChatJob,
    Fact,
    JobState,
    NewDelivery,
    NewJob,
    NewRecord,
    OutboxItem,
    RecordRef,
    Versioned,
)


class StoreError(Exception):
    """The state store failed (disk, lock, server): the operation did not happen, or not all of it."""


class ConversationState(Protocol):
    """Threads the bot takes part in, and each conversation's session generation."""

    async def follow(self, conversation: str, ttl: float = 30 * DAY) -> None:
        """Remember that the bot takes part in this thread, so follow-ups need no mention.

        For at least `ttl` minus a thirtieth of it after the latest call: a backend may skip
        rewriting an expiry that is that fresh (SQLite does: a commit less per answer).
        """

    async def is_followed(self, conversation: str) -> bool: ...

    async def generation(self, conversation: str) -> int:
        """The conversation's session generation; a reset increments it (fresh InsiteChat memory).

        While this process holds the conversation's lock, a backend may answer from what it read
        when it took the lock: bump a generation only while holding that lock (the relay does).
        """

    async def bump_generation(self, conversation: str) -> int:
        """Atomically add one to the generation; returns the new value."""


class Records(Protocol):
    """Small JSON values under (kind, key): alerts, thread references, histories."""

    async def get(self, kind: str, key: str) -> Any | None: ...

    async def get_versioned(self, kind: str, key: str) -> Versioned | None:
        """The value with its revision, for a later `put_if`."""

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None: ...

    async def put_if(self, kind: str, key: str, value: Any, *, revision: int | None, ttl: float | None = None) -> bool:
        """Compare-and-set: store only if the revision is still `revision` (None: only if absent)."""

    async def append(self, kind: str, key: str, values: Sequence[Any], *, keep: int, ttl: float | None = None) -> None:
        """Atomically add `values` to the end of the list under (kind, key) (absent: an empty list), keep its
        last `keep` elements, and store it for `ttl` seconds (None: for good): a new revision, as put.
        ValueError when the record holds something else than a list."""

    async def delete(self, kind: str, key: str) -> None: ...


class EventIntake(Protocol):
    """Webhook events in: dedupe and queue in one step."""

    async def accept(
        self,
        keys: Sequence[str],
        deliveries: Sequence[NewDelivery],
        *,
        ttl: float = DAY,
        records: Sequence[NewRecord] = (),
    ) -> bool:
        """Atomically: unless one of `keys` was seen within its ttl, remember all of them, keep the
        records and queue every delivery. False for a duplicate; StoreError if any part fails."""


class ChatJobs(Protocol):
    """Accepted questions, from the claim to the stored reply. Leases say which process works on one."""

    async def create_job(
        self, job: ChatJob, *, lease: float, lock: bool = False, unless: RecordRef | None = None
    ) -> NewJob:
        """Store a new job, leased to this process; DUPLICATE when a job with its key exists.

        `unless`: a record whose live presence holds the job back (HELD, nothing stored), read in
        the same step: the relay's "a human has this conversation" costs no round trip of its own.

        `lock=True`: in the same step, take the job's conversation lock for this process if it is
        free, so that the worker's `conversation_lock` needs no second trip to a shared backend. A
        lock so taken is freed with the job's delivery (`outbox_done`/`outbox_fail`) or when the
        holder's block ends, whichever comes first; one that nobody enters frees itself within a lease.
        """

    async def job_asked(self, job_id: str) -> None:
        """The InsiteChat call is about to go out (it may be received even if we never hear back)."""

    async def job_answered(self, job: ChatJob, *, lease: float | None = None) -> OutboxItem:
        """Atomically store the reply and queue its delivery (to the job's conversation); returns the item.

        With a `lease`, the item comes back already held for the caller's first attempt (`held`, as if
        `outbox_take` had returned it), so no other worker can take it between the two steps.
        """

    async def get_job(self, job_id: str) -> ChatJob | None: ...

    async def job_by_key(self, key: str) -> tuple[ChatJob, JobState] | None:
        """The job of a platform message and its state (its text may be gone after the keep window)."""

    async def take_over_jobs(self, *, lease: float, limit: int = 100) -> list[ChatJob]:
        """Open jobs (accepted, asked) whose lease ran out, now leased to this process."""

    async def renew_jobs(self, job_ids: Sequence[str], *, lease: float) -> None:
        """Extend this process's leases on jobs it is still working on."""

    async def job_counts(self) -> dict[JobState, int]: ...


class DeliveryQueue(Protocol):
    """Deliveries waiting for a platform: alert cards, card updates, chat replies, notices."""

    async def outbox_add(self, key: str, destination: str, payload: dict[str, Any]) -> bool:
        """Queue a delivery; False if one with this key exists (delivered or not)."""

    async def outbox_due(self, limit: int = 50) -> list[OutboxItem]:
        """Undelivered items due now that nobody holds, oldest first."""

    async def outbox_take(self, item_id: int, *, lease: float) -> OutboxItem | None:
        """Hold an item for one attempt; None when it is held, done or failed. `started` tells whether
        an earlier attempt began (then it may have posted before a crash: look first)."""

    async def outbox_done(self, item_id: int, reference: str) -> None:
        """The platform accepted it; a chat reply's job is delivered with it, and the conversation lock under
        which that reply was stored (`job_answered`) or taken for the job (`create_job(lock=True)`) is freed
        for other processes: the answer is out, the next one may start."""

    async def outbox_retry(self, item_id: int, delay: float, error: str, *, count: bool = True) -> None:
        """Try again after `delay` (and let go of it); `count=False` when the item itself was not attempted."""

    async def outbox_fail(self, item_id: int, error: str) -> None:
        """The platform refused it for good; a chat reply's job fails with it."""

    async def outbox_hasten(self, platform: str) -> int:
        """Make every undelivered item for `platform` due now (it is back); returns how many."""

    async def outbox_depth(self) -> tuple[int, float | None]:
        """Undelivered items and the age in seconds of the oldest one."""


class ConversationLocks(Protocol):
    """One answer at a time per conversation, across every process on the store (InsiteChat keeps one history)."""

    def conversation_lock(self, conversation: str) -> AbstractAsyncContextManager[None]:
        """Held while answering in `conversation`; waits while another holder has it."""


class Facts(Protocol):
    """What happened, kept for the report (answers, votes, alerts) for FACTS_KEPT."""

    async def note_facts(self, facts: Sequence[Fact]) -> None:
        """Keep these facts: one per identity, the first noted unless the fact `replaces` (a changed vote)."""

    async def facts_since(self, since: float) -> list[Fact]:
        """Every kept fact at or after the epoch time `since`, oldest first."""


class Store(ConversationState, Records, EventIntake, ChatJobs, DeliveryQueue, ConversationLocks, Facts, Protocol):
    """Every concern in one backend."""

    owner: str  # this process: the holder of its leases
    # True when one process has the store to itself (SQLite: one per file), so opening it
    # voids every earlier lease; False when live processes share it (Redis): leases are
    # taken over only once they ran out.
    exclusive: bool

    async def prune(self) -> None:
        """Forget what expired, and drop texts kept longer than the keep window."""

    async def ping(self) -> bool:
        """True when the store can write (for readiness)."""

    async def close(self) -> None: ...
