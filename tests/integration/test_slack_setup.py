"""Slack set-up against the fake Slack: `check` lines, start-up failures, stop."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters import slack as slack_adapter
from adapters.slack import SlackAdapter, SlackError
from bridge import config
from bridge.clock import SystemClock
from bridge.emulator import SANDBOX_CHATBOT_ID
from bridge.messages import Inbound
from bridge.ports import PlatformRefused
from tests.fakes.slack_api import (
    ALL_SCOPES,
    APP_TOKEN,
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
)

WRONG_BOT_TOKEN = "xoxb-wrong-token"
WRONG_APP_TOKEN = "xapp-wrong-token"


def settings_for(
    api_url: str,
    *,
    mode: str = "socket",
    bot_token: str = BOT_TOKEN,
    app_token: str = APP_TOKEN,
    routes: str = "",
    alerts: str = "",
    assistant: str = "false",
) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{api_key: "${{KEY}}"}}
chatbots:
  - {{id: {SANDBOX_CHATBOT_ID}, webhook_secret: "${{HOOK}}"}}
slack:
  bot_token: ${{BOT}}
  app_token: ${{APP}}
  signing_secret: ${{SECRET}}
  mode: {mode}
  api_url: {api_url}
  assistant: {assistant}
routes:
  - {{platform: slack, channel: dm, chatbot: {SANDBOX_CHATBOT_ID}}}
{routes}
{alerts}
""",
        env={"KEY": "ic_test", "HOOK": "whsec", "BOT": bot_token, "APP": app_token, "SECRET": SIGNING_SECRET},
    )


ROUTES = f"""
  - {{platform: slack, channel: C0GENERAL, chatbot: {SANDBOX_CHATBOT_ID}}}
  - {{platform: slack, channel: C0OUTSIDE, chatbot: {SANDBOX_CHATBOT_ID}}}
  - {{platform: slack, channel: C0GONE, chatbot: {SANDBOX_CHATBOT_ID}}}
  - {{platform: slack, workspace: T0ELSEWHERE, channel: C0GENERAL, chatbot: {SANDBOX_CHATBOT_ID}}}
  - {{platform: "*", channel: "123456789012", chatbot: {SANDBOX_CHATBOT_ID}}}
  - {{platform: slack, channel: "*", chatbot: {SANDBOX_CHATBOT_ID}}}
"""
ALERTS = f"""
alerts:
  - {{chatbot: {SANDBOX_CHATBOT_ID}, to: ["slack:C0GENERAL", "slack:C0ALERTS"]}}
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = FakeSlack()
    await server.start()
    server.channels.update(
        C0GENERAL={"name": "general", "is_member": True},
        C0OUTSIDE={"name": "outside", "is_member": False},
        C0ALERTS={"name": "alerts", "is_member": False},
    )
    yield server
    await server.stop()


def assert_no_secret(lines: list[str]) -> None:
    for secret in (BOT_TOKEN, APP_TOKEN, WRONG_BOT_TOKEN, WRONG_APP_TOKEN, SIGNING_SECRET):
        assert all(secret not in line for line in lines)


# --- check --------------------------------------------------------------------------------------


async def test_check_passes_a_good_setup(fake: FakeSlack) -> None:
    settings = settings_for(
        fake.api_url, routes=f"  - {{platform: slack, channel: C0GENERAL, chatbot: {SANDBOX_CHATBOT_ID}}}"
    )
    assert await slack_adapter.check(settings) == []
    assert {c.method for c in fake.calls} == {"auth.test", "apps.connections.open", "conversations.info"}


async def test_check_names_each_channel_problem_once(fake: FakeSlack) -> None:
    lines = await slack_adapter.check(settings_for(fake.api_url, routes=ROUTES, alerts=ALERTS))
    assert lines == [
        "routes[2].channel: the bot is not a member of #outside (C0OUTSIDE); invite it with /invite @insitechat",
        "routes[3].channel: channel C0GONE not found (a private channel the bot is not in looks the same)",
        "routes[4].channel: workspace T0ELSEWHERE is not the bot token's workspace (T0TEST)",
        "alerts[0].to[1]: the bot is not a member of #alerts (C0ALERTS); invite it with /invite @insitechat",
    ]
    # Each channel is asked about once; the Discord-looking id of the "*" route never.
    asked = [c.args["channel"] for c in fake.calls_to("conversations.info")]
    assert sorted(asked) == ["C0ALERTS", "C0GENERAL", "C0GONE", "C0OUTSIDE"]


async def test_check_says_a_route_naming_a_thread_is_never_used(fake: FakeSlack) -> None:
    routes = f'  - {{platform: slack, channel: "1700000000.000100", chatbot: {SANDBOX_CHATBOT_ID}}}'
    assert await slack_adapter.check(settings_for(fake.api_url, routes=routes)) == [
        "routes[1].channel: 1700000000.000100 is a message timestamp (a thread), and routes match the channel "
        "a thread is in, so this route is never used: name the channel id (C...) instead"
    ]


async def test_check_lists_missing_scopes(fake: FakeSlack) -> None:
    fake.scopes = ",".join(
        s for s in ALL_SCOPES.split(",") if s not in ("reactions:write", "im:history", "groups:read")
    )
    lines = await slack_adapter.check(settings_for(fake.api_url))
    assert len(lines) == 2
    assert lines[0].startswith("slack.bot_token: missing scope(s) im:history, reactions:write (")
    assert "reactions:write: show the 'working' reaction" in lines[0]
    assert lines[1].startswith("slack.bot_token: missing scope(s) groups:read (")


async def test_check_asks_for_the_assistant_scope_only_with_the_assistant_on(fake: FakeSlack) -> None:
    assert await slack_adapter.check(settings_for(fake.api_url)) == []  # ALL_SCOPES lacks assistant:write
    [line] = await slack_adapter.check(settings_for(fake.api_url, assistant="true"))
    assert line.startswith("slack.bot_token: missing scope(s) assistant:write (assistant:write: greet and suggest")
    fake.scopes = ALL_SCOPES + ",assistant:write"
    assert await slack_adapter.check(settings_for(fake.api_url, assistant="true")) == []


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (dict(bot_token=WRONG_BOT_TOKEN), "slack.bot_token: Slack refused it (invalid_auth)"),
        (dict(app_token=WRONG_APP_TOKEN), "slack.app_token: Slack refused it for Socket Mode (invalid_auth)"),
    ],
)
async def test_check_reports_refused_tokens_without_showing_them(
    fake: FakeSlack, tokens: dict[str, str], expected: str
) -> None:
    lines = await slack_adapter.check(settings_for(fake.api_url, **tokens))
    assert len(lines) == 1 and lines[0].startswith(expected)
    assert_no_secret(lines)


async def test_check_when_slack_is_unreachable(fake: FakeSlack) -> None:
    url = fake.api_url
    await fake.stop()
    [line] = await slack_adapter.check(settings_for(url))
    assert line.startswith(f"slack.api_url: cannot reach the Slack API at {url}")


# --- start and stop -----------------------------------------------------------------------------


async def noop(inbound: Inbound) -> None:
    return None


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (dict(bot_token=WRONG_BOT_TOKEN), "Slack refused the bot token (auth.test: invalid_auth)"),
        (dict(app_token=WRONG_APP_TOKEN), "Slack refused the app token (apps.connections.open: invalid_auth)"),
    ],
)
async def test_start_fails_fast_and_plainly(
    fake: FakeSlack, tmp_path: Path, tokens: dict[str, str], message: str
) -> None:
    adapter = SlackAdapter(settings_for(fake.api_url, **tokens).slack, noop, clock=SystemClock())
    with pytest.raises(SlackError) as raised:
        await adapter.start()
    assert str(raised.value) == message
    assert isinstance(raised.value, PlatformRefused)  # no retry helps: the bridge stops and says so
    assert_no_secret([str(raised.value)])
    assert fake.sockets == []
    await adapter.stop()
    await adapter.stop()  # safe twice, and after a failed start


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("auth.test", "Slack could not check the bot token (auth.test: fatal_error)"),
        ("apps.connections.open", "Slack did not open a Socket Mode connection (apps.connections.open: fatal_error)"),
    ],
)
async def test_a_slack_failure_that_may_pass_is_not_a_refusal(fake: FakeSlack, method: str, message: str) -> None:
    fake.fail(method, status=500)
    adapter = SlackAdapter(settings_for(fake.api_url).slack, noop)
    with pytest.raises(SlackError) as raised:
        await adapter.start()
    assert str(raised.value) == message and not isinstance(raised.value, PlatformRefused)
    await adapter.stop()
    await adapter.start()  # the next try works
    await fake.wait_for(lambda: fake.sockets)
    await adapter.stop()


async def test_socket_stop_is_idempotent_and_closes_the_socket(fake: FakeSlack) -> None:
    adapter = SlackAdapter(settings_for(fake.api_url).slack, noop)
    await adapter.start()
    await fake.wait_for(lambda: fake.sockets)
    assert adapter.me is not None and (adapter.me.user_id, adapter.me.bot_id, adapter.me.team_id) == (
        "UBOT",
        "BBOT",
        "T0TEST",
    )
    await adapter.stop()
    await fake.wait_for(lambda: not fake.sockets)
    await adapter.stop()


def test_the_readme_token_variable_does_not_make_bolt_warn(
    fake: FakeSlack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bolt reads SLACK_BOT_TOKEN itself and warns that the client's token wins; both are the same token.

    The warning is the product here: every start printed it for the variable name the README uses.
    """
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-from-the-environment")
    with caplog.at_level(logging.INFO, logger="slack_bolt"):
        SlackAdapter(settings_for(fake.api_url).slack, noop)
    assert [r for r in caplog.records if r.name.startswith("slack_bolt") and r.levelno >= logging.WARNING] == []
