"""The report's figures on a seeded store (SQLite and Redis), checked against numbers computed by hand."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.clock import ManualClock
from bridge.report import DAY, ChatbotFigures, Durations, Report, build_report, gather_report, render_text
from bridge.store import ChatJob, Fact, FactKind, SQLiteStore, Store
from bridge.store.redis import RedisStore
from bridge.messages import Inbound

BOT_A = "aaaaaaaa-0000-4000-8000-000000000001"
BOT_B = "bbbbbbbb-0000-4000-8000-000000000002"
UNTIL = 1_796_029_200.0  # Monday 2026-11-30 09:00 UTC
SINCE = UNTIL - 7 * DAY  # Monday 2026-11-23 09:00 UTC
H = 3600.0


def seeded_facts(since: float = SINCE, until: float = UNTIL) -> list[Fact]:
    """A week of two chatbots; the expected figures are worked out by hand in EXPECTED_A / EXPECTED_B."""
    S, T = since, until
    A, B = BOT_A, BOT_B
    raised = FactKind.ALERT_RAISED
    claimed, resolved = FactKind.ALERT_CLAIMED, FactKind.ALERT_RESOLVED
    return [
        # A: four answers in the window (one a gap), one before it, one after it.
        Fact(FactKind.ANSWERED, "j0", S - H, A, "routes[0]"),
        Fact(FactKind.ANSWERED, "j1", S + 1 * H, A, "routes[0]"),
        Fact(FactKind.ANSWERED, "j2", S + 2 * H, A, "routes[0]"),
        Fact(FactKind.ANSWERED, "j3", S + DAY + 1 * H, A, "routes[0]"),
        Fact(FactKind.UNANSWERED, "j4", S + DAY + 2 * H, A, "routes[0]"),
        Fact(FactKind.ANSWERED, "j9", T + H, A, "routes[0]"),
        # Votes: j1 up (u1) and down (u2), j2 up; j3 down noted without its chatbot; j0's vote in the window counts.
        Fact(FactKind.VOTE, "j1", S + 1.5 * H, A, actor="u1", value="up"),
        Fact(FactKind.VOTE, "j1", S + 1.6 * H, A, actor="u2", value="down"),
        Fact(FactKind.VOTE, "j2", S + 2.5 * H, A, actor="u1", value="up"),
        Fact(FactKind.VOTE, "j3", S + DAY + 1.5 * H, "", actor="u3", value="down"),
        Fact(FactKind.VOTE, "j0", S + 3 * DAY, A, actor="u4", value="up"),
        Fact(FactKind.FLAGGED, "j4", S + DAY + 3 * H, A),
        # A's alerts in the window: claim 120 s / resolve 3600 s (a second, later claim changes nothing),
        # claim 600 s (still open), resolve without a claim 300 s, claim 30 s / resolve 7200 s.
        Fact(raised, "a1", S + 3 * H, A, value="conversation.escalated"),
        Fact(claimed, "a1", S + 3 * H + 120, A, actor="ana"),
        Fact(claimed, "a1", S + 3 * H + 900, A, actor="ben"),
        Fact(resolved, "a1", S + 3 * H + 3600, A, actor="ana"),
        Fact(raised, "a2", S + 4 * H, A, value="bridge.human_requested"),
        Fact(claimed, "a2", S + 4 * H + 600, A, actor="ben"),
        Fact(raised, "a3", S + 5 * H, A, value="conversation.escalated"),
        Fact(resolved, "a3", S + 5 * H + 300, A, actor="ana"),
        Fact(raised, "a4", S + 6 * H, A, value="answer.unanswered"),
        Fact(claimed, "a4", S + 6 * H + 30, A, actor="ana"),
        Fact(resolved, "a4", S + 6 * H + 7200, A, actor="ana"),
        # A test alert (never counted); an escalation two days before the window, still open;
        # one 31 days back, past the alerts' 30-day life (not open any more); one resolved after `until`.
        Fact(raised, "t1", S + 7 * H, A, value="webhook.test"),
        Fact(raised, "a0", S - 2 * DAY, A, value="conversation.escalated"),
        Fact(raised, "a7", T - 31 * DAY, A, value="lead.captured"),
        Fact(raised, "a8", S + 2 * DAY, A, value="lead.captured"),
        Fact(resolved, "a8", T + 2 * H, A, actor="ana"),
        # B: three answers on the fourth day, two of them gaps.
        Fact(FactKind.ANSWERED, "k1", S + 3 * DAY, B, "routes[1]"),
        Fact(FactKind.UNANSWERED, "k2", S + 3 * DAY + H, B, "routes[1]"),
        Fact(FactKind.UNANSWERED, "k3", S + 3 * DAY + 2 * H, B, "routes[1]"),
    ]


EXPECTED_A = ChatbotFigures(
    chatbot=BOT_A,
    name="Support Bot",
    questions=4,
    unanswered=1,
    votes_up=3,  # j1 u1, j2 u1, j0 u4
    votes_down=2,  # j1 u2, j3 u3 (its chatbot found from the answer)
    flagged=1,
    escalations=2,  # a1, a3
    human_requests=1,  # a2
    alerts=5,  # a1, a2, a3, a4, a8 (not the test alert, not a0 from before the window)
    # claims [30, 120, 300, 600]: nearest rank ceil(0.5*4)=2 -> 120, ceil(0.9*4)=4 -> 600
    to_claim=Durations(4, 120.0, 600.0),
    # resolves [300, 3600, 7200] (a8's resolve came after `until`): ranks 2 -> 3600, 3 -> 7200
    to_resolve=Durations(3, 3600.0, 7200.0),
    open_alerts=3,  # a2 and a0; a8 (resolved only after `until`); not a7 (31 days) nor t1 (a test)
    per_day=(2, 2, 0, 0, 0, 0, 0, 0),  # 23 Nov: j1, j2; 24 Nov: j3, j4
    claim_buckets=(1, 1, 2, 0, 0, 0),  # 30 s; 120 s; 300 s and 600 s (5-15 min)
)
EXPECTED_B = ChatbotFigures(
    chatbot=BOT_B,
    questions=3,
    unanswered=2,
    to_claim=Durations(0, None, None),
    to_resolve=Durations(0, None, None),
    per_day=(0, 0, 0, 3, 0, 0, 0, 0),
    claim_buckets=(0, 0, 0, 0, 0, 0),
)
DAYS = ("2026-11-23", "2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27", "2026-11-28", "2026-11-29", "2026-11-30")


def test_the_figures_of_a_seeded_week_match_the_hand_computed_ones() -> None:
    report = build_report(seeded_facts(), since=SINCE, until=UNTIL, names={BOT_A: "Support Bot"})
    assert report.days == DAYS
    assert report.chatbots == (EXPECTED_A, EXPECTED_B)  # named first, then by id
    assert EXPECTED_A.unanswered_rate == 0.25
    assert Report.from_json(report.to_json()) == report  # the digest's payload keeps every figure


def test_the_days_follow_the_reports_time_zone() -> None:
    # In Sydney (UTC+11) the window opens at 20:00 on 23 Nov: j1, j2 fall that evening, j3, j4 the next.
    report = build_report(seeded_facts(), since=SINCE, until=UNTIL, timezone="Australia/Sydney")
    assert report.days[0] == "2026-11-23" and report.days[-1] == "2026-11-30"
    assert report.chatbots[0].per_day[:2] == (2, 2)
    # In Honolulu (UTC-10) 23 Nov 09:00 UTC is 22 Nov 23:00: the window starts a day earlier there.
    hawaii = build_report(seeded_facts(), since=SINCE, until=UNTIL, timezone="Pacific/Honolulu")
    assert hawaii.days[0] == "2026-11-22" and hawaii.chatbots[0].per_day[:3] == (0, 2, 2)


def test_the_text_report_shows_every_figure() -> None:
    text = render_text(build_report(seeded_facts(), since=SINCE, until=UNTIL, names={BOT_A: "Support Bot"}))
    assert "2026-11-23 09:00 to 2026-11-30 09:00 UTC (7d 0h)" in text
    block_a = text.split(f"Support Bot ({BOT_A})")[1].split(BOT_B)[0]
    for line in (
        "Questions answered:  4",
        "Unanswered:          1 (25%)",
        "Votes:               👍 3  👎 2",
        "Flagged answers:     1",
        "Escalations:         2",
        "Human requests:      1",
        "Time to claim:       median 2m, p90 10m (4 of 5 alerts claimed)",
        "Time to resolve:     median 1h 00m, p90 2h 00m (3 of 5 alerts resolved)",
        "Alerts still open:   3",
    ):
        assert line in block_a
    block_b = text.split(BOT_B)[1]
    assert "Unanswered:          2 (67%)" in block_b and "Time to claim:       -" in block_b
    empty = render_text(build_report([], since=SINCE, until=UNTIL))
    assert "Nothing happened in this window" in empty


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    # The store's clock stands at the report's end, so that opening SQLite prunes nothing the week needs.
    clock = ManualClock(UNTIL + 3 * H - 1_700_000_000.0)
    if request.param == "sqlite":
        opened: Store = SQLiteStore(tmp_path / "state.db", clock=clock)
    else:
        url = request.getfixturevalue("redis_url")
        opened = RedisStore(url, prefix=request.getfixturevalue("redis_prefix"), clock=clock)
    yield opened
    await opened.close()


async def test_the_figures_read_back_from_each_store(store: Store) -> None:
    facts = seeded_facts()
    await store.note_facts(facts[:20])
    await store.note_facts(facts[20:])
    report = await gather_report(store, since=SINCE, until=UNTIL, names={BOT_A: "Support Bot"})
    assert report.chatbots == (EXPECTED_A, EXPECTED_B)


async def test_a_changed_vote_counts_once_with_its_last_value(store: Store) -> None:
    await store.note_facts([Fact(FactKind.ANSWERED, "j1", SINCE + H, BOT_A)])
    await store.note_facts([Fact(FactKind.VOTE, "j1", SINCE + 2 * H, BOT_A, actor="u1", value="up")])
    await store.note_facts([Fact(FactKind.VOTE, "j1", SINCE + 3 * H, BOT_A, actor="u1", value="down")])
    (bot,) = (await gather_report(store, since=SINCE, until=UNTIL)).chatbots
    assert (bot.votes_up, bot.votes_down) == (0, 1)


# --- the command ------------------------------------------------------------------------------


def run_report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "report", *args], capture_output=True, text=True, timeout=60
    )


def report_config(tmp_path: Path, state: str) -> Path:
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(
        "insitechat: {api_key: '${INSITECHAT_API_KEY_NOT_NEEDED}'}\n"  # the report needs no secret but the state's
        f"state: {state}\n"
        "console: {enabled: true}\n"
        f"chatbots: [{{id: {BOT_A}, name: Support Bot}}]\n"
        f"routes: [{{platform: console, chatbot: {BOT_A}}}]\n"
    )
    return cfg


async def test_the_command_reads_a_running_bridges_state_file_without_taking_its_work(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    running = SQLiteStore(path)  # the bridge, running: it holds a job's lease
    now = time.time()
    await running.note_facts(seeded_facts(now - 7 * DAY, now))
    job = ChatJob.new(Inbound("slack", "T1", "C1", "100.1", "U1", "a question"), chatbot=BOT_A, now=now)
    assert await running.create_job(job, lease=600)
    lease_before = sqlite3.connect(path).execute("SELECT lease_until FROM jobs").fetchall()

    result = run_report("--config", str(report_config(tmp_path, f"{{sqlite: '{path}'}}")))
    assert result.returncode == 0, result.stderr
    assert "Questions answered:  4" in result.stdout and "Support Bot" in result.stdout
    assert "Questions answered:  3" in result.stdout  # BOT_B
    # Its lease is untouched (opening the file as a store would have voided it), and the bridge can still write.
    assert sqlite3.connect(path).execute("SELECT lease_until FROM jobs").fetchall() == lease_before
    assert await running.take_over_jobs(lease=600) == []
    await running.note_facts([Fact(FactKind.ANSWERED, "later", now, BOT_A)])
    await running.close()

    day = run_report("--since", "24h", "--config", str(report_config(tmp_path, f"{{sqlite: '{path}'}}")))
    assert day.returncode == 0, day.stderr
    assert "(1d 0h)" in day.stdout and "Questions answered:  1" in day.stdout  # only "later" (j9 lies ahead)


async def test_the_command_reads_redis(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    now = time.time()
    await store.note_facts(seeded_facts(now - 7 * DAY, now))
    await store.close()
    cfg = report_config(tmp_path, f"{{redis_url: '${{TEST_REDIS_URL}}', redis_prefix: '{redis_prefix}'}}")
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "report", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "TEST_REDIS_URL": redis_url},
    )
    assert result.returncode == 0, result.stderr
    assert "Questions answered:  4" in result.stdout and "Alerts still open:   3" in result.stdout


def test_the_command_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    for since, why in (("7x", "not a duration like 7d"), ("0d", "more than zero"), ("40d", "keeps 35 days")):
        result = run_report("--since", since)
        assert result.returncode == 2, (since, result.stderr)
        assert why in result.stderr and "Traceback" not in result.stderr
    missing = run_report("--config", str(report_config(tmp_path, f"{{sqlite: '{tmp_path / 'none.db'}'}}")))
    assert missing.returncode == 1 and "no state file at" in missing.stderr
    assert not (tmp_path / "none.db").exists()  # the report creates nothing


def test_the_sandbox_prints_the_report_of_its_own_store() -> None:
    from tests.integration.test_cli_e2e import run_cli

    lines = ["What are your opening hours?", "/visitor can I talk to a human please", "/claim", "/report", "/report 9x"]
    result = run_cli("run", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "sandbox> InsiteChat bridge report: " in out and "(7d 0h)" in out
    block = out.split("sandbox> Sandbox Bot (")[1]
    for line in ("Questions answered:  1", "Escalations:         1", "Alerts still open:   1"):
        assert f"sandbox>   {line}" in block
    assert "sandbox>   Time to claim:       median " in block and "(1 of 1 alerts claimed)" in block
    assert "usage: /report [7d | 24h | 90m]: '9x' is not a duration" in out
