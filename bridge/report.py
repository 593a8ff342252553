"""The report: per chatbot, what was asked, voted, flagged and escalated, and how fast people took up its alerts."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from bridge.alerts import ESCALATED, HUMAN_REQUESTED
from bridge.desk import ALERT_TTL
from bridge.store import DAY, FACTS_KEPT, Fact, FactKind

# Which raised alerts count as what. An escalation is InsiteChat's own (the visitor asked for a
# human on the website); a human request is the bridge's "Talk to a human" button in Slack/Discord.
ESCALATION_EVENTS = frozenset({ESCALATED})
HUMAN_REQUEST_EVENTS = frozenset({HUMAN_REQUESTED})
TEST_EVENT = "webhook.test"  # `send-test-alert`: never counted
# An alert's card can be claimed and resolved for as long as its record lives: older ones are not "open".
OPEN_HORIZON = ALERT_TTL
# Time-to-claim buckets for the chart: alerts claimed within 1 min, 5 min, 15 min, 1 h, 4 h, later.
CLAIM_BUCKETS = (60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
CLAIM_BUCKET_LABELS = ("<1m", "1-5m", "5-15m", "15-60m", "1-4h", ">4h")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}


def parse_duration(text: str) -> float:
    """"7d", "24h", "90m", "2w" as seconds; ValueError (plainly worded) for anything else or beyond the kept facts."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 7d, 24h, 90m or 2w")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r}: the duration must be more than zero")
    if seconds > FACTS_KEPT:
        raise ValueError(f"{text!r}: the bridge keeps {FACTS_KEPT / DAY:.0f} days of facts; ask for that or less")
    return seconds


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least p (0-1) of all values at or below it.

    Median = percentile(values, 0.5): for an even count, the lower of the two middle values.
    None when there are no values.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Durations:
    """How long something took, over `count` alerts (seconds)."""

    count: int = 0
    median: float | None = None
    p90: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Durations:
        return cls(len(values), percentile(values, 0.5), percentile(values, 0.9))


@dataclass(frozen=True)
class ChatbotFigures:
    """One chatbot's figures over the report's window."""

    chatbot: str
    name: str = ""  # from the config's chatbots[], when it names one
    questions: int = 0  # answers the chatbot gave (known and unanswered)
    unanswered: int = 0  # of which with its fallback message (a knowledge gap)
    votes_up: int = 0
    votes_down: int = 0
    flagged: int = 0  # answers that became answer.flagged alerts
    escalations: int = 0  # conversation.escalated alerts raised
    human_requests: int = 0  # bridge.human_requested alerts raised ("Talk to a human")
    alerts: int = 0  # every alert raised, of any event
    to_claim: Durations = field(default_factory=Durations)
    to_resolve: Durations = field(default_factory=Durations)
    open_alerts: int = 0  # raised within OPEN_HORIZON before the end, not resolved by then
    per_day: tuple[int, ...] = ()  # questions on each of Report.days
    claim_buckets: tuple[int, ...] = ()  # alerts claimed within each CLAIM_BUCKETS step (last: later)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.chatbot})" if self.name else self.chatbot

    @property
    def unanswered_rate(self) -> float | None:
        return self.unanswered / self.questions if self.questions else None


@dataclass(frozen=True)
class Report:
    """Every chatbot's figures from `since` to `until` (epoch seconds); days in `timezone`."""

    since: float
    until: float
    timezone: str
    days: tuple[str, ...]  # ISO dates from the first to the last day of the window
    chatbots: tuple[ChatbotFigures, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        bots = tuple(
            ChatbotFigures(
                **{
                    **bot,
                    "to_claim": Durations(**bot["to_claim"]),
                    "to_resolve": Durations(**bot["to_resolve"]),
                    "per_day": tuple(bot["per_day"]),
                    "claim_buckets": tuple(bot["claim_buckets"]),
                }
            )
            for bot in data["chatbots"]
        )
        return cls(float(data["since"]), float(data["until"]), str(data["timezone"]), tuple(data["days"]), bots)


@dataclass
class _Alert:
    raised: float
    chatbot: str
    event: str
    claimed: float | None = None
    resolved: float | None = None


def build_report(
    facts: Iterable[Fact],
    *,
    since: float,
    until: float,
    names: Mapping[str, str] | None = None,
    timezone: str = "UTC",
) -> Report:
    """The figures of the facts noted in [since, until).

    Alerts are those raised in the window: time to claim = the first claim - raised (a Resolve
    without a Claim counts as the claim), time to resolve = resolved - raised, each over the
    alerts that got there before `until`. "Open" looks further back: every alert raised within
    OPEN_HORIZON before `until` and not resolved by then. Votes count where the vote (a person's
    last) fell in the window. `facts` must reach back to `until - OPEN_HORIZON` for "open".
    """
    names = names or {}
    zone = zone_of(timezone)
    days = _days(since, until, zone)
    day_index = {day: i for i, day in enumerate(days)}
    answers_of: dict[str, str] = {}  # job id -> chatbot: for votes and flags noted without one
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    per_day: dict[str, list[int]] = defaultdict(lambda: [0] * len(days))
    alerts: dict[str, _Alert] = {}
    for fact in facts:
        if fact.at >= until:
            continue
        kind = fact.kind
        if kind in (FactKind.ANSWERED, FactKind.UNANSWERED):
            answers_of[fact.subject] = fact.chatbot
            if fact.at < since:
                continue
            counts[fact.chatbot]["questions"] += 1
            counts[fact.chatbot]["unanswered"] += kind is FactKind.UNANSWERED
            day = datetime.fromtimestamp(fact.at, zone).date().isoformat()
            per_day[fact.chatbot][day_index[day]] += 1
        elif kind in (FactKind.VOTE, FactKind.FLAGGED):
            if fact.at < since:
                continue
            chatbot = fact.chatbot or answers_of.get(fact.subject, "")
            if kind is FactKind.FLAGGED:
                counts[chatbot]["flagged"] += 1
            elif fact.value in ("up", "down"):
                counts[chatbot][f"votes_{fact.value}"] += 1
        elif kind is FactKind.ALERT_RAISED:
            if fact.value != TEST_EVENT:
                alerts.setdefault(fact.subject, _Alert(fact.at, fact.chatbot, fact.value))
        elif fact.subject in alerts:  # claimed or resolved: the earliest counts
            alert = alerts[fact.subject]
            if kind is FactKind.ALERT_RESOLVED:
                alert.resolved = fact.at if alert.resolved is None else min(alert.resolved, fact.at)
            alert.claimed = fact.at if alert.claimed is None else min(alert.claimed, fact.at)
    to_claim: dict[str, list[float]] = defaultdict(list)
    to_resolve: dict[str, list[float]] = defaultdict(list)
    for alert in alerts.values():
        c = counts[alert.chatbot]
        if alert.resolved is None and alert.raised >= until - OPEN_HORIZON:
            c["open_alerts"] += 1
        if alert.raised < since:
            continue
        c["alerts"] += 1
        c["escalations"] += alert.event in ESCALATION_EVENTS
        c["human_requests"] += alert.event in HUMAN_REQUEST_EVENTS
        if alert.claimed is not None:
            to_claim[alert.chatbot].append(alert.claimed - alert.raised)
        if alert.resolved is not None:
            to_resolve[alert.chatbot].append(alert.resolved - alert.raised)
    seen = [bot for bot, c in counts.items() if any(c.values())]  # not one whose alerts were all resolved before
    chatbots = sorted(seen, key=lambda bot: (names.get(bot, "") or "~", bot))
    return Report(
        since,
        until,
        timezone,
        days,
        tuple(
            ChatbotFigures(
                chatbot=bot,
                name=names.get(bot, ""),
                **{name: counts[bot][name] for name in _COUNTED},
                to_claim=Durations.of(to_claim[bot]),
                to_resolve=Durations.of(to_resolve[bot]),
                per_day=tuple(per_day[bot]),
                claim_buckets=_buckets(to_claim[bot]),
            )
            for bot in chatbots
        ),
    )


_COUNTED = (
    "questions", "unanswered", "votes_up", "votes_down", "flagged", "escalations", "human_requests", "alerts",
    "open_alerts",
)


class ReadsFacts(Protocol):
    """Where the report reads: a store, or a state file opened read-only (bridge.store.sqlite.FactsReader)."""

    async def facts_since(self, since: float) -> list[Fact]: ...


async def gather_report(
    facts: ReadsFacts, *, since: float, until: float, names: Mapping[str, str] | None = None, timezone: str = "UTC"
) -> Report:
    """The report from a store's facts (read back far enough for the alerts still open)."""
    kept = await facts.facts_since(min(since, until - OPEN_HORIZON))
    return build_report(kept, since=since, until=until, names=names, timezone=timezone)


def zone_of(name: str) -> tzinfo:
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


def _days(since: float, until: float, zone: tzinfo) -> tuple[str, ...]:
    first = datetime.fromtimestamp(since, zone).date()
    last = datetime.fromtimestamp(max(since, until - 1e-3), zone).date()
    return tuple((first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1))


def _buckets(values: Sequence[float]) -> tuple[int, ...]:
    counts = [0] * (len(CLAIM_BUCKETS) + 1)
    for value in values:
        counts[next((i for i, edge in enumerate(CLAIM_BUCKETS) if value < edge), len(CLAIM_BUCKETS))] += 1
    return tuple(counts)


# --- text ----------------------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    """45s, 12m, 3h 05m, 2d 4h; "-" for none."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < DAY:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def window_text(report: Report) -> str:
    zone = zone_of(report.timezone)
    start, end = (datetime.fromtimestamp(t, zone).strftime("%Y-%m-%d %H:%M") for t in (report.since, report.until))
    return f"{start} to {end} {report.timezone} ({duration_text(report.until - report.since)})"


def figure_lines(bot: ChatbotFigures) -> list[tuple[str, str]]:
    """(label, value) pairs of one chatbot, shared by the terminal and the platforms' digests."""
    rate = bot.unanswered_rate
    unanswered = f"{bot.unanswered} ({rate:.0%})" if rate is not None else "0"
    return [
        ("Questions answered", str(bot.questions)),
        ("Unanswered", unanswered),
        ("Votes", f"👍 {bot.votes_up}  👎 {bot.votes_down}"),
        ("Flagged answers", str(bot.flagged)),
        ("Escalations", str(bot.escalations)),
        ("Human requests", str(bot.human_requests)),
        ("Time to claim", _durations_text(bot.to_claim, bot.alerts, "claimed")),
        ("Time to resolve", _durations_text(bot.to_resolve, bot.alerts, "resolved")),
        ("Alerts still open", str(bot.open_alerts)),
    ]


def _durations_text(d: Durations, alerts: int, done: str) -> str:
    """"median 2m, p90 10m (4 of 5 alerts claimed)"; "-" when none got there."""
    if not d.count:
        return f"- (none of {alerts} alerts {done})" if alerts else "-"
    return f"median {duration_text(d.median)}, p90 {duration_text(d.p90)} ({d.count} of {alerts} alerts {done})"


def render_text(report: Report) -> str:
    """The report for a terminal: one block per chatbot."""
    lines = [f"InsiteChat bridge report: {window_text(report)}"]
    if not report.chatbots:
        lines += ["", "Nothing happened in this window: no answers, votes or alerts."]
    for bot in report.chatbots:
        lines += ["", bot.label]
        lines += [f"  {label + ':':<20} {value}" for label, value in figure_lines(bot)]
    return "\n".join(lines) + "\n"


def day_label(iso: str) -> str:
    """"Mon 24" for a chart's axis."""
    return date.fromisoformat(iso).strftime("%a %d")
