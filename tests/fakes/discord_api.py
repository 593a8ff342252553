"""A fake Discord (REST + gateway on one loopback port) that the real discord.py client logs into."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.policy
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl
from aiohttp import WSMsgType, web

GUILD_ID = 1200000000000000001
BOT_ID = 1200000000000000002  # the bot user; modern apps share the id with the application
APP_ID = BOT_ID
BOT_ROLE_ID = 1200000000000000003  # the bot's managed role
GENERAL = 1200000000000000010  # text channel, reply: mention
ASK_ALL = 1200000000000000011  # text channel, reply: all
FORUM = 1200000000000000012  # forum channel
READ_ONLY = 1200000000000000013  # the bot may read but not post here
ALERTS = 1200000000000000014  # text channel for alert cards
ONCALL_ROLE = 1200000000000000004  # the team's on-call role (mentionable)
ALICE = 1200000000000000020
BOB = 1200000000000000021
CAROL = 1200000000000000023  # an on-call person, mentioned by id
OTHER_BOT = 1200000000000000022
DM_CHANNEL = 1200000000000000030

MESSAGE_CONTENT_INTENT = 1 << 15
P = discord.Permissions
ADMINISTRATOR = P(administrator=True).value
EVERYONE_PERMS = P(
    view_channel=True,
    send_messages=True,
    read_message_history=True,
    create_public_threads=True,
    send_messages_in_threads=True,
    embed_links=True,
).value


def make_token(user_id: int, secret: str = "fake-secret-not-real") -> str:
    """A token shaped like Discord's: base64(user id) . timestamp . hmac."""
    first = base64.urlsafe_b64encode(str(user_id).encode()).decode().rstrip("=")
    return f"{first}.GfAkE1.{secret}"


TOKEN = make_token(BOT_ID)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _user(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "global_name": name.title(),
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
    }


BOT_USER = _user(BOT_ID, "insitebot", bot=True) | {"verified": True, "mfa_enabled": False, "flags": 0}
USERS = {
    ALICE: _user(ALICE, "alice"), BOB: _user(BOB, "bob"), CAROL: _user(CAROL, "carol"),
    OTHER_BOT: _user(OTHER_BOT, "otherbot", bot=True), BOT_ID: BOT_USER,
}


@dataclass
class Call:
    """One REST request as the fake received it (path relative to /api/v10)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    headers: dict[str, str]


@dataclass
class Fault:
    """Answer the next `count` matching REST requests with `status` and `body` instead.

    With `commit`, the request is carried out first and only its answer is replaced: the
    "posted, but the response was lost" case.
    """

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    path: str  # a regular expression searched in the path
    method: str | None
    count: int | None
    commit: bool = False

    def matches(self, method: str, path: str) -> bool:
        return bool(re.search(self.path, path)) and (self.method is None or self.method == method) and self.count != 0


@dataclass
class Hang:
    """Hold the answer of the next `count` matching REST requests until release() or stop().

    With `commit` the request is carried out first (Discord posted; the answer never reached
    the bot); without, it is held before anything happens.
    """

    path: str  # a regular expression searched in the path
    method: str | None
    count: int | None
    commit: bool = True
    hung: int = 0  # requests being held right now

    def matches(self, method: str, path: str) -> bool:
        return bool(re.search(self.path, path)) and (self.method is None or self.method == method) and self.count != 0


@dataclass
class _Session:
    id: str
    seq: int = 0
    intents: int = 0


@dataclass
class _Conn:
    ws: web.WebSocketResponse
    session: _Session | None = None


def _role(role_id: int, name: str, perms: int, *, position: int, bot_id: int | None = None) -> dict[str, Any]:
    role: dict[str, Any] = {
        "id": str(role_id), "name": name, "color": 0, "colors": {"primary_color": 0}, "hoist": False,
        "position": position, "permissions": str(perms), "managed": bot_id is not None, "mentionable": False,
        "flags": 0, "icon": None, "unicode_emoji": None,
    }
    if bot_id is not None:
        role["tags"] = {"bot_id": str(bot_id)}
    return role


def _channel(
    channel_id: int, name: str, kind: int = 0, *, position: int = 0, overwrites: list[Any] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": str(channel_id), "type": kind, "guild_id": str(GUILD_ID), "name": name, "position": position,
        "permission_overwrites": overwrites or [], "parent_id": None, "topic": None, "nsfw": False,
        "rate_limit_per_user": 0, "last_message_id": None, "flags": 0,
    }
    if kind == 15:
        data |= {
            "available_tags": [],
            "default_reaction_emoji": None,
            "default_sort_order": None,
            "default_forum_layout": 0,
        }
    return data


class FakeDiscord:
    """Discord's REST API and gateway in one aiohttp app; records every REST call.

    The bot's own posts come back over the gateway as MESSAGE_CREATE, as on Discord. Without
    the message-content intent, guild messages that do not mention the bot arrive with empty
    content, as on Discord; asking for the intent when `message_content_allowed` is False
    closes the gateway with 4014.
    """

    def __init__(
        self, *, token: str = TOKEN, message_content_allowed: bool = True, heartbeat_interval: float = 45.0
    ) -> None:
        self.token = token
        self.message_content_allowed = message_content_allowed
        self.heartbeat_interval = heartbeat_interval  # seconds, sent in HELLO
        self.ack_heartbeats = True  # False: heartbeats are read but never acknowledged (a silent gateway)
        self.identify_close_code: int | None = None  # close every IDENTIFY with this code (4004: the token was reset)
        self.heartbeats = 0
        self.edits: list[tuple[int, dict[str, Any]]] = []  # (message id, PATCH body), in order
        self.interactions: dict[int, dict[str, Any]] = {}  # INTERACTION_CREATE payloads by id
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.hangs: list[Hang] = []
        self._release = asyncio.Event()  # set: every held answer goes out
        self.identifies: list[dict[str, Any]] = []
        # (session id, event name, payload id) of every DISPATCH written to a gateway socket.
        self.dispatched: list[tuple[str, str, str]] = []
        self.resumes: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.uploads: dict[int, list[Upload]] = {}  # message id -> the files posted with it
        # The bot's posts by (channel id, nonce): a lookup, not a scan of every message (the benchmarks post thousands).
        self._bot_nonces: dict[tuple[str, str], dict[str, Any]] = {}
        self.channels: dict[int, dict[str, Any]] = {}
        self.threads: dict[int, dict[str, Any]] = {}
        self.interaction_callbacks: list[dict[str, Any]] = []
        self.callbacks_of: dict[str, list[dict[str, Any]]] = {}  # interaction id -> its callbacks (type 9: a modal)
        self._interaction_channels: dict[int, int] = {}
        self.base_url = ""
        self._last_id = 0
        self._sessions = itertools.count(1)
        self._conns: list[_Conn] = []
        self._replay_on_resume: list[tuple[str, dict[str, Any]]] = []
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.roles = [
            _role(GUILD_ID, "@everyone", EVERYONE_PERMS, position=0),
            _role(BOT_ROLE_ID, "insitebot", 0, position=1, bot_id=BOT_ID),
            _role(ONCALL_ROLE, "on-call", 0, position=2) | {"mentionable": True},
        ]
        deny_send = [{"id": str(BOT_ROLE_ID), "type": 0, "allow": "0", "deny": str(P(send_messages=True).value)}]
        for channel in (
            _channel(GENERAL, "general", position=0),
            _channel(ASK_ALL, "ask-the-bot", position=1),
            _channel(FORUM, "questions", 15, position=2),
            _channel(READ_ONLY, "announcements", position=3, overwrites=deny_send),
            _channel(ALERTS, "alerts", position=4),
        ):
            self.channels[int(channel["id"])] = channel
        self.channels[DM_CHANNEL] = {
            "id": str(DM_CHANNEL),
            "type": 1,
            "recipients": [USERS[ALICE]],
            "last_message_id": None,
            "flags": 0,
        }

    def _next_id(self) -> int:
        """A snowflake from the current time, as Discord makes them (history `after=` relies on it)."""
        self._last_id = max(self._last_id + 1, discord.utils.time_snowflake(datetime.now(UTC)))
        return self._last_id

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        """Listen on `port` (0: any free one).

        A given port lets a test start Discord "coming back" where the bridge looks.
        """
        app = web.Application(middlewares=[self._hold_answers])
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        self._release.set()
        for conn in list(self._conns):
            await conn.ws.close()
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Point discord.py at this fake, and put Discord's addresses back afterwards."""
        old_base, old_gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = f"{self.base_url}/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws://{self.base_url.removeprefix('http://')}/gateway")
        try:
            yield
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway

    # ----- test controls -----------------------------------------------------------------

    def inject(
        self,
        status: int = 500,
        *,
        path: str = "",
        method: str | None = None,
        count: int | None = 1,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float = 0.05,
        commit: bool = False,
    ) -> Fault:
        """Fail REST requests whose path matches the regex `path` (searched); None count = until removed.

        A 429 is well-formed (Via header, JSON retry_after) unless told otherwise, so
        discord.py waits and retries it. `commit`: carry the request out, then fail its answer.
        """
        if status == 429:
            body = body or {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
            headers = {"Via": "1.1 google"} if headers is None else headers
        fault = Fault(
            status, body or {"message": "Injected failure", "code": 0}, headers or {}, path, method, count, commit
        )
        self.faults.append(fault)
        return fault

    async def revoke(self, *permissions: str, channel: int | None = None) -> None:
        """Take permissions (discord.Permissions names) from the bot, in one channel or server-wide.

        In a channel by a deny overwrite on the bot's role, else from its roles (and @everyone).
        Connected clients get the update; REST enforces it from then on (403 50013, e.g. for a
        thread without create_public_threads).
        """
        bits = P(**{name: True for name in permissions}).value
        if channel is None:
            for role in self.roles:
                if int(role["id"]) in (GUILD_ID, BOT_ROLE_ID):
                    role["permissions"] = str(int(role["permissions"]) & ~bits)
                    await self.dispatch("GUILD_ROLE_UPDATE", {"guild_id": str(GUILD_ID), "role": role})
            return
        data = self.channels[channel]
        overwrites = data.setdefault("permission_overwrites", [])
        own = next((o for o in overwrites if int(o["id"]) == BOT_ROLE_ID), None)
        if own is None:
            own = {"id": str(BOT_ROLE_ID), "type": 0, "allow": "0", "deny": "0"}
            overwrites.append(own)
        own["deny"] = str(int(own["deny"]) | bits)
        own["allow"] = str(int(own["allow"]) & ~bits)
        await self.dispatch("CHANNEL_UPDATE", data)

    async def grant(self, *permissions: str) -> None:
        """Give the bot's role permissions (discord.Permissions names) server-wide, e.g. attach_files."""
        bits = P(**{name: True for name in permissions}).value
        for role in self.roles:
            if int(role["id"]) == BOT_ROLE_ID:
                role["permissions"] = str(int(role["permissions"]) | bits)
                await self.dispatch("GUILD_ROLE_UPDATE", {"guild_id": str(GUILD_ID), "role": role})

    def bot_permissions(self, channel_id: int) -> int:
        """The bot's permissions in a guild channel (a thread: its parent's), computed as Discord does."""
        channel = self.threads.get(channel_id) or self.channels.get(channel_id) or {}
        if channel.get("parent_id") and int(channel["parent_id"]) in self.channels:
            channel = self.channels[int(channel["parent_id"])]
        roles = {int(role["id"]): int(role["permissions"]) for role in self.roles}
        value = roles.get(GUILD_ID, 0) | roles.get(BOT_ROLE_ID, 0)
        if value & ADMINISTRATOR:
            return P.all().value
        overwrites = {int(o["id"]): o for o in channel.get("permission_overwrites") or []}
        for target in (GUILD_ID, BOT_ROLE_ID, BOT_ID):  # @everyone, then the bot's role, then the bot itself
            overwrite = overwrites.get(target)
            if overwrite is not None:
                value = (value & ~int(overwrite["deny"])) | int(overwrite["allow"])
        return value

    def _refusal(self, channel_id: int, needed: discord.Permissions) -> web.Response | None:
        """Discord's 403 when the bot lacks `needed` in a guild channel; None when it may go ahead."""
        channel = self.threads.get(channel_id) or self.channels.get(channel_id) or {}
        if not channel.get("guild_id"):
            return None  # DMs: no permissions
        perms = self.bot_permissions(channel_id)
        if not perms & P(view_channel=True).value:
            return self._error(403, 50001, "Missing Access")
        if perms & needed.value != needed.value:
            return self._error(403, 50013, "Missing Permissions")
        return None

    async def wait_ready(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH to every identified connection."""
        for conn in list(self._conns):
            if conn.session is not None and not conn.ws.closed:
                await self._send_dispatch(conn, event, data)

    async def force_reconnect(self, replay: list[dict[str, Any]] | None = None) -> None:
        """Ask the client to reconnect (op 7); on its RESUME replay these MESSAGE_CREATEs first."""
        self._replay_on_resume = [("MESSAGE_CREATE", m) for m in replay or []]
        self._ready.clear()
        for conn in list(self._conns):
            await conn.ws.send_str(json.dumps({"op": 7, "d": None, "s": None, "t": None}))

    async def send_raw(self, frame: str) -> None:
        """Send one text frame as it is to every identified connection (a payload discord.py may choke on)."""
        for conn in list(self._conns):
            if conn.session is not None and not conn.ws.closed:
                await conn.ws.send_str(frame)

    async def close_gateway(self, code: int) -> None:
        for conn in list(self._conns):
            await conn.ws.close(code=code, message=b"closed by the fake")

    def hang(self, *, path: str, method: str | None = None, count: int | None = 1, commit: bool = True) -> Hang:
        """Hold REST answers (see Hang): a post that happened, or not, while the bot dies waiting."""
        hang = Hang(path, method, count, commit)
        self.hangs.append(hang)
        self._release.clear()
        return hang

    def release(self) -> None:
        """Answer every held request now, and hold no more."""
        self.hangs.clear()
        self._release.set()

    def message_payload(
        self,
        channel_id: int,
        content: str,
        *,
        author: int = ALICE,
        mention_bot: bool = False,
        mentions: tuple[int, ...] = (),
        mention_roles: tuple[int, ...] = (),
        mention_everyone: bool = False,
        reply_to: int | None = None,
        message_id: int | None = None,
        dm: bool = False,
        kind: int = 0,
        webhook_id: int | None = None,
    ) -> dict[str, Any]:
        """A MESSAGE_CREATE payload as Discord sends it."""
        mentioned = ([BOT_ID] if mention_bot else []) + list(mentions)
        if mention_bot:
            content = f"<@{BOT_ID}> {content}"
        data: dict[str, Any] = {
            "id": str(message_id or self._next_id()), "channel_id": str(channel_id), "author": USERS[author],
            "content": content, "timestamp": _now(), "edited_timestamp": None, "tts": False,
            "mention_everyone": mention_everyone, "mentions": [USERS[m] for m in mentioned],
            "mention_roles": [str(r) for r in mention_roles], "attachments": [], "embeds": [], "pinned": False,
            "type": 19 if reply_to else kind, "flags": 0, "components": [],
        }
        if webhook_id:
            data["webhook_id"] = str(webhook_id)
        if not dm:
            data["guild_id"] = str(GUILD_ID)
            data["member"] = {"roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0}
        if reply_to:
            data["message_reference"] = {"type": 0, "message_id": str(reply_to), "channel_id": str(channel_id)}
            if not dm:
                data["message_reference"]["guild_id"] = str(GUILD_ID)
            data["referenced_message"] = self.messages.get(reply_to)
        return data

    async def user_message(self, channel_id: int, content: str, **kw: Any) -> dict[str, Any]:
        """A person (or bot) posts; returns the payload as the bot would see it with full content."""
        data = self.message_payload(channel_id, content, **kw)
        self.messages[int(data["id"])] = data
        await self.dispatch("MESSAGE_CREATE", data)
        return data

    async def forum_post(
        self, title: str, content: str, *, author: int = ALICE, mention_bot: bool = False
    ) -> dict[str, Any]:
        """A new forum post: a thread in FORUM whose starter message has the thread's id."""
        thread_id = self._next_id()
        thread = self._thread_payload(thread_id, FORUM, title, owner=author)
        self.threads[thread_id] = thread
        await self.dispatch("THREAD_CREATE", thread | {"newly_created": True})
        return await self.user_message(thread_id, content, author=author, message_id=thread_id, mention_bot=mention_bot)

    async def user_thread(self, parent: int, root_message: int, name: str = "a thread") -> int:
        """A person opens a thread on a message (not the bot)."""
        thread = self._thread_payload(root_message, parent, name, owner=ALICE)
        self.threads[root_message] = thread
        await self.dispatch("THREAD_CREATE", thread | {"newly_created": True})
        return root_message

    async def slash(
        self, name: str, options: dict[str, str] | None = None, *, channel_id: int = GENERAL, dm: bool = False
    ) -> dict[str, Any]:
        """A member runs a slash command; returns the INTERACTION_CREATE payload."""
        interaction_id = self._next_id()
        channel = self.threads.get(channel_id) or self.channels[channel_id]
        data: dict[str, Any] = {
            "id": str(interaction_id), "application_id": str(APP_ID), "type": 2, "token": f"itoken-{interaction_id}",
            "version": 1, "channel_id": str(channel_id), "channel": channel, "locale": "en-US",
            "attachment_size_limit": 8388608, "app_permissions": str(EVERYONE_PERMS), "entitlements": [],
            "authorizing_integration_owners": {"0": str(GUILD_ID)} if not dm else {"1": str(ALICE)},
            "context": 1 if dm else 0,
            "data": {
                "id": str(self._next_id()), "name": name, "type": 1,
                "options": [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()],
            },
        }
        if dm:
            data["user"] = USERS[ALICE]
        else:
            data["guild_id"] = str(GUILD_ID)
            data["guild_locale"] = "en-US"
            data["member"] = {
                "user": USERS[ALICE], "roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0,
                "permissions": str(EVERYONE_PERMS),
            }
        self._interaction_channels[interaction_id] = channel_id
        self.interactions[interaction_id] = data
        await self.dispatch("INTERACTION_CREATE", data)
        return data

    async def click(self, message: dict[str, Any] | int, custom_id: str, *, user: int = ALICE) -> dict[str, Any]:
        """A member clicks a button on a message (INTERACTION_CREATE type 3); returns the payload."""
        stored = self.messages[int(message if isinstance(message, int) else message["id"])]
        channel_id = int(stored["channel_id"])
        channel = self.threads.get(channel_id) or self.channels[channel_id]
        interaction_id = self._next_id()
        data: dict[str, Any] = {
            "id": str(interaction_id), "application_id": str(APP_ID), "type": 3, "token": f"itoken-{interaction_id}",
            "version": 1, "channel_id": str(channel_id), "channel": channel, "locale": "en-US",
            "attachment_size_limit": 8388608, "app_permissions": str(EVERYONE_PERMS), "entitlements": [],
            "message": stored, "data": {"custom_id": custom_id, "component_type": 2},
        }
        if stored.get("guild_id"):
            data |= {
                "guild_id": stored["guild_id"], "guild_locale": "en-US", "context": 0,
                "authorizing_integration_owners": {"0": str(GUILD_ID)},
                "member": {
                    "user": USERS[user], "roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0,
                    "permissions": str(EVERYONE_PERMS), "nick": None,
                },
            }
        else:
            data |= {"user": USERS[user], "context": 1, "authorizing_integration_owners": {"1": str(user)}}
        self._interaction_channels[interaction_id] = channel_id
        self.interactions[interaction_id] = data
        await self.dispatch("INTERACTION_CREATE", data)
        return data

    async def submit_modal(
        self, opened_by: dict[str, Any], values: dict[str, str], *, user: int = ALICE
    ) -> dict[str, Any]:
        """A member submits the modal the bot answered the click `opened_by` with (INTERACTION_CREATE type 5).

        `values`: text input custom_id -> what was typed. Returns the payload.
        """
        [modal] = [body["data"] for body in self.callbacks_of.get(opened_by["id"], []) if body.get("type") == 9]
        channel_id = self._interaction_channels[int(opened_by["id"])]
        interaction_id = self._next_id()
        rows = [
            {"type": 1, "components": [
                {"type": 4, "custom_id": item["custom_id"], "value": values.get(item["custom_id"], "")}
                for item in row["components"]
            ]}
            for row in modal["components"]
        ]
        data = {
            key: value for key, value in opened_by.items()
            if key not in ("id", "token", "type", "data", "message", "member", "user")
        } | {
            "id": str(interaction_id), "type": 5, "token": f"itoken-{interaction_id}",
            "data": {"custom_id": modal["custom_id"], "components": rows},
        }
        if "member" in opened_by:
            data["member"] = {**opened_by["member"], "user": USERS[user]}
        else:
            data["user"] = USERS[user]
        self._interaction_channels[interaction_id] = channel_id
        self.interactions[interaction_id] = data
        await self.dispatch("INTERACTION_CREATE", data)
        return data

    # ----- queries for assertions --------------------------------------------------------

    def rest(self, method: str, path_pattern: str) -> list[Call]:
        """Calls whose path matches the regular expression (fully)."""
        return [c for c in self.calls if c.method == method and re.fullmatch(path_pattern, c.path)]

    def open_sessions(self) -> int:
        """Gateway connections that identified (or resumed) and are still open: each gets every event."""
        return sum(1 for conn in self._conns if conn.session is not None and not conn.ws.closed)

    def bot_posts(self, channel_id: int | None = None) -> list[dict[str, Any]]:
        """Messages the bot created, in order (channel messages and interaction followups)."""
        return [
            m for m in self.messages.values()
            if int(m["author"]["id"]) == BOT_ID and (channel_id is None or int(m["channel_id"]) == channel_id)
        ]

    # ----- gateway -----------------------------------------------------------------------

    async def _send_dispatch(self, conn: _Conn, event: str, data: dict[str, Any]) -> None:
        assert conn.session is not None
        if event == "MESSAGE_CREATE":
            data = self._as_seen(conn.session, data)
        conn.session.seq += 1
        await conn.ws.send_str(json.dumps({"op": 0, "t": event, "s": conn.session.seq, "d": data}))
        self.dispatched.append((conn.session.id, event, str(data.get("id", "")) if isinstance(data, dict) else ""))

    def _as_seen(self, session: _Session, data: dict[str, Any]) -> dict[str, Any]:
        """Discord withholds content from bots without the intent unless they are mentioned."""
        if session.intents & MESSAGE_CONTENT_INTENT or "guild_id" not in data:
            return data
        if int(data["author"]["id"]) == BOT_ID or any(int(u["id"]) == BOT_ID for u in data["mentions"]):
            return data
        return data | {"content": "", "embeds": [], "attachments": [], "components": []}

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = _Conn(ws)
        self._conns.append(conn)
        try:
            hello = {"heartbeat_interval": int(self.heartbeat_interval * 1000)}
            await ws.send_str(json.dumps({"op": 10, "d": hello, "s": None, "t": None}))
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, data = frame.get("op"), frame.get("d")
                if op == 1:
                    self.heartbeats += 1
                    if self.ack_heartbeats:
                        await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
                elif op == 2:
                    await self._identify(conn, data)
                elif op == 6:
                    await self._resume(conn, data)
        finally:
            self._conns.remove(conn)
        return ws

    async def _identify(self, conn: _Conn, data: dict[str, Any]) -> None:
        self.identifies.append(data)
        if data.get("token") != self.token or self.identify_close_code == 4004:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        if self.identify_close_code is not None:
            await conn.ws.close(code=self.identify_close_code, message=b"closed by the fake")
            return
        intents = int(data.get("intents", 0))
        if intents & MESSAGE_CONTENT_INTENT and not self.message_content_allowed:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        conn.session = _Session(f"session-{next(self._sessions)}", intents=intents)
        gateway = f"ws://{self.base_url.removeprefix('http://')}/gateway"
        await self._send_dispatch(conn, "READY", {
            "v": 10, "user": BOT_USER, "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": conn.session.id, "resume_gateway_url": gateway,
            "application": {"id": str(APP_ID), "flags": 0},
        })
        await self._send_dispatch(conn, "GUILD_CREATE", self._guild_payload())
        self._ready.set()

    async def _resume(self, conn: _Conn, data: dict[str, Any]) -> None:
        self.resumes.append(data)
        conn.session = _Session(data["session_id"], seq=int(data.get("seq") or 0), intents=self._last_intents())
        replay, self._replay_on_resume = self._replay_on_resume, []
        for event, payload in replay:
            await self._send_dispatch(conn, event, payload)
        await self._send_dispatch(conn, "RESUMED", {})
        self._ready.set()

    def _last_intents(self) -> int:
        return int(self.identifies[-1].get("intents", 0)) if self.identifies else 0

    def _guild_payload(self) -> dict[str, Any]:
        bot_member = {
            "user": BOT_USER,
            "roles": [str(BOT_ROLE_ID)],
            "joined_at": _now(),
            "deaf": False,
            "mute": False,
            "flags": 0,
        }
        return {
            "id": str(GUILD_ID), "name": "Test Server", "icon": None, "owner_id": str(ALICE), "roles": self.roles,
            "emojis": [], "stickers": [], "features": [], "member_count": 4, "members": [bot_member],
            "channels": [c for c in self.channels.values() if c.get("guild_id")],
            "threads": [t for t in self.threads.values() if not t["thread_metadata"]["archived"]],
            "presences": [], "voice_states": [], "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [], "unavailable": False, "large": False, "premium_tier": 0,
            "preferred_locale": "en-US", "joined_at": _now(), "afk_timeout": 300, "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0,
            "system_channel_flags": 0, "application_id": None, "premium_progress_bar_enabled": False,
        }

    def _thread_payload(self, thread_id: int, parent: int, name: str, *, owner: int) -> dict[str, Any]:
        return {
            "id": str(thread_id), "type": 11, "guild_id": str(GUILD_ID), "parent_id": str(parent),
            "owner_id": str(owner), "name": name, "last_message_id": None, "rate_limit_per_user": 0,
            "message_count": 0, "member_count": 1, "total_message_sent": 0, "flags": 0, "applied_tags": [],
            "thread_metadata": {
                "archived": False, "auto_archive_duration": 1440, "archive_timestamp": _now(), "locked": False,
            },
        }

    # ----- REST --------------------------------------------------------------------------

    @web.middleware
    async def _hold_answers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        tail = request.match_info.get("tail")
        path = "/" + tail if tail is not None else ""
        hang = next((h for h in self.hangs if tail is not None and h.matches(request.method, path)), None)
        if hang is None or self._release.is_set():
            return await handler(request)
        if hang.count is not None:
            hang.count -= 1
        response = await handler(request) if hang.commit else None
        hang.hung += 1
        try:
            await self._release.wait()
        finally:
            hang.hung -= 1
        return response if response is not None else await handler(request)

    def _json(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        # Exactly "application/json": discord.py does not parse JSON with a charset suffix.
        return web.Response(
            body=json.dumps(body).encode(),
            status=status,
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    def _error(self, status: int, code: int, message: str) -> web.Response:
        return self._json({"message": message, "code": code}, status)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        raw = await request.read()
        if request.content_type == "multipart/form-data":  # a message with files: payload_json + files[n]
            body, request[UPLOADS] = _multipart(raw, request.headers["Content-Type"])
        else:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
        self.calls.append(Call(request.method, path, dict(request.query), body, dict(request.headers)))
        for fault in self.faults:
            if fault.matches(request.method, path):
                if fault.count is not None:
                    fault.count -= 1
                if fault.commit:
                    await self._handle(request, path, body)
                return self._json(fault.body, fault.status, fault.headers)
        return await self._handle(request, path, body)

    async def _handle(self, request: web.Request, path: str, body: Any) -> web.StreamResponse:
        # Interaction callbacks and followups authenticate with the interaction token in the path.
        if (
            not path.startswith(("/interactions/", "/webhooks/"))
            and request.headers.get("Authorization") != f"Bot {self.token}"
        ):
            return self._error(401, 0, "401: Unauthorized")
        for method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and method == request.method:
                return await handler(request, body, *match.groups())
        return self._error(404, 0, f"404: Not Found ({request.method} {path})")

    def _routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", r"/users/@me", self._get_me),
            ("GET", r"/users/@me/guilds", self._get_my_guilds),
            ("GET", r"/oauth2/applications/@me", self._get_application),
            ("GET", r"/channels/(\d+)", self._get_channel),
            ("GET", r"/guilds/(\d+)", self._get_guild),
            ("GET", r"/guilds/(\d+)/channels", self._get_guild_channels),
            ("GET", r"/guilds/(\d+)/members/(\d+)", self._get_member),
            ("POST", r"/channels/(\d+)/messages", self._post_message),
            ("GET", r"/channels/(\d+)/messages", self._get_messages),
            ("PATCH", r"/channels/(\d+)/messages/(\d+)", self._edit_message),
            ("POST", r"/channels/(\d+)/messages/(\d+)/threads", self._start_thread),
            ("POST", r"/channels/(\d+)/typing", self._typing),
            ("POST", r"/users/@me/channels", self._open_dm),
            ("PUT", r"/applications/(\d+)/commands", self._put_commands),
            ("GET", r"/applications/(\d+)/commands", self._get_commands),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", self._interaction_callback),
            ("POST", r"/webhooks/(\d+)/([^/]+)", self._followup),
            ("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/@original", self._edit_original),
        ]

    async def _get_me(self, request: web.Request, body: Any) -> web.Response:
        return self._json(BOT_USER)

    async def _get_my_guilds(self, request: web.Request, body: Any) -> web.Response:
        return self._json(
            [
                {
                    "id": str(GUILD_ID),
                    "name": "Test Server",
                    "icon": None,
                    "owner": False,
                    "permissions": "0",
                    "features": [],
                }
            ]
        )

    async def _get_application(self, request: web.Request, body: Any) -> web.Response:
        return self._json({
            "id": str(APP_ID), "name": "insitebot", "icon": None, "description": "", "bot_public": True,
            "bot_require_code_grant": False, "owner": USERS[ALICE], "verify_key": "00" * 32, "flags": 0,
            "summary": "", "team": None,
        })

    async def _get_channel(self, request: web.Request, body: Any, channel_id: str) -> web.Response:
        channel = self.threads.get(int(channel_id)) or self.channels.get(int(channel_id))
        if channel is None:
            return self._error(404, 10003, "Unknown Channel")
        return self._json(channel)

    async def _get_guild(self, request: web.Request, body: Any, guild_id: str) -> web.Response:
        if int(guild_id) != GUILD_ID:
            return self._error(404, 10004, "Unknown Guild")
        guild = self._guild_payload()
        return self._json({k: v for k, v in guild.items() if k not in ("channels", "threads", "members", "presences")})

    async def _get_guild_channels(self, request: web.Request, body: Any, guild_id: str) -> web.Response:
        if int(guild_id) != GUILD_ID:
            return self._error(404, 10004, "Unknown Guild")
        return self._json([c for c in self.channels.values() if c.get("guild_id")])  # threads are not listed

    async def _get_member(self, request: web.Request, body: Any, guild_id: str, user_id: str) -> web.Response:
        if int(guild_id) != GUILD_ID or int(user_id) != BOT_ID:
            return self._error(404, 10007, "Unknown Member")
        return self._json(
            {
                "user": BOT_USER,
                "roles": [str(BOT_ROLE_ID)],
                "joined_at": _now(),
                "deaf": False,
                "mute": False,
                "flags": 0,
            }
        )

    def _create_bot_message(
        self, channel_id: int, body: dict[str, Any], *, webhook: bool = False, uploads: list[Upload] | None = None
    ) -> dict[str, Any]:
        message_id = self._next_id()
        data: dict[str, Any] = {
            "id": str(message_id), "channel_id": str(channel_id), "author": BOT_USER,
            "content": body.get("content") or "", "timestamp": _now(), "edited_timestamp": None, "tts": False,
            "attachments": [], "embeds": [_rich(e) for e in body.get("embeds") or []],
            "pinned": False, "type": 20 if webhook else (19 if body.get("message_reference") else 0),
            "flags": int(body.get("flags", 0)), "components": body.get("components") or [], "nonce": body.get("nonce"),
        }
        data |= _mentions(data["content"], body.get("allowed_mentions"))
        if webhook:
            data["webhook_id"] = str(APP_ID)
        channel = self.threads.get(channel_id) or self.channels.get(channel_id, {})
        if channel.get("guild_id"):
            data["guild_id"] = channel["guild_id"]
        if body.get("message_reference"):
            data["message_reference"] = body["message_reference"] | {"channel_id": str(channel_id)}
            data["referenced_message"] = self.messages.get(int(body["message_reference"]["message_id"]))
        if uploads:
            data["attachments"] = [
                {"id": str(self._next_id()), "filename": u.filename, "size": len(u.data), "description": u.description,
                 "url": f"https://cdn.discordapp.com/attachments/{channel_id}/{message_id}/{u.filename}",
                 "proxy_url": f"https://media.discordapp.net/attachments/{channel_id}/{message_id}/{u.filename}"}
                for u in uploads
            ]
            self.uploads[message_id] = uploads
        self.messages[message_id] = data
        if data["nonce"]:
            self._bot_nonces.setdefault((data["channel_id"], data["nonce"]), data)
        self._spawn(self.dispatch("MESSAGE_CREATE", data))  # the bot sees its own posts, as on Discord
        return data

    async def _post_message(self, request: web.Request, body: Any, channel_id: str) -> web.Response:
        cid = int(channel_id)
        channel = self.threads.get(cid) or self.channels.get(cid)
        if channel is None:
            return self._error(404, 10003, "Unknown Channel")
        if channel["type"] == 15:
            return self._error(400, 50008, "Cannot send messages in a non-text channel")
        in_thread = cid in self.threads
        refused = self._refusal(cid, P(send_messages_in_threads=True) if in_thread else P(send_messages=True))
        if refused is not None:
            return refused
        if request.get(UPLOADS):  # files need Attach Files as well
            refused = self._refusal(cid, P(attach_files=True))
            if refused is not None:
                return refused
        content = body.get("content") or ""
        if len(content) > 2000:
            return self._json({"message": "Invalid Form Body", "code": 50035, "errors": {"content": {"_errors": [
                {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}}}, 400)
        if body.get("enforce_nonce") and body.get("nonce"):
            existing = self._bot_nonces.get((channel_id, body["nonce"]))
            if existing is not None:
                return self._json(existing)  # Discord returns the earlier message and creates none
        return self._json(self._create_bot_message(cid, body, uploads=request.get(UPLOADS)))

    async def _get_messages(self, request: web.Request, body: Any, channel_id: str) -> web.Response:
        """Channel history as Discord gives it: newest first, `after` / `before` / `limit` (ephemeral ones never)."""
        cid = int(channel_id)
        if cid not in self.threads and cid not in self.channels:
            return self._error(404, 10003, "Unknown Channel")
        query = request.query
        after, before = int(query.get("after", 0)), int(query.get("before", 0)) or None
        limit = min(int(query.get("limit", 50)), 100)
        found = [
            m for mid, m in self.messages.items()
            if int(m["channel_id"]) == cid and not int(m.get("flags", 0)) & 64 and mid > after
            and (before is None or mid < before)
        ]
        found.sort(key=lambda m: int(m["id"]))
        # With only `after`, Discord returns the `limit` messages right after it (still newest first).
        page = found[:limit] if after and before is None else found[-limit:]
        return self._json(list(reversed(page)))

    async def _edit_message(self, request: web.Request, body: Any, channel_id: str, message_id: str) -> web.Response:
        message = self.messages.get(int(message_id))
        if message is None or int(message["channel_id"]) != int(channel_id):
            return self._error(404, 10008, "Unknown Message")
        return self._json(self._apply_edit(message, body))

    def _apply_edit(self, message: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        self.edits.append((int(message["id"]), body))
        if "content" in body:
            message["content"] = body["content"] or ""
            message |= _mentions(message["content"], body.get("allowed_mentions"))
        if "embeds" in body:
            message["embeds"] = [_rich(e) for e in body["embeds"] or []]
        if "components" in body:
            message["components"] = body["components"] or []
        message["edited_timestamp"] = _now()
        return message

    async def _edit_original(self, request: web.Request, body: Any, app_id: str, token: str) -> web.Response:
        # For a component interaction, the "original response" is the message the button is on.
        interaction = self.interactions.get(int(token.removeprefix("itoken-")))
        if interaction is None or "message" not in interaction:
            return self._error(404, 10008, "Unknown Message")
        return self._json(self._apply_edit(self.messages[int(interaction["message"]["id"])], body))

    async def _start_thread(self, request: web.Request, body: Any, channel_id: str, message_id: str) -> web.Response:
        mid = int(message_id)
        if mid in self.threads:
            return self._error(400, 160004, "A thread has already been created for this message")
        if mid not in self.messages:
            return self._error(404, 10008, "Unknown Message")
        if self.channels.get(int(channel_id), {}).get("type") != 0:
            return self._error(400, 50024, "Cannot execute action on this channel type")
        refused = self._refusal(int(channel_id), P(create_public_threads=True, read_message_history=True))
        if refused is not None:
            return refused
        thread = self._thread_payload(mid, int(channel_id), body.get("name", "thread"), owner=BOT_ID)
        thread["thread_metadata"]["auto_archive_duration"] = body.get("auto_archive_duration", 1440)
        self.threads[mid] = thread
        self._spawn(self.dispatch("THREAD_CREATE", thread | {"newly_created": True}))
        return self._json(thread, 201)

    async def _open_dm(self, request: web.Request, body: Any) -> web.Response:
        """POST /users/@me/channels {recipient_id}: the bot's DM channel with that user (made on first use)."""
        user_id = int(body["recipient_id"])
        if user_id not in USERS:
            return self._error(400, 50007, "Cannot send messages to this user")
        existing = next(
            (c for c in self.channels.values() if c["type"] == 1 and c["recipients"][0]["id"] == str(user_id)), None
        )
        if existing is None:
            existing = {"id": str(self._next_id()), "type": 1, "recipients": [USERS[user_id]],
                        "last_message_id": None, "flags": 0}
            self.channels[int(existing["id"])] = existing
        return self._json(existing)

    async def _typing(self, request: web.Request, body: Any, channel_id: str) -> web.Response:
        return web.Response(status=204)

    async def _put_commands(self, request: web.Request, body: Any, app_id: str) -> web.Response:
        self.commands = [
            cmd | {"id": str(self._next_id()), "application_id": app_id, "version": "1", "type": cmd.get("type", 1)}
            for cmd in body
        ]
        return self._json(self.commands)

    async def _get_commands(self, request: web.Request, body: Any, app_id: str) -> web.Response:
        return self._json(self.commands)

    async def _interaction_callback(
        self, request: web.Request, body: Any, interaction_id: str, token: str
    ) -> web.Response:
        self.interaction_callbacks.append(body)
        self.callbacks_of.setdefault(interaction_id, []).append(body)
        interaction = self.interactions.get(int(interaction_id), {})
        if body.get("type") == 7 and "message" in interaction:  # UPDATE_MESSAGE: edit the clicked message
            self._apply_edit(self.messages[int(interaction["message"]["id"])], body.get("data") or {})
        flags = int((body.get("data") or {}).get("flags", 0))
        return self._json({
            "interaction": {
                "id": interaction_id, "type": interaction.get("type", 2),
                "response_message_loading": body.get("type") == 5, "response_message_ephemeral": bool(flags & 64),
            },
            "resource": {"type": body.get("type")},
        })

    async def _followup(self, request: web.Request, body: Any, app_id: str, token: str) -> web.Response:
        interaction_id = int(token.removeprefix("itoken-"))
        channel_id = self._interaction_channels.get(interaction_id, GENERAL)
        data = self._create_bot_message(channel_id, body, webhook=True)
        return self._json(data)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(frozen=True)
class Upload:
    """A file posted with a message (multipart files[n]); its description comes from payload_json's attachments."""

    filename: str
    data: bytes
    description: str = ""


UPLOADS = web.RequestKey("uploads", list[Upload])


def _multipart(raw: bytes, content_type: str) -> tuple[Any, list[Upload]]:
    """(payload_json, the files) of a multipart/form-data body, as discord.py sends a message with files."""
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    body: Any = None
    files: list[tuple[str, str, bytes]] = []
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name == "payload_json":
            body = json.loads(data)
        elif isinstance(name, str) and name.startswith("files["):
            files.append((name, str(part.get_filename() or ""), data))
    described = {str(a.get("filename")): str(a.get("description") or "") for a in (body or {}).get("attachments", [])}
    return body, [Upload(filename, data, described.get(filename, "")) for _, filename, data in files]


def _rich(embed: dict[str, Any]) -> dict[str, Any]:
    return {"type": "rich", **embed}


_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")


def _mentions(content: str, allowed: dict[str, Any] | None) -> dict[str, Any]:
    """Who a message pings, as Discord decides it from the content and allowed_mentions."""
    parse = {"users", "roles", "everyone"} if allowed is None else set(allowed.get("parse") or [])
    users = {str(u) for u in (allowed or {}).get("users") or []}
    roles = {str(r) for r in (allowed or {}).get("roles") or []}
    pinged_users = [u for u in dict.fromkeys(_USER_MENTION.findall(content)) if "users" in parse or u in users]
    pinged_roles = [r for r in dict.fromkeys(_ROLE_MENTION.findall(content)) if "roles" in parse or r in roles]
    return {
        "mentions": [USERS.get(int(u), _user(int(u), f"user{u}")) for u in pinged_users],
        "mention_roles": pinged_roles,
        "mention_everyone": "everyone" in parse and ("@everyone" in content or "@here" in content),
    }


@contextlib.asynccontextmanager
async def running_fake(**kw: Any) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord(**kw)
    await fake.start()
    try:
        with fake.patched():
            yield fake
    finally:
        await fake.stop()


