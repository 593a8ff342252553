"""Prometheus metrics: what the bridge counts, in one place, served at /metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

MESSAGES = Counter(
    "insitechat_bridge_messages_total",
    "Inbound chat messages by platform and how they ended (answered, notice, ignored, duplicate...).",
    ["platform", "outcome"],
)
ANSWERS = Counter(
    "insitechat_bridge_answers_total",
    "The chatbot's answers by chatbot and whether it knew one (answered) or gave its fallback message (unanswered).",
    ["chatbot", "result"],
)
VOTES = Counter(
    "insitechat_bridge_feedback_votes_total",
    "Votes on answers by chatbot, route (routes[N]) and vote (up, down). A changed vote counts its new vote here and "
    "the one taken back in insitechat_bridge_feedback_vote_changes_total: the votes standing are this minus that.",
    ["chatbot", "route", "vote"],
)
VOTE_CHANGES = Counter(
    "insitechat_bridge_feedback_vote_changes_total",
    "Votes taken back because the voter changed their mind, by the vote taken back (up, down).",
    ["chatbot", "route", "vote"],
)
FLAGGED = Counter(
    "insitechat_bridge_answers_flagged_total",
    "Answers that got their first 👎 (one answer.flagged alert each, where a rule routes it), by chatbot and route.",
    ["chatbot", "route"],
)
DEDUPE_HITS = Counter(
    "insitechat_bridge_dedupe_hits_total", "Deliveries recognised as duplicates.", ["source"]
)
INSITECHAT_SECONDS = Histogram(
    "insitechat_bridge_insitechat_request_seconds",
    "InsiteChat API request latency by endpoint.",
    ["endpoint"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
INSITECHAT_RESPONSES = Counter(
    "insitechat_bridge_insitechat_responses_total",
    "InsiteChat API responses by endpoint and status code ('network' when none came).",
    ["endpoint", "status"],
)
LIMITER_WAIT = Histogram(
    "insitechat_bridge_limiter_wait_seconds",
    "Time requests waited in the rate limiter.",
    buckets=(0.001, 0.01, 0.1, 1, 5, 15, 30, 60, 120),
)
INSITECHAT_CIRCUIT = Gauge(
    "insitechat_bridge_insitechat_circuit",
    "InsiteChat client state per API key: 1 for its state now (closed, half-open, open, quota), 0 for the others.",
    ["key", "state"],
)
CIRCUIT_STATES = ("closed", "half-open", "open", "quota")
LIMITER_QUEUE = Gauge("insitechat_bridge_limiter_queue_depth", "Requests waiting in the rate limiter.", ["key"])
WEBHOOKS = Counter(
    "insitechat_bridge_webhooks_total",
    "Webhook requests by result (accepted, duplicate, refused-<status>...).",
    ["result"],
)
OUTBOX_DEPTH = Gauge("insitechat_bridge_outbox_depth", "Deliveries (alert cards, chat replies) not yet done.")
OUTBOX_OLDEST = Gauge("insitechat_bridge_outbox_oldest_seconds", "Age of the oldest undelivered item (0 if none).")
DELIVERIES = Counter(
    "insitechat_bridge_alert_deliveries_total",
    "Outbox delivery attempts by platform and result.",
    ["platform", "result"],
)
CHAT_JOBS = Gauge(
    "insitechat_bridge_chat_jobs", "Stored chat jobs by state (texts dropped after the keep window).", ["state"]
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render() -> bytes:
    """The whole registry in the Prometheus text format."""
    return generate_latest()
