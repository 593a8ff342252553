"""The Slack app manifest: transport, URLs, scopes, events and the slash command follow the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.slack import manifest
from adapters.slack.setup import BOT_EVENTS, REQUIRED_SCOPES
from bridge import cli, config
from tests.conftest import CHATBOT_ID

ENV = {
    "SLACK_BOT_TOKEN": "xoxb-test-token",
    "SLACK_APP_TOKEN": "xapp-test-token",
    "SLACK_SIGNING_SECRET": "s3cret",
    "KEY": "ic_test",
}


def settings_text(transport: str, command: str = "/ask") -> str:
    secret = "app_token: ${SLACK_APP_TOKEN}" if transport == "socket" else "signing_secret: ${SLACK_SIGNING_SECRET}"
    return f"""
insitechat: {{api_key: "${{KEY}}"}}
slack:
  bot_token: ${{SLACK_BOT_TOKEN}}
  {secret}
  command: "{command}"
routes:
  - {{platform: slack, chatbot: {CHATBOT_ID}}}
"""


def settings_for(transport: str, command: str = "/ask") -> config.Settings:
    return config.loads(settings_text(transport, command), env=ENV)


def test_socket_mode_manifest() -> None:
    data = manifest(settings_for("socket", "/helpdesk"))
    assert data["settings"]["socket_mode_enabled"] is True
    assert "request_url" not in data["settings"]["event_subscriptions"]
    [command] = data["features"]["slash_commands"]
    assert command["command"] == "/helpdesk" and "url" not in command
    assert sorted(data["settings"]["event_subscriptions"]["bot_events"]) == sorted(BOT_EVENTS)
    scopes = set(data["oauth_config"]["scopes"]["bot"])
    assert set(REQUIRED_SCOPES) <= scopes
    assert {"app_mentions:read", "chat:write", "im:history", "channels:history", "groups:history",
            "reactions:write", "commands"} <= scopes
    assert data["features"]["app_home"]["messages_tab_enabled"] is True  # people can DM the bot
    # Claim / Resolve and "Talk to a human" are buttons: clicks arrive over the socket.
    assert data["settings"]["interactivity"] == {"is_enabled": True}


@pytest.mark.parametrize(
    ("request_url", "expected"),
    [
        ("https://bridge.example.com", "https://bridge.example.com/slack/events"),
        ("https://bridge.example.com/", "https://bridge.example.com/slack/events"),
        ("", "https://YOUR-BRIDGE-HOST/slack/events"),
    ],
)
def test_http_mode_manifest_points_at_our_events_url(request_url: str, expected: str) -> None:
    data = manifest(settings_for("http"), request_url=request_url)
    assert data["settings"]["socket_mode_enabled"] is False
    assert data["settings"]["event_subscriptions"]["request_url"] == expected
    assert data["features"]["slash_commands"][0]["url"] == expected
    # Button clicks come to the same path; Bolt tells them apart.
    assert data["settings"]["interactivity"] == {"is_enabled": True, "request_url": expected}


def test_the_cli_prints_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "bridge.yaml"
    path.write_text(settings_text("http"))
    assert cli.main(["slack-manifest", "--config", str(path), "--request-url", "https://bridge.example.com"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == manifest(settings_for("http"), request_url="https://bridge.example.com")
    assert "xoxb-test-token" not in json.dumps(printed) and "s3cret" not in json.dumps(printed)


@pytest.mark.parametrize("transport", ["socket", "http"])
def test_the_manifest_comes_before_any_token_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], transport: str
) -> None:
    """The README's order: the manifest creates the Slack app, which is where the tokens come from."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "bridge.yaml"
    path.write_text(settings_text(transport, command="/helpdesk"))
    assert cli.main(["slack-manifest", "--config", str(path), "--request-url", "https://bridge.example.com"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["features"]["slash_commands"][0]["command"] == "/helpdesk"


def test_an_http_manifest_without_a_request_url_says_what_to_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "bridge.yaml"
    path.write_text(settings_text("http"))
    assert cli.main(["slack-manifest", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "https://YOUR-BRIDGE-HOST" in captured.out
    assert "--request-url" in captured.err and "YOUR-BRIDGE-HOST" in captured.err
    path.write_text(settings_text("socket"))  # Socket Mode needs no URL: nothing to say
    assert cli.main(["slack-manifest", "--config", str(path)]) == 0
    assert capsys.readouterr().err == ""


# --- slack.assistant -----------------------------------------------------------------------------


def assistant_settings(assistant: str, transport: str = "socket") -> config.Settings:
    text = settings_text(transport).replace('  command: "/ask"\n', f'  command: "/ask"\n  assistant: {assistant}\n')
    return config.loads(text + f"  - {{platform: slack, channel: dm, chatbot: {CHATBOT_ID}}}\n", env=ENV)


@pytest.mark.parametrize("transport", ["socket", "http"])
def test_the_assistant_adds_its_view_scope_and_event(transport: str) -> None:
    data = manifest(assistant_settings('{description: "Answers about Acme"}', transport))
    assert data["features"]["assistant_view"] == {"assistant_description": "Answers about Acme"}
    assert "assistant:write" in data["oauth_config"]["scopes"]["bot"]
    events = data["settings"]["event_subscriptions"]["bot_events"]
    assert "assistant_thread_started" in events and "message.im" in events  # its questions are DMs
    assert "assistant_thread_context_changed" not in events  # the bridge has no use for it
    # The rest is the manifest without the assistant.
    plain = manifest(settings_for(transport))
    assert set(events) - set(plain["settings"]["event_subscriptions"]["bot_events"]) == {"assistant_thread_started"}
    assert set(data["oauth_config"]["scopes"]["bot"]) - set(plain["oauth_config"]["scopes"]["bot"]) == {
        "assistant:write"
    }
    assert {k: v for k, v in data["features"].items() if k != "assistant_view"} == plain["features"]


@pytest.mark.parametrize("assistant", ["false", "{enabled: false}"])
def test_with_the_assistant_off_the_manifest_is_todays(assistant: str) -> None:
    data = manifest(assistant_settings(assistant))
    assert "assistant_view" not in data["features"]
    assert "assistant:write" not in data["oauth_config"]["scopes"]["bot"]
    assert sorted(data["settings"]["event_subscriptions"]["bot_events"]) == sorted(BOT_EVENTS)
    assert data == manifest(settings_for("socket"))


def test_assistant_true_is_the_short_form() -> None:
    data = manifest(assistant_settings("true"))
    assert data["features"]["assistant_view"]["assistant_description"]
