"""`discord-invite` and `check` against the fake Discord: the invite URL and the plain problem lines."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import discord
import pytest

from adapters.discord import (
    DiscordAdapter,
    DiscordSetupError,
    DiscordStartError,
    check,
    invite_url,
)
from bridge import cli, config
from tests.fakes import discord_api as fd
from tests.fakes.discord_api import FakeDiscord

BOT = "5a0db0c5-ba5e-4b07-8000-000000000001"


def settings(*, routes: str = "", alerts: str = "", token: str = fd.TOKEN, intent: bool = False) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{api_key: "${{KEY}}"}}
discord: {{token: "${{DISCORD_TOKEN}}", message_content_intent: {str(intent).lower()}}}
routes:
  - {{platform: discord, chatbot: {BOT}}}
{routes}
{alerts}
""",
        env={"KEY": "ic_x", "DISCORD_TOKEN": token},
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with fd.running_fake() as discord_fake:
        yield discord_fake


async def test_invite_url_has_both_scopes_and_exactly_the_needed_permissions(fake: FakeDiscord) -> None:
    url = urlparse(await invite_url(settings()))
    query = parse_qs(url.query)
    assert url.netloc == "discord.com" and url.path == "/oauth2/authorize"
    assert query["client_id"] == [str(fd.APP_ID)]
    assert query["scope"] == ["bot applications.commands"]
    expected = discord.Permissions(
        view_channel=True, send_messages=True, send_messages_in_threads=True, create_public_threads=True,
        read_message_history=True, embed_links=True,
    )
    assert query["permissions"] == [str(expected.value)]
    assert fake.rest("GET", r"/oauth2/applications/@me")


async def test_invite_url_offline_reads_the_application_id_from_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", "http://127.0.0.1:9/api/v10")  # nothing listens there
    query = parse_qs(urlparse(await invite_url(settings())).query)
    assert query["client_id"] == [str(fd.BOT_ID)]


async def test_invite_url_with_a_refused_token_says_so_without_the_token(fake: FakeDiscord) -> None:
    wrong = fd.make_token(fd.BOT_ID, "wrong-secret")
    with pytest.raises(DiscordSetupError) as failure:
        await invite_url(settings(token=wrong))
    assert "refused the bot token" in str(failure.value) and wrong not in str(failure.value)


async def test_discord_invite_command_reports_the_adapter_error_plainly(
    fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        f'insitechat: {{api_key: "${{KEY}}"}}\ndiscord: {{token: "${{DISCORD_TOKEN}}"}}\n'
        f"routes: [{{platform: discord, chatbot: {BOT}}}]\n"
    )
    wrong = fd.make_token(fd.BOT_ID, "wrong-secret")
    monkeypatch.setenv("KEY", "ic_x")
    monkeypatch.setenv("DISCORD_TOKEN", wrong)
    with pytest.raises(cli.CommandFailed) as failure:
        await cli._cmd_discord_invite(argparse.Namespace(config=str(path)))
    assert "refused the bot token" in str(failure.value) and wrong not in str(failure.value)


async def test_discord_invite_needs_only_the_discord_token(
    fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The invite comes before the InsiteChat key and the Slack tokens may exist: it reads only discord.token."""
    path = tmp_path / "bridge.yaml"
    path.write_text(
        f'insitechat: {{api_key: "${{KEY}}"}}\n'
        f'slack: {{bot_token: "${{SLACK_BOT_TOKEN}}", app_token: "${{SLACK_APP_TOKEN}}"}}\n'
        f'discord: {{token: "${{DISCORD_TOKEN}}"}}\nroutes: [{{platform: discord, chatbot: {BOT}}}]\n'
    )
    for name in ("KEY", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISCORD_TOKEN", fd.TOKEN)
    assert await cli._cmd_discord_invite(argparse.Namespace(config=str(path))) == 0
    assert f"client_id={fd.BOT_ID}" in capsys.readouterr().out
    monkeypatch.delenv("DISCORD_TOKEN")
    with pytest.raises(config.ConfigError, match="DISCORD_TOKEN is not set"):
        await cli._cmd_discord_invite(argparse.Namespace(config=str(path)))


async def test_check_names_every_route_that_needs_the_message_content_intent(fake: FakeDiscord) -> None:
    """A route for every platform (platform: "*") answering everything also needs it on Discord."""
    routes = f'  - {{platform: "*", channel: "{fd.ASK_ALL}", reply: all, chatbot: {BOT}}}'
    problems = await check(settings(routes=routes))
    assert [p for p in problems if "Message Content intent" in p] == [
        "routes[1].reply: all needs the Message Content intent: set discord.message_content_intent: true "
        "and switch it on in the Developer Portal (Bot tab)"
    ]
    assert [p for p in await check(settings(routes=routes, intent=True)) if "needs the Message Content" in p] == []


async def test_check_says_a_route_naming_a_thread_is_never_used(fake: FakeDiscord) -> None:
    thread = await fake.user_thread(fd.GENERAL, 1200000000000000777, "a thread someone opened")
    problems = await check(settings(routes=f'  - {{platform: discord, channel: "{thread}", chatbot: {BOT}}}'))
    assert problems == [
        f"routes[1].channel: {thread} is a thread or forum post, and routes match the channel a thread is in, "
        f"so this route is never used: name its channel {fd.GENERAL} instead"
    ]


async def test_check_passes_when_the_bot_can_post_everywhere_routed(fake: FakeDiscord) -> None:
    routes = (
        f'  - {{platform: discord, workspace: "{fd.GUILD_ID}", channel: "{fd.GENERAL}", chatbot: {BOT}}}\n'
        f'  - {{platform: discord, channel: "{fd.FORUM}", chatbot: {BOT}}}'
    )
    alerts = f'alerts: [{{chatbot: {BOT}, to: ["discord:{fd.ASK_ALL}"]}}]\nwebhooks: {{verify_signatures: false}}'
    assert await check(settings(routes=routes, alerts=alerts)) == []


async def test_check_wants_thread_permissions_in_alert_channels(fake: FakeDiscord) -> None:
    # A visitor session's alerts share a thread on its first card.
    locked = 1200000000000000099
    deny = discord.Permissions(create_public_threads=True).value
    fake.channels[locked] = fd._channel(locked, "alerts-no-threads", overwrites=[
        {"id": str(fd.BOT_ROLE_ID), "type": 0, "allow": "0", "deny": str(deny)},
    ])
    alerts = (
        f'alerts: [{{chatbot: {BOT}, to: ["discord:{fd.ALERTS}", "discord:{locked}"]}}]\n'
        "webhooks: {verify_signatures: false}"
    )
    assert await check(settings(alerts=alerts)) == [
        # The catch-all route answers in that channel too, in threads.
        f"routes[0].channel: in #alerts-no-threads ({locked}) the bot lacks Create Public Threads",
        f"alerts[0].to[1]: in #alerts-no-threads ({locked}) the bot lacks Create Public Threads",
    ]


async def test_check_lists_each_problem_in_one_plain_line(fake: FakeDiscord) -> None:
    routes = (
        f'  - {{platform: discord, channel: "{fd.READ_ONLY}", chatbot: {BOT}}}\n'
        f'  - {{platform: discord, channel: "1299999999999999999", chatbot: {BOT}}}\n'
        f'  - {{platform: discord, workspace: "1288888888888888888", chatbot: {BOT}}}\n'
        f'  - {{platform: discord, channel: "{fd.ASK_ALL}", chatbot: {BOT}, reply: all}}'
    )
    problems = await check(settings(routes=routes))
    assert problems == [
        f"routes[1].channel: in #announcements ({fd.READ_ONLY}) the bot lacks Send Messages",
        "routes[2].channel: the bot cannot see Discord channel 1299999999999999999 "
        "(it does not exist, or the bot lacks View Channel)",
        "routes[3].workspace: the bot is not in Discord server 1288888888888888888; "
        "invite it with the URL from `insitechat-bridge discord-invite`",
        "routes[4].reply: all needs the Message Content intent: set discord.message_content_intent: true "
        "and switch it on in the Developer Portal (Bot tab)",
    ]


async def test_check_with_a_refused_token_never_shows_it(fake: FakeDiscord) -> None:
    wrong = fd.make_token(fd.BOT_ID, "wrong-secret")
    problems = await check(settings(token=wrong))
    assert len(problems) == 1 and problems[0].startswith("discord.token:") and wrong not in problems[0]
    assert fake.rest("GET", r"/users/@me")


async def test_check_sees_the_intent_switched_off_in_the_portal(fake: FakeDiscord) -> None:
    # The fake application's flags have neither GATEWAY_MESSAGE_CONTENT bit.
    [problem] = await check(settings(intent=True))
    assert problem.startswith("discord.message_content_intent:") and "Developer Portal" in problem


async def test_an_invalid_command_name_names_the_setting() -> None:
    bad = settings()
    bad = bad.model_copy(update={"discord": bad.discord.model_copy(update={"ask_command": "Ask Me"})})  # type: ignore[union-attr]
    adapter = DiscordAdapter(bad.discord, lambda inbound: asyncio.sleep(0))
    with pytest.raises(DiscordStartError, match=r"discord\.ask_command"):
        await adapter.start()
    await adapter.stop()


async def test_check_prints_no_discord_py_warning_between_its_lines(
    fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """The verdict lines are the product: discord.py's "Guilds intent seems to be disabled" landed among them."""
    with caplog.at_level(logging.INFO, logger="discord"):
        await check(settings())
        await invite_url(settings())
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("discord") and r.levelno >= logging.WARNING]
    assert warned == []


def test_a_gateway_reconnect_is_one_warning_line_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """discord.py's connect loop logs each retry with _log.exception; that record, as it makes it, is one line."""
    reconnects = logging.getLogger("discord.client")  # discord.py's own logger, where its loop logs
    with caplog.at_level(logging.INFO, logger="discord.client"):
        try:
            raise OSError("Connect call failed ('127.0.0.1', 9)")
        except OSError:
            reconnects.exception("Attempting a reconnect in %.2fs", 2.5)
    [record] = [r for r in caplog.records if r.name == "discord.client"]
    assert record.levelno == logging.WARNING and record.exc_info is None and not caplog.text.count("Traceback")
    assert record.getMessage() == (
        "discord: the gateway connection dropped (OSError: Connect call failed ('127.0.0.1', 9)); "
        "reconnecting in 2.50 s"
    )
