"""The weekly digest: at the configured weekday and hour, the week's report is queued once for its channels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from bridge.clock import Clock
from bridge.config import WEEKDAYS, DigestSettings, Settings
from bridge.facts import FactLog
from bridge.report import gather_report, zone_of
from bridge.store import DAY, NewDelivery, Store, StoreError

log = logging.getLogger(__name__)

CHECK_EVERY = 60.0  # seconds between checks: a digest goes out within a minute of its time
WEEK = 7 * DAY
# After downtime a digest still goes out this long after its time (covering the same week);
# later than that the week is skipped: a digest a day late is news, one four days late is noise.
LATE_LIMIT = DAY
KEY_TTL = 14 * DAY  # "this week's digest was queued" outlives the lateness window by far


def scheduled_at(now: float, digest: DigestSettings, timezone: str) -> float:
    """The latest scheduled time at or before `now`: the weekday and hour on the wall clock of `timezone`.

    On the wall clock, so 09:00 stays 09:00 across daylight saving time.
    """
    local = datetime.fromtimestamp(now, zone_of(timezone))
    back = (local.weekday() - WEEKDAYS.index(digest.weekday)) % 7
    due = (local - timedelta(days=back)).replace(hour=digest.hour, minute=0, second=0, microsecond=0)
    if due > local:
        due = (local - timedelta(days=back + 7)).replace(hour=digest.hour, minute=0, second=0, microsecond=0)
    return due.timestamp()


def week_key(due: float, timezone: str) -> str:
    """One key per scheduled digest (its local date): queued once, whichever replica or run gets there first."""
    return "digest:" + datetime.fromtimestamp(due, zone_of(timezone)).date().isoformat()


class DigestScheduler:
    """Checks every minute whether a digest is due, and queues it through the store's exactly-once intake.

    Every replica checks; the store's intake takes the week's key once (across replicas and
    restarts), so only one queues the deliveries, and the outbox posts them, retrying through
    a platform's outage.
    """

    def __init__(
        self,
        settings: Settings,
        digest: DigestSettings,
        store: Store,
        facts: FactLog,
        clock: Clock,
        *,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._digest = digest
        self._timezone = settings.report.timezone
        self._names = {bot.id: bot.name for bot in settings.chatbots if bot.name}
        self._store = store
        self._facts = facts
        self._clock = clock
        self._on_queued = on_queued
        self._checked = 0.0  # the scheduled time this process already took care of
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._digest.charts:
            from bridge.charts import available

            if not available():
                log.info("the weekly digest goes out as text: its charts need pip install 'insitechat-bridge[charts]'")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="digest")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def check(self) -> bool:
        """Queue the digest if one is due and nobody queued it yet; True when this call queued it."""
        now = self._clock.time()
        due = scheduled_at(now, self._digest, self._timezone)
        if due == self._checked or now - due > LATE_LIMIT:
            return False
        await self._facts.flush()  # this replica's last facts belong to the week too
        report = await gather_report(
            self._store, since=due - WEEK, until=due, names=self._names, timezone=self._timezone
        )
        key = week_key(due, self._timezone)
        payload = {"kind": "digest", "report": report.to_json(), "charts": self._digest.charts}
        deliveries = [NewDelivery(f"{key}|{address}", address, payload) for address in self._digest.to]
        queued = await self._store.accept([key], deliveries, ttl=KEY_TTL)
        self._checked = due
        if queued:
            log.info("weekly digest %s queued for %s", key, ", ".join(self._digest.to))
            self._on_queued()
        return queued

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except StoreError as exc:
                log.error("the weekly digest could not be queued: %s; trying again in a minute", exc)
            except Exception:
                log.exception("the weekly digest could not be queued; trying again in a minute")
            await self._clock.sleep(CHECK_EVERY)
