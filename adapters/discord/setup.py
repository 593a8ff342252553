"""Discord set-up: the bot's permissions, the invite URL, `check` of token, intent and channels, start-up errors."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import discord

from bridge.logs import as_warning_line
from bridge.config import ReplyMode, RouteSettings, Settings
from bridge.ports import PlatformRefused

log = logging.getLogger(__name__)

# A Discord REST call that failed: refused (HTTPException, Forbidden and NotFound among them) or
# never answered (the connection, the network). Every handler that tells or retries it catches these.
REST_ERRORS = (discord.HTTPException, aiohttp.ClientError, OSError)


def rest_intents() -> discord.Intents:
    """Intents for a client that only logs in over REST: never sent, but guilds keeps discord.py from
    warning ("Guilds intent seems to be disabled") in the middle of `check`'s verdict lines."""
    intents = discord.Intents.none()
    intents.guilds = True
    return intents


class OneLineReconnects(logging.Filter):
    """discord.py logs each gateway reconnect attempt as an ERROR with a full traceback (three in an
    eight-second outage); the reason in one WARNING line says the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Attempting a reconnect in %.2fs" and record.exc_info:
            error = record.exc_info[1]
            as_warning_line(
                record,
                "discord: the gateway connection dropped (%s); reconnecting in %.2f s",
                (f"{type(error).__name__}: {error}" if error else "?", *(record.args or ())),
            )
        return True


logging.getLogger("discord.client").addFilter(OneLineReconnects())

# Exactly what the bot does: read and post in channels and threads, start threads on
# messages, reply to messages (needs history) and post alert embeds.
REQUIRED_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,
    embed_links=True,
)
PERMISSION_NAMES = {
    "read_messages": "View Channel",  # discord.py's name for View Channel
    "send_messages": "Send Messages",
    "send_messages_in_threads": "Send Messages in Threads",
    "create_public_threads": "Create Public Threads",
    "read_message_history": "Read Message History",
    "embed_links": "Embed Links",
}
SCOPES = ("bot", "applications.commands")
TEXT, ANNOUNCEMENT, FORUM = 0, 5, 15  # the channel types people ask the bot in
CHANNEL_LINES = 10  # per server and route: the rest of a long list is counted, not listed


class DiscordStartError(RuntimeError):
    """The Discord client could not connect; the message tells the operator what to change."""


class DiscordRefused(DiscordStartError, PlatformRefused):
    """Discord refused the bot for good (the token, a privileged intent): trying again will not help."""


class DiscordSetupError(RuntimeError):
    """A set-up helper (invite URL) cannot do its job; the message is plain and has no token."""



# --- start-up errors -------------------------------------------------------------------------


def describe_failure(exc: BaseException | None, timeout: float) -> DiscordStartError:
    """A plain sentence for why the client did not connect or its connection ended (never the token).

    A DiscordRefused when waiting will not fix it (a refused token, a disallowed intent);
    a plain DiscordStartError when another try may work.
    """
    if exc is None:
        return DiscordStartError(
            f"Discord did not report ready within {timeout:.0f} s; check the network and discord.token"
        )
    if isinstance(exc, discord.PrivilegedIntentsRequired) or (
        isinstance(exc, discord.ConnectionClosed) and exc.code == 4014
    ):
        return DiscordRefused(
            "Discord refused the Message Content intent (gateway close code 4014): switch on Message Content "
            "Intent in the Developer Portal (Bot tab), or set discord.message_content_intent: false"
        )
    if isinstance(exc, discord.LoginFailure) or (isinstance(exc, discord.ConnectionClosed) and exc.code == 4004):
        return DiscordRefused(
            "Discord refused the bot token (discord.token): copy a fresh token from the Developer Portal, Bot tab"
        )
    if isinstance(exc, discord.ConnectionClosed):
        return DiscordStartError(f"Discord closed the gateway connection (code {exc.code})")
    return DiscordStartError(f"could not connect to Discord: {type(exc).__name__}: {exc}")


# --- set-up helpers: invite URL and check ---------------------------------------------------


def application_id_from_token(token: str) -> int | None:
    """A bot token's first segment is its user id in base64; for current apps that is the application id."""
    first = token.split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return int(decoded) if decoded.isdigit() else None


async def invite_url(settings: Settings) -> str:
    """The OAuth2 URL that adds the bot with exactly REQUIRED_PERMISSIONS and its slash commands."""
    if settings.discord is None:
        raise DiscordSetupError("the config has no discord section")
    token = settings.discord.token
    client = discord.Client(intents=rest_intents())
    app_id: int | None = None
    try:
        await client.login(token)
        app_id = client.application_id
    except discord.LoginFailure:
        raise DiscordSetupError(
            "Discord refused the bot token (discord.token): copy a fresh token from the Developer Portal, Bot tab"
        ) from None
    except REST_ERRORS as exc:
        log.warning("cannot ask Discord for the application id (%s); reading it from the token", type(exc).__name__)
    finally:
        await client.close()
    app_id = app_id or application_id_from_token(token)
    if app_id is None:
        raise DiscordSetupError(
            "cannot tell the application id: Discord is unreachable and discord.token is not a bot token"
        )
    return discord.utils.oauth_url(app_id, permissions=REQUIRED_PERMISSIONS, scopes=SCOPES)


def channel_permissions(
    *, guild: Mapping[str, Any], member: Mapping[str, Any], user_id: str, overwrites: list[Mapping[str, Any]]
) -> discord.Permissions:
    """Discord's permission computation for one member in one channel, from REST payloads."""
    guild_id = str(guild["id"])
    if str(guild.get("owner_id")) == user_id:
        return discord.Permissions.all()
    roles = {str(role["id"]): int(role["permissions"]) for role in guild.get("roles", [])}
    member_roles = {str(r) for r in member.get("roles", [])}
    value = roles.get(guild_id, 0)
    for role_id in member_roles:
        value |= roles.get(role_id, 0)
    if value & discord.Permissions(administrator=True).value:
        return discord.Permissions.all()
    by_id = {str(o["id"]): o for o in overwrites}

    def apply(current: int, allow: int, deny: int) -> int:
        return (current & ~deny) | allow

    everyone = by_id.get(guild_id)
    if everyone is not None:
        value = apply(value, int(everyone["allow"]), int(everyone["deny"]))
    allow = deny = 0
    for role_id in member_roles:
        overwrite = by_id.get(role_id)
        if overwrite is not None and int(overwrite.get("type", 0)) == 0:
            allow |= int(overwrite["allow"])
            deny |= int(overwrite["deny"])
    value = apply(value, allow, deny)
    own = by_id.get(user_id)
    if own is not None and int(own.get("type", 1)) == 1:
        value = apply(value, int(own["allow"]), int(own["deny"]))
    return discord.Permissions(value)


def _missing(perms: discord.Permissions, needed: discord.Permissions) -> list[str]:
    return [PERMISSION_NAMES.get(name, name) for name, on in needed if on and not getattr(perms, name)]


async def check(settings: Settings) -> list[str]:
    """Problems with the Discord side, one plain line each: the token, the intent, every routed channel."""
    if settings.discord is None:
        return []
    config = settings.discord
    client = discord.Client(intents=rest_intents())
    problems: list[str] = []
    try:
        try:
            await client.login(config.token)
        except discord.LoginFailure:
            return ["discord.token: Discord refused the bot token; copy a fresh one from the Developer Portal, Bot tab"]
        except REST_ERRORS as exc:
            return [f"discord: cannot reach Discord ({type(exc).__name__}); the token was not checked"]
        assert client.user is not None
        bot_id = str(client.user.id)
        app = client.application
        if config.message_content_intent and app is not None:
            flags = app.flags
            if not (flags.gateway_message_content or flags.gateway_message_content_limited):
                problems.append(
                    "discord.message_content_intent: the Message Content intent is off in the Developer Portal "
                    "(Bot tab): switch it on, or set discord.message_content_intent: false"
                )
        try:
            guild_ids = {str(g["id"]) for g in await client.http.get_guilds(200)}
        except REST_ERRORS as exc:
            return [*problems, f"discord: cannot list the bot's servers ({type(exc).__name__})"]
        for i, route in enumerate(settings.routes):
            if route.platform not in ("discord", "*"):
                continue
            if not config.message_content_intent and route.reply is ReplyMode.ALL:
                problems.append(
                    f"routes[{i}].reply: all needs the Message Content intent: "
                    "set discord.message_content_intent: true and switch it on in the Developer Portal (Bot tab)"
                )
            if route.platform != "discord":
                continue  # its channel ids may be another platform's
            if route.workspace != "*" and route.workspace not in guild_ids:
                problems.append(
                    f"routes[{i}].workspace: the bot is not in Discord server {route.workspace}; "
                    "invite it with the URL from `insitechat-bridge discord-invite`"
                )
            threads = route.threads if route.threads is not None else config.threads
            if route.channel == "*" and route.reply is not ReplyMode.OFF:
                for guild_id in sorted(guild_ids) if route.workspace == "*" else [route.workspace]:
                    if guild_id in guild_ids:  # else reported above
                        covers = _covered_by(settings, route, guild_id)
                        for problem in await _check_server(client, bot_id, guild_id, threads=threads, covers=covers):
                            problems.append(f"routes[{i}].channel: {problem}")
            if route.channel in ("*", "dm"):
                continue
            problem = await _check_channel(client, bot_id, route.channel, threads=threads, alerts=False, route=True)
            if problem:
                problems.append(f"routes[{i}].channel: {problem}")
        for i, rule in enumerate(settings.alerts):
            for j, destination in enumerate(rule.to):
                platform, _, channel_id = destination.partition(":")
                if platform == "discord":
                    # A visitor session's alerts share a thread on its first card.
                    problem = await _check_channel(client, bot_id, channel_id, threads=True, alerts=True)
                    if problem:
                        problems.append(f"alerts[{i}].to[{j}]: {problem}")
    finally:
        await client.close()
    return problems


async def _check_channel(
    client: discord.Client, bot_id: str, channel_id: str, *, threads: bool, alerts: bool, route: bool = False
) -> str:
    """One sentence about what stops the bot in this channel, or ""; `route`: named by a route (not an alert)."""
    try:
        return await _channel_problem(client, bot_id, channel_id, threads=threads, alerts=alerts, route=route)
    except (discord.NotFound, discord.Forbidden):
        return f"the bot cannot see Discord channel {channel_id} (it does not exist, or the bot lacks View Channel)"
    except ValueError:
        return f"{channel_id!r} is not a Discord channel id"
    except REST_ERRORS as exc:
        return f"could not check Discord channel {channel_id} ({type(exc).__name__})"


async def _channel_problem(
    client: discord.Client, bot_id: str, channel_id: str, *, threads: bool, alerts: bool, route: bool = False
) -> str:
    """What stops the bot posting in one channel, from REST payloads; raises on HTTP failures."""
    # Read loosely, like every payload here: a thread's parent_id is not in every member of discord.py's Channel union.
    channel: Mapping[str, Any] = await client.http.get_channel(int(channel_id))
    guild_id = channel.get("guild_id")
    if not guild_id:
        return ""  # a DM channel: nothing to grant
    if channel.get("parent_id") and int(channel.get("type", 0)) in (10, 11, 12):
        if route:
            # Routes match the channel a message is in, and a thread's message is in its parent.
            return (
                f"{channel_id} is a thread or forum post, and routes match the channel a thread is in, so this "
                f"route is never used: name its channel {channel['parent_id']} instead"
            )
        channel = await client.http.get_channel(int(channel["parent_id"]))
    guild = await client.http.get_guild(int(guild_id))
    member = await client.http.get_member(int(guild_id), int(bot_id))
    perms = channel_permissions(
        guild=guild, member=member, user_id=bot_id, overwrites=list(channel.get("permission_overwrites", []))
    )
    missing = _missing(perms, _needed(int(channel.get("type", 0)), threads=threads, alerts=alerts))
    if missing:
        return f"in #{channel.get('name', channel_id)} ({channel_id}) the bot lacks {', '.join(missing)}"
    return ""


def _needed(kind: int, *, threads: bool, alerts: bool) -> discord.Permissions:
    """What answering (or posting alert cards) in a channel of this type takes."""
    needed = discord.Permissions(view_channel=True, read_message_history=True)
    if kind == FORUM:  # forum: posts are threads
        needed.send_messages_in_threads = True
    else:
        needed.send_messages = True
        if threads:
            needed.create_public_threads = True
            needed.send_messages_in_threads = True
    if alerts:
        needed.embed_links = True
    return needed


def _covered_by(settings: Settings, route: RouteSettings, guild_id: str) -> Callable[[str], bool]:
    """Whether `route` is the one that decides in a channel of the server (not a more specific route)."""
    return lambda channel_id: settings.route_for("discord", guild_id, channel_id, False) is route


async def _check_server(
    client: discord.Client, bot_id: str, guild_id: str, *, threads: bool, covers: Callable[[str], bool]
) -> list[str]:
    """For a `channel: "*"` route: what stops the bot in the server's channels it is meant to answer in.

    Every text, announcement and forum channel the route covers, where the bot can see the
    channel and post in it, must grant what answering there takes; a channel where the bot
    cannot post at all is taken as read-only on purpose. What the bot's roles lack server-wide
    is said once for the server; what single channels take away, per channel.
    """
    try:
        guild = await client.http.get_guild(int(guild_id))
        member = await client.http.get_member(int(guild_id), int(bot_id))
        channels = await client.http.get_all_guild_channels(int(guild_id))
    except REST_ERRORS as exc:
        return [f"could not check the channels of Discord server {guild_id} ({type(exc).__name__})"]
    lacking: list[tuple[Mapping[str, Any], list[str]]] = []
    for channel in sorted(channels, key=lambda c: (int(c.get("position") or 0), int(c["id"]))):
        kind = int(channel.get("type", 0))
        if kind not in (TEXT, ANNOUNCEMENT, FORUM) or not covers(str(channel["id"])):
            continue
        perms = channel_permissions(
            guild=guild, member=member, user_id=bot_id, overwrites=list(channel.get("permission_overwrites") or [])
        )
        posts = perms.send_messages_in_threads if kind == FORUM else perms.send_messages
        if not perms.view_channel or not posts:
            continue
        missing = _missing(perms, _needed(kind, threads=threads, alerts=False))
        if missing:
            lacking.append((channel, missing))
    roles = channel_permissions(guild=guild, member=member, user_id=bot_id, overwrites=[])
    shared = [
        name
        for name in _missing(roles, _needed(TEXT, threads=threads, alerts=False))
        if any(name in m for _, m in lacking)
    ]
    lines: list[str] = []
    if shared:
        affected = sum(1 for _, missing in lacking if set(shared) & set(missing))
        lines.append(
            f"in Discord server {guild.get('name') or guild_id} ({guild_id}) the bot's roles lack {', '.join(shared)}, "
            f"needed in {affected} channel(s) it answers in; grant it to the bot's role"
        )
    rest = [(channel, [name for name in missing if name not in shared]) for channel, missing in lacking]
    rest = [(channel, missing) for channel, missing in rest if missing]
    for channel, missing in rest[:CHANNEL_LINES]:
        lines.append(f"in #{channel.get('name', channel['id'])} ({channel['id']}) the bot lacks {', '.join(missing)}")
    if len(rest) > CHANNEL_LINES:
        lines.append(f"and {len(rest) - CHANNEL_LINES} more channel(s) in Discord server {guild_id}")
    return lines
