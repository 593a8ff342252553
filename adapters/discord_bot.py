"""The Discord adapter: discord.py's Client in our loop, messages in as Inbound, answers and alert cards out."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp
import discord
from aiohttp.web import Application
from discord import app_commands

from adapters.discord_alerts import (
    ALERT_EXPIRED,
    ALERT_FAILED,
    HUMAN_ALREADY_ASKED,
    HUMAN_CONFIRMATION,
    HUMAN_UNAVAILABLE,
    AlertCards,
    human_view,
    jump_url,
    parse_human_id,
)
from adapters.discord_translate import (
    BotIdentity,
    Place,
    PlaceKind,
    click_conversation,
    content_withheld,
    translate_command,
    translate_message,
)
from bridge.cards import parse_action_id
from bridge.clock import Clock, SystemClock
from bridge.config import ReplyMode, Settings
from bridge.desk import AlertDesk
from bridge.messages import Conversation, Inbound, Outbound, OutboundKind
from bridge.store import Store

log = logging.getLogger(__name__)

# AI text must never ping anyone: no @everyone/@here, roles, users or the replied-to author.
NO_MENTIONS = discord.AllowedMentions.none()

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

THREAD_ALREADY_CREATED = 160004  # Discord's error code when a message already has a thread
THREAD_NAME_LIMIT = 100
THREAD_ARCHIVE_MINUTES = 1440
NONCE_LIMIT = 25
INTERACTION_LIFETIME = 15 * 60.0  # an interaction token accepts followups for 15 minutes
REMEMBERED = 5000  # recent message ids kept in memory (origins, the bot's own answers)

# The bridge never joins voice: silence discord.py's start-up warnings about voice libraries.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

OnMessage = Callable[[Inbound], Awaitable[object]]
K = TypeVar("K")
V = TypeVar("V")


class DiscordStartError(RuntimeError):
    """The Discord client could not connect; the message tells the operator what to change."""


class DiscordSetupError(RuntimeError):
    """A set-up helper (invite URL) cannot do its job; the message is plain and has no token."""


class _Recent(Generic[K, V]):
    """A bounded mapping that forgets the oldest entries first."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._size = size

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def as_mapping(self) -> Mapping[K, V]:
        return self._items


@dataclass(frozen=True)
class _Origin:
    """Where a user's message was posted, kept until it is answered."""

    place: Place
    guild_id: str
    hint: str  # the question's first words, for the thread name


def make_nonce(outbound: Outbound, index: int) -> str:
    """A nonce from the source message id, the kind and the part index (Discord allows 25 characters).

    The same answer part re-sent after a crash gets the same nonce, so Discord (with
    enforce_nonce) returns the earlier message instead of posting it twice. Notices add a
    digest of their text: a "queued" and an "error" notice on one message are different posts.
    """
    source = outbound.reply_to or outbound.conversation.key
    base = _base36(int(source)) if source.isdigit() else hashlib.sha1(source.encode()).hexdigest()[:12]
    if outbound.kind is OutboundKind.ANSWER:
        nonce = f"{base}a{index}"
    else:
        nonce = f"{base}n{hashlib.sha1(''.join(outbound.parts).encode()).hexdigest()[:6]}{index}"
    return nonce[-NONCE_LIMIT:]


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def thread_name(hint: str, fallback: str) -> str:
    """A readable thread title from the question's first line (Discord allows 100 characters)."""
    line = next((ln.strip() for ln in hint.splitlines() if ln.strip()), "")
    line = line.replace("`", "").replace("*", "").strip() or fallback
    return line if len(line) <= THREAD_NAME_LIMIT else line[: THREAD_NAME_LIMIT - 1].rstrip() + "…"


def place_of_channel(channel: object) -> Place | None:
    """The translation's view of a discord.py channel object."""
    if isinstance(channel, discord.Thread):
        parent = channel.parent
        return Place(
            str(channel.id),
            PlaceKind.THREAD,
            parent_id=str(channel.parent_id),
            parent_is_forum=isinstance(parent, discord.ForumChannel),
        )
    if isinstance(channel, discord.TextChannel):
        return Place(str(channel.id), PlaceKind.TEXT)
    if isinstance(channel, (discord.DMChannel, discord.GroupChannel)):
        return Place(str(channel.id), PlaceKind.DM)
    if isinstance(channel, (discord.VoiceChannel, discord.StageChannel)):
        return Place(str(channel.id), PlaceKind.OTHER)
    return None


class _Client(discord.Client):
    """discord.Client with its events handed to the adapter."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)

    async def on_ready(self) -> None:
        self.adapter._ready.set()

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        # Slash commands go through the command tree; button clicks come here.
        if interaction.type is discord.InteractionType.component:
            await self.adapter._on_component(interaction)

    async def on_socket_raw_receive(self, msg: str) -> None:
        # The raw payload is what the pure translation reads (and what tests record); a
        # cheap substring test skips heartbeats, presences and typing events.
        if '"MESSAGE_CREATE"' not in msg:
            return
        frame = json.loads(msg)
        if frame.get("t") == "MESSAGE_CREATE" and isinstance(frame.get("d"), dict):
            await self.adapter._on_message_payload(frame["d"])


class DiscordAdapter:
    """Discord through discord.py; translates and posts, the relay decides.

    Where answers go:
    - A channel message (mention, or any message in a `reply: all` channel) gets a public
      thread created on it; the thread's id equals the message id, so the conversation key
      (channel, thread=message id) never changes and follow-ups in the thread continue it.
    - Threads off (`discord.threads: false` or a route's `threads: false`): the answer is a
      reply in place. A platform reply to one of the bot's answers then continues the
      conversation that answer belonged to (the bot's message ids are remembered for that;
      after a restart the replied-to answer's own reference points at the question it answered).
    - DMs are one conversation per DM channel; forum posts and existing threads are answered
      in the thread itself.
    - Slash commands are acknowledged at once with a deferred response and answered through
      the interaction's followups.

    Alerts (AlertPoster): cards are embeds with Claim / Resolve buttons; a visitor session's
    cards share a thread on its first card, and an escalation there is also announced in the
    channel. Under answers, a "Talk to a human" button hands the thread over to the team.
    """

    name = "discord"
    # discord.py waits this long after the last GUILD_CREATE before on_ready; tests shorten it.
    guild_ready_timeout: float = 2.0
    start_timeout: float = 60.0
    # Not ready once the gateway has not acknowledged a heartbeat for this many intervals (plus
    # a second of slack), or when a heartbeat takes this long to be acknowledged.
    heartbeat_grace: float = 2.0
    max_latency: float = 10.0

    def __init__(
        self,
        settings: Settings,
        on_message: OnMessage,
        *,
        web: Application | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        desk: AlertDesk | None = None,
    ) -> None:
        if settings.discord is None:
            raise ValueError("the config has no discord section")
        self._settings = settings
        self._config = settings.discord
        self._on_message = on_message
        self._web = web  # not needed: Discord reaches us over the gateway only
        self._store = store
        self._clock = clock or SystemClock()
        self._desk = desk  # alert buttons and "Talk to a human" go through it
        self._client: _Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._origins: _Recent[str, _Origin] = _Recent()
        self._roots: _Recent[str, str] = _Recent()  # the bot's message id -> conversation thread root
        self._places: _Recent[int, Place] = _Recent(500)  # threads fetched over REST
        self._threads: _Recent[str, bool] = _Recent(1000)  # threads this process created
        self._interactions: dict[str, tuple[float, discord.Interaction]] = {}
        self._pending: set[asyncio.Future[object]] = set()
        self._cards = AlertCards(self._require_client)
        # discord.py's keep-alive stamps heartbeats with perf_counter; tests may replace it.
        self._perf: Callable[[], float] = time.perf_counter

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def intents(self) -> discord.Intents:
        intents = discord.Intents.none()
        intents.guilds = True  # channel and thread cache: parents of threads, forum detection
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = self._config.message_content_intent
        return intents

    @property
    def client(self) -> discord.Client | None:
        return self._client

    def _make_client(self) -> _Client:
        client = _Client(
            self,
            intents=self.intents,
            allowed_mentions=NO_MENTIONS,  # the default for anything sent, on top of each send's own
            enable_debug_events=True,  # on_socket_raw_receive: the payloads the translation reads
            guild_ready_timeout=self.guild_ready_timeout,
            max_messages=None,  # nothing here reads discord.py's message cache
            chunk_guilds_at_startup=False,
        )
        self._add_commands(client.tree)
        return client

    def _add_commands(self, tree: app_commands.CommandTree[Any]) -> None:
        adapter = self

        async def ask(interaction: discord.Interaction, question: str) -> None:
            await adapter._on_command(interaction, question)

        async def reset(interaction: discord.Interaction) -> None:
            await adapter._on_command(interaction, "reset")

        try:
            ask_command = app_commands.Command(
                name=self._config.ask_command, description="Ask the chatbot a question", callback=ask
            )
            app_commands.describe(question="Your question for the chatbot")(ask_command)
            reset_command = app_commands.Command(
                name=self._config.reset_command, description="Start a new conversation with the chatbot here", callback=reset
            )
        except (ValueError, TypeError) as exc:
            raise DiscordStartError(
                f"discord.ask_command / discord.reset_command: {exc} (lowercase letters, digits, - or _, up to 32)"
            ) from None
        tree.add_command(ask_command)
        tree.add_command(reset_command)

    async def start(self) -> None:
        """Log in, connect the gateway and return once Discord says ready; raise a plain error otherwise."""
        if self._client is not None:
            return
        self._stopping = False
        self._ready = asyncio.Event()
        self._client = client = self._make_client()
        self._task = task = asyncio.get_running_loop().create_task(client.start(self._config.token), name="discord-client")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({task, ready}, timeout=self.start_timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled mid-start (a signal): leave nothing running
            await self.stop()
            raise
        finally:
            ready.cancel()
        if not self._ready.is_set():
            error = describe_failure(task.exception() if task.done() and not task.cancelled() else None, self.start_timeout)
            await self.stop()
            raise error
        task.add_done_callback(self._client_ended)
        user = client.user
        log.info("discord: logged in as %s (%s) in %d server(s)", user, user.id if user else "?", len(client.guilds))
        self._log_intents()
        await self._sync_commands(client)

    def _log_intents(self) -> None:
        if self._config.message_content_intent:
            return
        needs_content = [
            r for r in self._settings.routes if r.platform in ("discord", "*") and r.reply is ReplyMode.ALL
        ]
        log.log(
            logging.WARNING if needs_content else logging.INFO,
            "discord: running without the Message Content intent: only mentions of the bot, DMs, replies "
            "that ping the bot and slash commands carry text; reply: all channels and thread follow-ups "
            "without a mention get no answer. To answer those, switch on Message Content Intent in the "
            "Developer Portal (Bot tab) and set discord.message_content_intent: true",
        )

    async def _sync_commands(self, client: _Client) -> None:
        try:
            synced = await client.tree.sync()
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            # Mentions and DMs work without them; the invite may lack applications.commands.
            log.warning("discord: could not register the slash commands: %s", exc)
            return
        log.info("discord: slash commands registered: %s", ", ".join("/" + c.name for c in synced))

    def _client_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("discord: the connection ended and will not come back: %s", describe_failure(exc, 0))
        else:
            log.error("discord: the connection ended")

    async def stop(self) -> None:
        """Close the gateway and the HTTP session; safe twice and after a failed start."""
        self._stopping = True
        client, task = self._client, self._task
        self._client = self._task = None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=10)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=1)
            elif not task.cancelled():
                task.exception()  # retrieved: a failed start already raised its own error
        for pending in list(self._pending):
            pending.cancel()

    def readiness(self) -> str | None:
        """None while the gateway is live by its own heartbeat; else why not, in plain words.

        A socket can look open while Discord has stopped answering: the last heartbeat ACK
        tells (discord.py itself only reconnects after a minute without any frame).
        """
        client, task = self._client, self._task
        if client is None or task is None or task.done():
            return "not connected to Discord"
        if client.is_closed():
            return "the Discord gateway connection is closed"
        ws = client.ws
        keep_alive = getattr(ws, "_keep_alive", None) if ws is not None else None
        if ws is None or keep_alive is None or ws.socket.closed or not client.is_ready():
            return "connecting to the Discord gateway"
        interval = float(keep_alive.interval or 0.0)
        silent = self._perf() - keep_alive._last_ack
        if interval and silent > self.heartbeat_grace * interval + 1.0:
            return f"the Discord gateway has not acknowledged a heartbeat for {silent:.1f} s (interval {interval:.1f} s)"
        latency = float(keep_alive.latency)  # infinite until the first ACK
        if latency == float("inf"):
            return "the Discord gateway has not acknowledged a heartbeat yet"
        if latency > self.max_latency:
            return f"the Discord gateway is slow: heartbeat latency {latency:.1f} s"
        return None

    # --- inbound -----------------------------------------------------------------------------

    def _identity(self, guild_id: str) -> BotIdentity:
        client = self._client
        if client is None or client.user is None:
            return BotIdentity("")
        roles: frozenset[str] = frozenset()
        guild = client.get_guild(int(guild_id)) if guild_id else None
        if guild is not None and guild.self_role is not None:
            roles = frozenset({str(guild.self_role.id)})
        return BotIdentity(str(client.user.id), roles)

    async def _place_of(self, data: Mapping[str, Any]) -> Place | None:
        channel_id = int(data["channel_id"])
        if not data.get("guild_id"):
            return Place(str(channel_id), PlaceKind.DM)
        client = self._client
        if client is None:
            return None
        place = place_of_channel(client.get_channel(channel_id)) or self._places.get(channel_id)
        if place is not None:
            return place
        try:
            # A thread discord.py has not seen (archived, or older than this process).
            place = place_of_channel(await client.fetch_channel(channel_id))
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.warning("discord: cannot look up channel %s: %s", channel_id, exc)
            return None
        if place is not None:
            self._places[channel_id] = place
        return place

    async def _on_message_payload(self, data: dict[str, Any]) -> None:
        guild_id = str(data.get("guild_id") or "")
        place = await self._place_of(data)
        if place is None:
            log.debug("discord: message %s in a channel the bot cannot use", data.get("id"))
            return
        inbound = translate_message(data, self._identity(guild_id), place, roots=self._roots.as_mapping())
        if inbound is None:
            return
        if content_withheld(data, inbound, has_intent=self._config.message_content_intent):
            log.debug("discord: message %s arrived without content (no Message Content intent)", inbound.message_id)
            return
        if not inbound.author_is_self:
            self._origins[inbound.message_id] = _Origin(place, guild_id, inbound.text[:200])
        self._submit(inbound)  # every candidate: the relay decides, own messages included

    def _submit(self, inbound: Inbound) -> None:
        # relay.submit returns a running task; anything else awaitable is scheduled here,
        # so the gateway reader never waits for an answer.
        result = asyncio.ensure_future(self._on_message(inbound))
        self._pending.add(result)
        result.add_done_callback(self._pending.discard)

    async def _on_command(self, interaction: discord.Interaction, text: str) -> None:
        try:
            # First thing: Discord drops an interaction not acknowledged within 3 seconds.
            await interaction.response.defer(thinking=True)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.warning("discord: could not acknowledge a slash command in time: %s", exc)
            return
        now = self._clock.monotonic()
        self._interactions = {k: v for k, v in self._interactions.items() if now - v[0] < INTERACTION_LIFETIME}
        self._interactions[str(interaction.id)] = (now, interaction)
        place = place_of_channel(interaction.channel)
        if place is None:
            place = Place(str(interaction.channel_id or ""), PlaceKind.DM if interaction.guild_id is None else PlaceKind.OTHER)
        user = interaction.user
        self._submit(
            translate_command(
                interaction_id=str(interaction.id),
                guild_id=str(interaction.guild_id or ""),
                place=place,
                author_id=str(user.id),
                author_name=user.display_name,
                author_is_bot=user.bot,
                text=text,
            )
        )

    # --- buttons -----------------------------------------------------------------------------

    async def _on_component(self, interaction: discord.Interaction) -> None:
        """A button click: Claim / Resolve on an alert card, or "Talk to a human" under an answer."""
        custom_id = str((interaction.data or {}).get("custom_id", ""))
        action = parse_action_id(custom_id)
        chatbot_id = parse_human_id(custom_id)
        if action is None and chatbot_id is None:
            return  # not ours
        try:
            # First thing: Discord shows "interaction failed" unless acknowledged within 3 seconds.
            await interaction.response.defer()  # DEFERRED_UPDATE_MESSAGE: no visible reply yet
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.warning("discord: could not acknowledge a button click in time: %s", exc)
            return
        if action is not None:
            await self._on_alert_button(interaction, *action)
        elif chatbot_id is not None:
            await self._on_human_button(interaction, chatbot_id)

    async def _on_alert_button(self, interaction: discord.Interaction, action: str, alert_id: str) -> None:
        if self._desk is None:
            await self._tell(interaction, ALERT_FAILED)
            return
        # Footers do not render mentions, so the card names the person as people see them.
        who = interaction.user.display_name
        try:
            alert = await self._desk.act(alert_id, action, who)
        except Exception:
            log.exception("discord: recording %s on alert %s failed", action, alert_id)
            await self._tell(interaction, ALERT_FAILED)
            return
        if alert is None:
            log.info("discord: %s on unknown alert %s", action, alert_id)
            await self._tell(interaction, ALERT_EXPIRED)
            return
        log.info("discord: %s on alert %s by user %s", action, alert_id, interaction.user.id)

    async def _on_human_button(self, interaction: discord.Interaction, chatbot_id: str) -> None:
        conversation = self._conversation_of_click(interaction)
        if self._desk is None:
            await self._tell(interaction, HUMAN_UNAVAILABLE)
            return
        try:
            if await self._desk.paused(conversation):
                await self._tell(interaction, HUMAN_ALREADY_ASKED)
                return
            await self._desk.request_human(chatbot_id, conversation, interaction.user.display_name)
        except Exception:
            log.exception("discord: talk-to-a-human in %s could not be recorded", conversation.key)
            await self._tell(interaction, HUMAN_UNAVAILABLE)
            return
        log.info("discord: talk-to-a-human requested in %s by user %s", conversation.key, interaction.user.id)
        try:
            # The button has done its job: take it off the answer so it is not pressed again.
            await interaction.edit_original_response(view=None)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.info("discord: could not remove the talk-to-a-human button: %s", exc)
        try:
            await self.send(Outbound(conversation, (HUMAN_CONFIRMATION,), OutboundKind.NOTICE))
        except (discord.HTTPException, aiohttp.ClientError, OSError, RuntimeError) as exc:
            log.warning("discord: the talk-to-a-human confirmation in %s failed: %s", conversation.key, exc)
            await self._tell(interaction, HUMAN_CONFIRMATION)

    def _conversation_of_click(self, interaction: discord.Interaction) -> Conversation:
        place = place_of_channel(interaction.channel)
        if place is None:
            place = Place(str(interaction.channel_id or ""), PlaceKind.DM if interaction.guild_id is None else PlaceKind.OTHER)
        message = interaction.message
        reference = message.reference if message is not None else None
        metadata = message.interaction_metadata if message is not None else None
        return click_conversation(
            guild_id=str(interaction.guild_id or ""),
            place=place,
            message_id=str(message.id) if message is not None else "",
            replied_id=str(reference.message_id) if reference is not None and reference.message_id else "",
            interaction_id=str(metadata.id) if metadata is not None else "",
            roots=self._roots.as_mapping(),
        )

    async def _tell(self, interaction: discord.Interaction, text: str) -> None:
        """A reply only the clicking person sees."""
        try:
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.info("discord: could not answer a button click: %s", exc)

    # --- alerts (AlertPoster) ------------------------------------------------------------------

    async def post_alert(self, channel: str, card: dict[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        """Post a card (bridge.cards.discord_card); returns "<message>" or "<thread>/<message>"."""
        return await self._cards.post(channel, card, thread=thread, broadcast=broadcast, key=key)

    async def find_alert(self, channel: str, key: str, *, since: float, thread: str) -> str | None:
        return await self._cards.find(channel, key, since=since, thread=thread)

    async def update_alert(self, channel: str, reference: str, card: dict[str, Any]) -> None:
        await self._cards.update(channel, reference, card)

    async def permalink(self, conversation: Conversation) -> str | None:
        """A link to the conversation's thread (or, with threads off, to the question it answers)."""
        if conversation.platform != self.name:
            return None
        if not conversation.workspace:
            return jump_url(None, conversation.channel)
        if not conversation.thread:
            return jump_url(conversation.workspace, conversation.channel)
        if conversation.thread.isdigit() and self._client is not None and await self._thread_place(int(conversation.thread)):
            return jump_url(conversation.workspace, conversation.thread)
        return jump_url(conversation.workspace, conversation.channel, conversation.thread)

    # --- outbound ----------------------------------------------------------------------------

    def _require_client(self) -> _Client:
        if self._client is None:
            raise RuntimeError("the Discord adapter is not running")
        return self._client

    def _threads_on(self, workspace: str, channel: str) -> bool:
        route = self._settings.route_for(self.name, workspace, channel, False)
        if route is not None and route.threads is not None:
            return route.threads
        return self._config.threads

    async def _origin_of(self, outbound: Outbound) -> _Origin:
        origin = self._origins.get(outbound.reply_to) if outbound.reply_to else None
        if origin is not None:
            return origin
        # Not seen by this process (a restart, or a notice from the outbox): infer from the key.
        conversation = outbound.conversation
        if not conversation.workspace:
            return _Origin(Place(conversation.channel, PlaceKind.DM), "", "")
        thread = conversation.thread
        if thread and thread != outbound.reply_to and thread.isdigit():
            place = await self._thread_place(int(thread))
            if place is not None:
                return _Origin(place, conversation.workspace, "")
        return _Origin(Place(conversation.channel, PlaceKind.TEXT), conversation.workspace, "")

    async def _thread_place(self, channel_id: int) -> Place | None:
        """The thread with this id, from discord.py's cache or REST; None when there is no such thread."""
        client = self._require_client()
        place = place_of_channel(client.get_channel(channel_id)) or self._places.get(channel_id)
        if place is None:
            try:
                place = place_of_channel(await client.fetch_channel(channel_id))
            except discord.NotFound:
                return None  # threads off: the conversation's "thread" is the question's id
            except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
                log.info("discord: cannot look up channel %s: %s", channel_id, exc)
                return None
            if place is not None:
                self._places[channel_id] = place
        return place if place is not None and place.kind is PlaceKind.THREAD else None

    def _human_chatbot(self, conversation: Conversation) -> str:
        """The chatbot a "Talk to a human" button under an answer names: the route's.

        None in DMs: nobody from the team can see or write in a person's DM with the bot.
        """
        if not conversation.workspace:
            return ""
        route = self._settings.route_for(self.name, conversation.workspace, conversation.channel, False)
        return route.chatbot if route is not None else ""

    async def send(self, outbound: Outbound) -> list[str]:
        """Post the parts in order where the conversation lives; returns the message ids; raises on failure.

        A notice with no message to answer (from the outbox: "I'm back") goes into the
        conversation's thread, or as a reply to its question when threads are off.
        """
        client = self._require_client()
        held = self._interactions.get(outbound.reply_to) if outbound.reply_to else None
        if held is not None and self._clock.monotonic() - held[0] < INTERACTION_LIFETIME:
            return await self._send_followups(held[1], outbound)
        origin = await self._origin_of(outbound)
        conversation = outbound.conversation
        answering = outbound.reply_to or conversation.thread
        reference: discord.MessageReference | None = None
        if origin.place.kind in (PlaceKind.DM, PlaceKind.THREAD):
            target_id = origin.place.channel_id
        elif (
            origin.place.kind is PlaceKind.TEXT
            and outbound.reply_to
            and conversation.thread == outbound.reply_to
            and self._threads_on(conversation.workspace, conversation.channel)
        ):
            target_id = await self._ensure_thread(origin, outbound.reply_to)
        else:
            target_id = origin.place.channel_id
            if answering.isdigit():
                reference = discord.MessageReference(
                    message_id=int(answering),
                    channel_id=int(origin.place.channel_id),
                    guild_id=int(origin.guild_id) if origin.guild_id else None,
                    fail_if_not_exists=False,  # the question was deleted: still answer
                )
        target = client.get_partial_messageable(int(target_id), guild_id=int(origin.guild_id) if origin.guild_id else None)
        last_view = self._answer_view(outbound)
        ids: list[str] = []
        for index, part in enumerate(outbound.parts):
            extra: dict[str, Any] = {}
            if last_view is not None and index == len(outbound.parts) - 1:
                extra["view"] = last_view
            message = await target.send(
                part,
                nonce=make_nonce(outbound, index),  # discord.py adds enforce_nonce with it
                allowed_mentions=NO_MENTIONS,
                reference=reference if index == 0 else None,  # type: ignore[arg-type]
                mention_author=False if reference is not None and index == 0 else None,
                **extra,
            )
            ids.append(str(message.id))
            self._roots[str(message.id)] = conversation.thread
        return ids

    def _answer_view(self, outbound: Outbound) -> discord.ui.View | None:
        """The "Talk to a human" button for the last part of an answer, when the relay offers it."""
        if not outbound.offer_human or outbound.kind is not OutboundKind.ANSWER:
            return None
        chatbot_id = self._human_chatbot(outbound.conversation)
        return human_view(chatbot_id) if chatbot_id else None

    async def _ensure_thread(self, origin: _Origin, message_id: str) -> str:
        """The thread on the user's message, created on first use; its id is the message id."""
        client = self._require_client()
        if message_id in self._threads or isinstance(client.get_channel(int(message_id)), discord.Thread):
            return message_id
        channel = client.get_channel(int(origin.place.channel_id))
        if not isinstance(channel, discord.TextChannel):
            channel = await client.fetch_channel(int(origin.place.channel_id))
        if not isinstance(channel, discord.TextChannel):
            raise RuntimeError(f"channel {origin.place.channel_id} cannot hold threads")
        fallback = f"Chat with {client.user.display_name if client.user else 'the bot'}"
        try:
            await channel.get_partial_message(int(message_id)).create_thread(
                name=thread_name(origin.hint, fallback), auto_archive_duration=THREAD_ARCHIVE_MINUTES
            )
        except discord.HTTPException as exc:
            # Created before a crash, or by a person in the meantime: post into it.
            if exc.code != THREAD_ALREADY_CREATED:
                raise
        self._threads[message_id] = True
        return message_id

    async def _send_followups(self, interaction: discord.Interaction, outbound: Outbound) -> list[str]:
        # Outside a thread a slash command's conversation is keyed by the interaction, which no
        # link can point at: the team would not find it, so no hand-over button there.
        last_view = self._answer_view(outbound) if isinstance(interaction.channel, discord.Thread) else None
        ids: list[str] = []
        for index, part in enumerate(outbound.parts):
            extra: dict[str, Any] = {}
            if last_view is not None and index == len(outbound.parts) - 1:
                extra["view"] = last_view
            message = await interaction.followup.send(part, allowed_mentions=NO_MENTIONS, wait=True, **extra)
            ids.append(str(message.id))
            self._roots[str(message.id)] = outbound.conversation.thread
        return ids

    @contextlib.asynccontextmanager
    async def working(self, inbound: Inbound) -> AsyncIterator[None]:
        """The typing indicator for the whole wait, where the user wrote (a slash command shows "thinking")."""
        client = self._client
        origin = self._origins.get(inbound.message_id)
        if inbound.is_command or client is None or origin is None:
            yield
            return
        typing = client.get_partial_messageable(int(origin.place.channel_id)).typing()
        try:
            await typing.__aenter__()
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.debug("discord: no typing indicator in %s: %s", origin.place.channel_id, exc)
            yield
            return
        try:
            yield
        finally:
            await typing.__aexit__(None, None, None)


# --- start-up errors -------------------------------------------------------------------------


def describe_failure(exc: BaseException | None, timeout: float) -> DiscordStartError:
    """A plain sentence for why the client did not connect (never the token)."""
    if exc is None:
        return DiscordStartError(f"Discord did not report ready within {timeout:.0f} s; check the network and discord.token")
    if isinstance(exc, discord.PrivilegedIntentsRequired) or (isinstance(exc, discord.ConnectionClosed) and exc.code == 4014):
        return DiscordStartError(
            "Discord refused the Message Content intent (gateway close code 4014): switch on Message Content "
            "Intent in the Developer Portal (Bot tab), or set discord.message_content_intent: false"
        )
    if isinstance(exc, discord.LoginFailure) or (isinstance(exc, discord.ConnectionClosed) and exc.code == 4004):
        return DiscordStartError(
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
    client = discord.Client(intents=discord.Intents.none())
    app_id: int | None = None
    try:
        await client.login(token)
        app_id = client.application_id
    except discord.LoginFailure:
        raise DiscordSetupError(
            "Discord refused the bot token (discord.token): copy a fresh token from the Developer Portal, Bot tab"
        ) from None
    except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
        log.warning("cannot ask Discord for the application id (%s); reading it from the token", type(exc).__name__)
    finally:
        await client.close()
    app_id = app_id or application_id_from_token(token)
    if app_id is None:
        raise DiscordSetupError("cannot tell the application id: Discord is unreachable and discord.token is not a bot token")
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
    client = discord.Client(intents=discord.Intents.none())
    problems: list[str] = []
    try:
        try:
            await client.login(config.token)
        except discord.LoginFailure:
            return ["discord.token: Discord refused the bot token; copy a fresh one from the Developer Portal, Bot tab"]
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
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
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            return problems + [f"discord: cannot list the bot's servers ({type(exc).__name__})"]
        for i, route in enumerate(settings.routes):
            if route.platform != "discord":
                continue
            if not config.message_content_intent and route.reply is ReplyMode.ALL:
                problems.append(
                    f"routes[{i}].reply: all needs the Message Content intent: set discord.message_content_intent: true "
                    "and switch it on in the Developer Portal (Bot tab)"
                )
            if route.workspace != "*" and route.workspace not in guild_ids:
                problems.append(
                    f"routes[{i}].workspace: the bot is not in Discord server {route.workspace}; "
                    "invite it with the URL from `insitechat-bridge discord-invite`"
                )
            if route.channel in ("*", "dm"):
                continue
            threads = route.threads if route.threads is not None else config.threads
            problem = await _check_channel(client, bot_id, route.channel, threads=threads, alerts=False)
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


async def _check_channel(client: discord.Client, bot_id: str, channel_id: str, *, threads: bool, alerts: bool) -> str:
    """One sentence about what stops the bot in this channel, or ""."""
    try:
        return await _channel_problem(client, bot_id, channel_id, threads=threads, alerts=alerts)
    except (discord.NotFound, discord.Forbidden):
        return f"the bot cannot see Discord channel {channel_id} (it does not exist, or the bot lacks View Channel)"
    except ValueError:
        return f"{channel_id!r} is not a Discord channel id"
    except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
        return f"could not check Discord channel {channel_id} ({type(exc).__name__})"


async def _channel_problem(client: discord.Client, bot_id: str, channel_id: str, *, threads: bool, alerts: bool) -> str:
    """What stops the bot posting in one channel, from REST payloads; raises on HTTP failures."""
    channel = await client.http.get_channel(int(channel_id))
    guild_id = channel.get("guild_id")
    if not guild_id:
        return ""  # a DM channel: nothing to grant
    if channel.get("parent_id") and int(channel.get("type", 0)) in (10, 11, 12):
        channel = await client.http.get_channel(int(channel["parent_id"]))
    guild = await client.http.get_guild(int(guild_id))
    member = await client.http.get_member(int(guild_id), int(bot_id))
    perms = channel_permissions(
        guild=guild, member=member, user_id=bot_id, overwrites=list(channel.get("permission_overwrites", []))
    )
    needed = discord.Permissions(view_channel=True, read_message_history=True)
    if int(channel.get("type", 0)) == 15:  # forum: posts are threads
        needed.send_messages_in_threads = True
    else:
        needed.send_messages = True
        if threads:
            needed.create_public_threads = True
            needed.send_messages_in_threads = True
    if alerts:
        needed.embed_links = True
    missing = _missing(perms, needed)
    if missing:
        return f"in #{channel.get('name', channel_id)} ({channel_id}) the bot lacks {', '.join(missing)}"
    return ""
