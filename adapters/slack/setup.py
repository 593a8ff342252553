"""Slack set-up: the Web API client, the app manifest for the configured options, and `check`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from bridge.config import Settings, SlackSettings
from bridge.ports import PlatformRefused

RATE_LIMIT_RETRIES = 3  # 429s waited out per Web API call before it counts as failed
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


EVENTS_PATH = "/slack/events"
# Shown in HTTP mode when no --request-url was given: Slack refuses it on paste, which
# tells the operator exactly which value to fill in.
PLACEHOLDER_URL = "https://YOUR-BRIDGE-HOST"

# What each scope is for, so a missing one can be explained in plain words.
REQUIRED_SCOPES: dict[str, str] = {
    "app_mentions:read": "receive @mentions",
    "chat:write": "post answers and alert cards, update cards on claim/resolve",
    "channels:history": "read follow-ups in public channel threads; find alert cards after a restart",
    "groups:history": "read follow-ups in private channel threads; find alert cards after a restart",
    "im:history": "read direct messages",
    "im:read": "see direct message channels",
    "im:write": "answer in direct messages",
    "reactions:write": "show the 'working' reaction",
    "commands": "offer the slash command",
}
# Not needed to chat, only by `check` to see whether the bot is in each routed channel.
CHECK_SCOPES: dict[str, str] = {
    "channels:read": "check membership of public channels",
    "groups:read": "check membership of private channels",
}
# Only for the weekly digest's charts (report.digest with charts into a Slack channel).
CHART_SCOPES: dict[str, str] = {"files:write": "upload the weekly digest's charts"}
BOT_EVENTS = ("app_mention", "message.channels", "message.groups", "message.im")
# slack.assistant: the assistant view's scope and event. Its questions arrive as message.im;
# assistant_thread_context_changed is not asked for, as the bridge has no use for it.
ASSISTANT_SCOPES: dict[str, str] = {
    "assistant:write": "greet and suggest prompts in the assistant view, and name its threads",
}
ASSISTANT_EVENTS = ("assistant_thread_started",)


def required_scopes(slack: SlackSettings) -> dict[str, str]:
    """The bot scopes the adapter uses with this config, each with what it is for."""
    return {**REQUIRED_SCOPES, **(ASSISTANT_SCOPES if slack.assistant.enabled else {})}


class SlackError(Exception):
    """Slack refused or could not be reached; the message is plain and never holds a token."""


class SlackRefused(SlackError, PlatformRefused):
    """Slack refused a token for good (revoked, wrong, deactivated): trying again will not help."""


# Slack's answers to a token that no retry will make work; any other error may pass.
REFUSED_CODES = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired", "not_allowed_token_type"}
)


def _chart_scopes(settings: Settings) -> dict[str, str]:
    digest = settings.report.digest
    charted = digest is not None and digest.charts and any(to.startswith("slack:") for to in digest.to)
    return CHART_SCOPES if charted else {}


def manifest(settings: Settings, request_url: str = "") -> dict[str, Any]:
    """A ready Slack app manifest (JSON) for `insitechat-bridge slack-manifest`.

    Paste it at https://api.slack.com/apps -> Create New App -> From a manifest. It holds:
    - the bot scopes: app_mentions:read, chat:write, channels:history, groups:history,
      im:history, im:read, im:write, reactions:write, commands (what the adapter uses),
      plus channels:read and groups:read (only `check` uses them, to verify membership), and
      files:write when the weekly digest posts charts into Slack;
    - the bot events app_mention, message.channels, message.groups, message.im
      (follow-ups in a thread arrive only as message events, without a mention);
    - the slash command (`slack.command`, default /ask);
    - interactivity on, for the alert cards' Claim / Resolve and the "Talk to a human" button;
    - Socket Mode on when the transport is socket (the config has an app token or
      `mode: socket`); otherwise HTTP mode with `request_url` + /slack/events as the
      Events API, slash command and interactivity URL (a placeholder host when
      `request_url` is "").
    The DM "Messages" tab is enabled so people can write to the bot directly.
    No chat:write.public: the bot must be a member of its alert channels anyway, to find
    its cards there after a crash (conversations.history), and `check` says when it is not.
    With `slack.assistant` on, also the assistant view (`features.assistant_view` with the
    configured description), the assistant:write scope and the assistant_thread_started event.
    """
    slack = settings.slack
    if slack is None:
        raise ValueError("the config has no slack section")
    socket = slack.transport == "socket"
    events_url = (request_url.rstrip("/") or PLACEHOLDER_URL) + EVENTS_PATH
    command: dict[str, Any] = {
        "command": slack.command,
        "description": "Ask the chatbot; 'reset' starts a new conversation",
        "usage_hint": "[question] or reset",
        "should_escape": False,
    }
    if not socket:
        command["url"] = events_url
    assistant = slack.assistant.enabled
    events: dict[str, Any] = {"bot_events": [*BOT_EVENTS, *(ASSISTANT_EVENTS if assistant else ())]}
    interactivity: dict[str, Any] = {"is_enabled": True}
    if not socket:
        events["request_url"] = events_url
        interactivity["request_url"] = events_url  # Bolt serves events, commands and clicks on one path
    features: dict[str, Any] = {
        "app_home": {
            "home_tab_enabled": False,
            "messages_tab_enabled": True,
            "messages_tab_read_only_enabled": False,
        },
        "bot_user": {"display_name": "InsiteChat", "always_online": True},
        "slash_commands": [command],
    }
    if assistant:
        # Suggested prompts are set per thread (per chatbot), not here.
        features["assistant_view"] = {"assistant_description": slack.assistant.description}
    return {
        "_metadata": {"major_version": 1, "minor_version": 1},
        "display_information": {
            "name": "InsiteChat",
            "description": "Your InsiteChat chatbot, answering in Slack threads and DMs.",
            "background_color": "#2c2d30",
        },
        "features": features,
        "oauth_config": {"scopes": {"bot": sorted({*required_scopes(slack), *CHECK_SCOPES, *_chart_scopes(settings)})}},
        "settings": {
            "event_subscriptions": events,
            "interactivity": interactivity,
            "org_deploy_enabled": False,
            "socket_mode_enabled": socket,
            "token_rotation_enabled": False,
        },
    }


# --- the Web API client ------------------------------------------------------------------------


# Web API methods that create a message: sent twice, they post twice.
NOT_IDEMPOTENT = frozenset({"chat.postMessage", "chat.postEphemeral", "chat.scheduleMessage", "chat.meMessage"})


class ConnectionRetryExceptPosts(AsyncConnectionErrorRetryHandler):
    """slack_sdk's retry of dropped connections, except where a re-send could post twice.

    A connection that drops after the request went out (ServerDisconnectedError, a reset)
    does not say whether Slack posted: the SDK's re-send of chat.postMessage then shows the
    answer twice. Those methods are retried only when the connection could not be opened
    (ClientConnectorError: nothing was sent); any other drop goes back to the caller, and
    the outbox tries again later with look_first, which finds what did land. Reads,
    reactions and chat.update keep the retry: repeating them changes nothing, and it
    smooths over pooled keep-alive connections that the server closed.
    """

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if not await super()._can_retry_async(state=state, request=request, response=response, error=error):
            return False
        method = request.url.rsplit("/", 1)[-1].split("?", 1)[0]
        return method not in NOT_IDEMPOTENT or isinstance(error, aiohttp.ClientConnectorError)


def make_client(token: str, api_url: str, *, rate_limit_retries: int = RATE_LIMIT_RETRIES) -> AsyncWebClient:
    """A Web API client that waits out 429s (Retry-After) and retries dropped connections, but never re-posts.

    A 429 means Slack did nothing, so waiting it out is safe for every method; see
    ConnectionRetryExceptPosts for why a dropped connection is not.
    """
    handlers: list[AsyncRetryHandler] = [
        ConnectionRetryExceptPosts(),
        AsyncRateLimitErrorRetryHandler(max_retry_count=rate_limit_retries),
    ]
    return AsyncWebClient(token=token, base_url=api_url, retry_handlers=handlers)


def error_code(exc: Exception) -> str:
    """Slack's short error code ("invalid_auth"), never the request or its token."""
    if isinstance(exc, SlackApiError):
        try:
            return str(exc.response.get("error") or f"HTTP {exc.response.status_code}")
        except Exception:  # a malformed response: the class name is still useful
            return "unexpected response"
    return type(exc).__name__


def token_scopes(headers: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The token's scopes from auth.test's x-oauth-scopes header; None when the header is absent."""
    for key, value in (headers or {}).items():
        if key.lower() == "x-oauth-scopes":
            text = value[0] if isinstance(value, (list, tuple)) else str(value)
            return frozenset(s.strip() for s in text.split(",") if s.strip())
    return None


# --- check -------------------------------------------------------------------------------------


async def check(settings: Settings) -> list[str]:
    """Verifies the Slack set-up; one plain line per problem, never a token.

    The bot token (auth.test), its scopes (x-oauth-scopes), the app token in Socket Mode
    (apps.connections.open), and that the bot is a member of every channel a Slack route
    or alert names (conversations.info).
    """
    slack = settings.slack
    if slack is None:
        return []
    client = make_client(slack.bot_token, slack.api_url, rate_limit_retries=1)
    try:
        auth = await client.auth_test()
    except SlackApiError as exc:
        return [
            f"slack.bot_token: Slack refused it ({error_code(exc)}); use the Bot User OAuth Token "
            "(xoxb-...) from the app's OAuth & Permissions page"
        ]
    except NETWORK_ERRORS as exc:
        return [f"slack.api_url: cannot reach the Slack API at {slack.api_url} ({error_code(exc)})"]
    problems: list[str] = []
    team, bot_name = str(auth.get("team_id") or ""), str(auth.get("user") or "the bot")
    scopes = token_scopes(auth.headers)
    if scopes is not None:
        for needed in (required_scopes(slack), CHECK_SCOPES):
            missing = [s for s in needed if s not in scopes]
            if missing:
                purposes = "; ".join(f"{s}: {needed[s]}" for s in missing)
                problems.append(
                    f"slack.bot_token: missing scope(s) {', '.join(missing)} ({purposes}); add them under "
                    "OAuth & Permissions and reinstall the app (`slack-manifest` lists them all)"
                )
    if slack.transport == "socket" and slack.app_token:
        try:
            await client.apps_connections_open(app_token=slack.app_token)
        except SlackApiError as exc:
            problems.append(
                f"slack.app_token: Slack refused it for Socket Mode ({error_code(exc)}); use an app-level "
                "token (xapp-...) with connections:write and turn Socket Mode on"
            )
        except NETWORK_ERRORS as exc:
            problems.append(f"slack.app_token: could not be checked ({error_code(exc)})")
    for i, route in enumerate(settings.routes):
        if route.platform == "slack" and _THREAD_TS.match(route.channel):
            # A thread is a message ts in a channel; routes match channels, so this one never applies.
            problems.append(
                f"routes[{i}].channel: {route.channel} is a message timestamp (a thread), and routes match the "
                "channel a thread is in, so this route is never used: name the channel id (C...) instead"
            )
    checked: set[str] = set()
    for where, workspace, channel in _slack_channels(settings):
        if workspace not in ("*", team):
            problems.append(f"{where}: workspace {workspace} is not the bot token's workspace ({team})")
            continue
        if channel in checked:
            continue  # one line per channel, at its first mention in the config
        checked.add(channel)
        problem = await _membership_problem(client, channel, bot_name)
        if problem:
            problems.append(f"{where}: {problem}")
    return problems


_THREAD_TS = re.compile(r"^p?\d{10}\.?\d{6}$")  # 1700000000.000100, or p1700000000000100 from a message link


def _slack_channels(settings: Settings) -> list[tuple[str, str, str]]:
    """(config path, workspace, channel id) of every concrete Slack channel routed or alerted to."""
    found: list[tuple[str, str, str]] = []
    for i, route in enumerate(settings.routes):
        if route.channel in ("*", "dm") or route.channel.startswith("D"):
            continue
        # A "*" platform route may name a Discord channel: only Slack-shaped ids are checked.
        slack_shaped = route.channel[:1] in ("C", "G") and route.channel.isupper()
        if (route.platform == "slack" and not _THREAD_TS.match(route.channel)) or (
            route.platform == "*" and slack_shaped
        ):
            found.append((f"routes[{i}].channel", route.workspace, route.channel))
    for i, rule in enumerate(settings.alerts):
        for j, destination in enumerate(rule.to):
            platform, _, channel = destination.partition(":")
            if platform == "slack" and not channel.startswith("D"):
                found.append((f"alerts[{i}].to[{j}]", "*", channel))
    return found


async def _membership_problem(client: AsyncWebClient, channel: str, bot_name: str) -> str:
    try:
        info = await client.conversations_info(channel=channel)
    except SlackApiError as exc:
        code = error_code(exc)
        if code == "channel_not_found":
            return f"channel {channel} not found (a private channel the bot is not in looks the same)"
        if code == "missing_scope":
            return f"cannot check channel {channel}: the token lacks channels:read / groups:read"
        return f"cannot check channel {channel} ({code})"
    except NETWORK_ERRORS as exc:
        return f"cannot check channel {channel} ({error_code(exc)})"
    data = info.get("channel") or {}
    if data.get("is_archived"):
        return f"channel #{data.get('name') or channel} ({channel}) is archived"
    if not data.get("is_member"):
        name = data.get("name") or channel
        return f"the bot is not a member of #{name} ({channel}); invite it with /invite @{bot_name}"
    return ""
