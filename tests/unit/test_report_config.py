"""The report's settings and inputs: the digest section validated with its paths, durations read or refused."""

from __future__ import annotations

import pytest

from bridge import config
from bridge.report import DAY, duration_text, parse_duration, percentile
from tests.unit.test_config import BASE, ENV, problems_of

SLACK_ONLY = BASE.replace("discord:\n  token: ${DISCORD}\n", "")


def test_a_digest_section_is_read_with_its_defaults() -> None:
    report = "report: {timezone: Europe/Berlin, digest: {to: ['slack:C1', 'discord:42']}}\n"
    settings = config.loads(BASE + report, env=ENV)
    digest = settings.report.digest
    assert digest is not None and settings.report.timezone == "Europe/Berlin"
    assert (digest.to, digest.weekday, digest.hour, digest.charts) == (("slack:C1", "discord:42"), "monday", 9, True)
    assert config.loads(BASE, env=ENV).report.digest is None  # no digest unless asked for
    assert config.loads(BASE + "report: {digest: {to: ['slack:C1'], weekday: Friday}}\n", env=ENV).report.digest


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("{timezone: Mars/Olympus}", "report.timezone: 'Mars/Olympus' is not a time zone name"),
        ("{digest: {to: ['slack:C1'], weekday: funday}}", "report.digest.weekday:"),
        ("{digest: {to: ['slack:C1'], hour: 24}}", "report.digest.hour:"),
        ("{digest: {to: []}}", "report.digest.to: needs at least one destination"),
        ("{digest: {to: ['console:alerts']}}", "report.digest.to: 'console:alerts' is not"),
        ("{digest: {to: ['slack:C1'], when: monday}}", "report.digest.when:"),
    ],
)
def test_a_bad_report_section_names_its_path(section: str, problem: str) -> None:
    problems = problems_of(BASE + f"report: {section}\n")
    assert any(p.startswith(problem) for p in problems), problems


def test_a_digest_to_an_unconfigured_platform_is_refused() -> None:
    problems = problems_of(SLACK_ONLY + "report: {digest: {to: ['discord:42']}}\n")
    assert problems == ["report.digest.to[0]: discord has no section configured"]


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90m", "24h", "7d", "2w", "1.5h", "30s")] == [
        5400.0, DAY, 7 * DAY, 14 * DAY, 5400.0, 30.0
    ]
    for bad in ("", "7", "d7", "7 days", "-1d", "36d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [duration_text(s) for s in (None, 44.6, 61, 3600 * 3 + 300, 2 * DAY + 4 * 3600)] == [
        "-", "45s", "1m", "3h 05m", "2d 4h"
    ]


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([5.0], 0.9) == 5.0
    values = [40.0, 10.0, 30.0, 20.0]  # sorted: 10 20 30 40
    assert (percentile(values, 0.5), percentile(values, 0.9)) == (20.0, 40.0)
    ten = [float(i) for i in range(1, 11)]
    assert (percentile(ten, 0.5), percentile(ten, 0.9)) == (5.0, 9.0)


def test_the_slack_manifest_asks_for_files_write_only_for_a_digest_with_charts_in_slack() -> None:
    from adapters.slack import manifest

    def scopes(report: str) -> list[str]:
        return list(manifest(config.loads(BASE + report, env=ENV))["oauth_config"]["scopes"]["bot"])

    assert "files:write" in scopes("report: {digest: {to: ['slack:C1']}}\n")
    assert "files:write" not in scopes("")
    assert "files:write" not in scopes("report: {digest: {to: ['slack:C1'], charts: false}}\n")
    assert "files:write" not in scopes("report: {digest: {to: ['discord:42']}}\n")
