"""The Discord adapter: discord.py's Client in our loop, messages in as Inbound, answers and alert cards out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import discord
from discord import app_commands

from adapters.discord.alerts import AlertCards, jump_url
from adapters.discord.digest import DiscordDigests
from adapters.discord.interactions import DiscordInteractions
from adapters.discord.places import Memory, Origin, place_of_channel
from adapters.discord.posting import NO_MENTIONS, DiscordPoster
from adapters.discord.setup import REST_ERRORS, DiscordRefused, DiscordStartError, describe_failure, rest_intents
from adapters.discord.translate import (
    BotIdentity,
    Place,
    PlaceKind,
    content_withheld,
    translate_message,
)
from adapters.discord.cards import discord_card
from adapters.discord.formatting import to_discord
from bridge.alerts import Alert
from bridge.charts import Chart
from bridge.clock import Clock, SystemClock
from bridge.config import DiscordSettings
from bridge.desk import AlertDesk
from bridge.feedback import Feedback
from bridge.handover import HandOvers
from bridge.messages import Conversation, Inbound, Outbound
from bridge.report import Report
from bridge.ports import GatewayLease, PermanentSendError
from bridge.store import StoreError

log = logging.getLogger(__name__)

# The bridge never joins voice: silence discord.py's start-up warnings about voice libraries.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

OnMessage = Callable[[Inbound], Awaitable[object]]

PREPARE_TIMEOUT = 5.0  # seconds working() may spend opening the answer's thread before the question is asked
TYPING_WAIT = 5.0  # seconds a post waits, at most, for its question's typing indicator to be sent first


class _Client(discord.Client):
    """discord.Client with its events handed to the adapter."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)

    async def on_ready(self) -> None:
        # A gateway client being dropped (leadership moved on) must not mark its successor ready.
        if self.adapter._client is self:
            self.adapter._ready.set()

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        # Slash commands go through the command tree; button clicks come here.
        if interaction.type is discord.InteractionType.component:
            await self.adapter.interactions.on_component(interaction)
        elif interaction.type is discord.InteractionType.modal_submit:
            await self.adapter.interactions.on_modal_submit(interaction)

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

    Several replicas (`leadership`, a GatewayLease): every replica logs in over REST only and
    posts through that client (answers, notices, cards, interaction followups); only the lease
    holder also runs the gateway client, which hears messages and clicks. The gateway client is
    a second discord.py Client because `Client.close()` is the one clean way to end a gateway
    session and it closes the client's HTTP session too: a gateway dropped on losing the lease
    must not take the REST half with it. Without a lease this replica is the leader and one
    client does both, as ever.
    """

    name = "discord"
    # discord.py waits this long after the last GUILD_CREATE before on_ready; tests shorten it.
    guild_ready_timeout: float = 2.0
    start_timeout: float = 60.0
    # Not ready once the gateway has not acknowledged a heartbeat for this many intervals (plus
    # a second of slack), or when a heartbeat takes this long to be acknowledged.
    heartbeat_grace: float = 2.0
    max_latency: float = 10.0
    _ended: asyncio.Future[Exception] | None = None  # why client.start() ended (wait_ended)

    def __init__(
        self,
        config: DiscordSettings,
        on_message: OnMessage,
        *,
        clock: Clock | None = None,
        threads_for: Callable[[str, str], bool] | None = None,
        handovers: HandOvers | None = None,
        desk: AlertDesk | None = None,
        leadership: GatewayLease | None = None,
        needs_message_content: bool = False,
        feedback: Feedback | None = None,
    ) -> None:
        """`threads_for(guild, channel)`: answer a channel message in a new thread (default: discord.threads);
        `handovers` and `desk`: the core's answers to button clicks; `needs_message_content`: some route
        answers every message, which takes the Message Content intent (warned about at start without it)."""
        self._config = config
        self._on_message = on_message
        self._clock = clock or SystemClock()
        self._lease = leadership
        self._needs_message_content = needs_message_content
        self._client: _Client | None = None  # the gateway client (also the REST one without a lease)
        self._task: asyncio.Task[None] | None = None  # its client.start()
        self._rest: discord.Client | None = None  # with a lease: logged in over REST only, never on the gateway
        self._follower: asyncio.Task[None] | None = None  # with a lease: opens and closes the gateway as it moves
        self._ready = asyncio.Event()
        self._stopping = False
        self._memory = memory = Memory()
        self._pending: set[asyncio.Future[object]] = set()
        # Typing indicators on their way, by the id of the question they are for (working()).
        self._typing: dict[str, asyncio.Future[bool]] = {}
        self.poster = DiscordPoster(
            memory, self._clock,
            client=self._require_client, cached_channel=self._cached_channel, followup_of=self._followup_of,
            threads_for=threads_for or (lambda guild, channel: config.threads),
        )
        self.interactions = DiscordInteractions(
            config, memory, self.poster, self._accept_command, clock=self._clock, handovers=handovers, desk=desk,
            feedback=feedback,
        )
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
        self.interactions.add_commands(client.tree)
        return client

    def _make_rest_client(self) -> discord.Client:
        # Never connected: login() alone gives discord.py's HTTP client, which is all posting needs.
        return discord.Client(intents=rest_intents(), allowed_mentions=NO_MENTIONS, max_messages=None)

    async def start(self) -> None:
        """Log in, connect the gateway and return once Discord says ready; raise a plain error otherwise.

        DiscordRefused when another try cannot help (the token, the intent, a command name
        Discord refuses); DiscordStartError when it may (unreachable, slow, closed). With a
        lease: log in over REST, and connect the gateway only while this replica holds it.
        """
        if self._client is not None or self._rest is not None:
            return
        self._stopping = False
        self._ended = asyncio.get_running_loop().create_future()
        if self._lease is None:
            try:
                await self._open_gateway()
            except BaseException:
                await self.stop()
                raise
            return
        await self._start_with_lease(self._lease)

    async def _open_gateway(self) -> None:
        """Start a gateway client and return once Discord says ready; close it and raise a plain error otherwise."""
        self._ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            self._client = client = self._make_client()
        except DiscordStartError as exc:  # the slash command names: only a config change helps
            raise DiscordRefused(str(exc)) from None
        self._task = task = loop.create_task(client.start(self._config.token), name="discord-client")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({task, ready}, timeout=self.start_timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled mid-start (a signal, the lease gone): leave nothing running
            await self._close_gateway()
            raise
        finally:
            ready.cancel()
        if not self._ready.is_set():
            error = describe_failure(
                task.exception() if task.done() and not task.cancelled() else None, self.start_timeout
            )
            await self._close_gateway()
            raise error
        task.add_done_callback(self._client_ended)
        user = client.user
        log.info("discord: logged in as %s (%s) in %d server(s)", user, user.id if user else "?", len(client.guilds))
        self._log_intents()
        await self._sync_commands(client)

    async def _close_gateway(self) -> None:
        """Close the gateway client (its session ends; discord.py's close also ends its HTTP session)."""
        client, task = self._client, self._task
        self._client = self._task = None  # first: _client_ended ignores the end of a client closed on purpose
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

    # --- leadership (several replicas) -----------------------------------------------------------

    async def _start_with_lease(self, lease: GatewayLease) -> None:
        self._rest = rest = self._make_rest_client()
        try:
            async with asyncio.timeout(self.start_timeout):
                await rest.login(self._config.token)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, asyncio.TimeoutError):
                raise DiscordStartError(f"Discord did not answer the login within {self.start_timeout:.0f} s") from None
            if isinstance(exc, Exception):
                raise describe_failure(exc, self.start_timeout) from None
            raise
        log.info("discord: logged in as %s over REST; the gateway is for the replica holding the lease", rest.user)
        # The first holder connects within start(), so a refused intent still stops the bridge at start.
        changed = asyncio.ensure_future(lease.wait_changed())
        try:
            if lease.is_leader:
                await self._open_while_leader(changed)
        except BaseException:
            await self.stop()
            raise
        finally:
            changed.cancel()
        self._follower = asyncio.get_running_loop().create_task(self._follow_lease(lease), name="discord-lease")

    async def _open_while_leader(self, changed: asyncio.Future[None]) -> None:
        """Open the gateway; give up (and close it) if the lease moves on meanwhile. Raises what opening raised."""
        opening = asyncio.ensure_future(self._open_gateway())
        try:
            await asyncio.wait({opening, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not opening.done():
                opening.cancel()  # _open_gateway closes what it had started
                await asyncio.gather(opening, return_exceptions=True)
        if not opening.cancelled():
            opening.result()

    async def _follow_lease(self, lease: GatewayLease) -> None:
        """The gateway follows the lease: opened when this replica takes it, closed at once when it loses it."""
        try:
            while True:
                # Asked for before looking, so a change while the gateway opens or closes is not missed.
                changed = asyncio.ensure_future(lease.wait_changed())
                try:
                    if lease.is_leader and self._client is None:
                        log.info("discord: this replica now holds the gateway lease; connecting the gateway")
                        await self._open_while_leader(changed)
                    elif not lease.is_leader and self._client is not None:
                        log.warning(
                            "discord: this replica lost the gateway lease (now held by %s); closing the gateway",
                            lease.holder() or "nobody",
                        )
                        await self._close_gateway()
                    await changed
                finally:
                    changed.cancel()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The gateway would not open (or this loop broke): the supervisor starts afresh, with its backoff.
            reason = exc if isinstance(exc, DiscordStartError) else DiscordStartError(
                f"the Discord gateway could not follow the lease: {type(exc).__name__}: {exc}"
            )
            ended = self._ended
            if ended is not None and not ended.done():
                ended.set_result(reason)

    def _log_intents(self) -> None:
        if self._config.message_content_intent:
            return
        log.log(
            logging.WARNING if self._needs_message_content else logging.INFO,
            "discord: running without the Message Content intent: only mentions of the bot, DMs, replies "
            "that ping the bot and slash commands carry text; reply: all channels and thread follow-ups "
            "without a mention get no answer. To answer those, switch on Message Content Intent in the "
            "Developer Portal (Bot tab) and set discord.message_content_intent: true",
        )

    async def _sync_commands(self, client: _Client) -> None:
        try:
            synced = await client.tree.sync()
        except REST_ERRORS as exc:
            # Mentions and DMs work without them; the invite may lack applications.commands.
            log.warning("discord: could not register the slash commands: %s", exc)
            return
        log.info("discord: slash commands registered: %s", ", ".join("/" + c.name for c in synced))

    def _client_ended(self, task: asyncio.Task[None]) -> None:
        # discord.py resumes and reconnects what it can by itself: once client.start() has
        # ended, the connection is gone for good, and wait_ended() tells the supervisor why.
        if self._stopping or task is not self._task:
            return
        exc = None if task.cancelled() else task.exception()
        reason: Exception
        if exc is None:
            reason = DiscordStartError("the Discord client stopped")
        else:
            reason = describe_failure(exc, 0)
            if not isinstance(reason, DiscordRefused) and not isinstance(exc, discord.ConnectionClosed):
                # Not a connection problem: discord.py itself failed (a frame it could not handle).
                reason = DiscordStartError(f"the Discord client stopped on {type(exc).__name__}: {exc}")
        log.debug("discord: client.start() ended: %s", reason)
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(reason)

    async def wait_ended(self) -> Exception:
        """Return once discord.py's client has stopped for good, with why (DiscordRefused: it cannot heal)."""
        ended = self._ended
        if ended is None:
            raise RuntimeError("the Discord adapter was not started")
        # Shielded: the supervisor stopping its wait must not cancel the adapter's record.
        return await asyncio.shield(ended)

    async def stop(self) -> None:
        """Close the gateway and the HTTP session; safe twice and after a failed start."""
        self._stopping = True
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        await self._close_gateway()
        rest, self._rest = self._rest, None
        if rest is not None:
            with contextlib.suppress(Exception):
                await rest.close()
        for pending in list(self._pending):
            pending.cancel()

    def readiness(self) -> str | None:
        """None while the gateway is live by its own heartbeat; else why not, in plain words.

        A socket can look open while Discord has stopped answering: the last heartbeat ACK
        tells (discord.py itself only reconnects after a minute without any frame).
        With a lease, "ok (...)" names the replica on the gateway: a standby is ready (it
        posts over REST); the holder is ready while its gateway is live.
        """
        lease = self._lease
        if lease is None:
            return self._gateway_readiness()
        if self._rest is None or self._rest.is_closed():
            return "not connected to Discord"
        if not lease.is_leader:
            holder = lease.holder()
            if holder:
                return f"ok (standby; gateway held by {holder})"
            if lease.error:
                return f"ok (standby; cannot ask Redis which replica holds the gateway: {lease.error})"
            return "ok (standby; no replica holds the gateway right now)"
        if self._client is None:
            return "connecting to the Discord gateway (this replica holds the lease)"
        return self._gateway_readiness() or f"ok (gateway held here: {lease.holder()})"

    def _gateway_readiness(self) -> str | None:
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
            return (
                f"the Discord gateway has not acknowledged a heartbeat for {silent:.1f} s (interval {interval:.1f} s)"
            )
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
        client = self._poster()
        if client is None:
            return None
        place = place_of_channel(self._cached_channel(channel_id)) or self._memory.places.get(channel_id)
        if place is not None:
            return place
        try:
            # A thread discord.py has not seen (archived, or older than this process).
            place = place_of_channel(await client.fetch_channel(channel_id))
        except REST_ERRORS as exc:
            log.warning("discord: cannot look up channel %s: %s", channel_id, exc)
            return None
        if place is not None:
            self._memory.places[channel_id] = place
        return place

    async def _on_message_payload(self, data: dict[str, Any]) -> None:
        guild_id = str(data.get("guild_id") or "")
        place = await self._place_of(data)
        if place is None:
            log.debug("discord: message %s in a channel the bot cannot use", data.get("id"))
            return
        inbound = translate_message(data, self._identity(guild_id), place, roots=self._memory.roots.as_mapping())
        if inbound is None:
            return
        if content_withheld(data, inbound, has_intent=self._config.message_content_intent):
            # Passed on marked: in a thread the bot follows, the relay tells the person how to reach it.
            inbound = dataclasses.replace(inbound, text_withheld=True)
        if not inbound.author_is_self:
            self._memory.origins[inbound.message_id] = Origin(place, guild_id, inbound.text[:200])
        # Awaited here: Discord never redelivers a gateway event to a new session, so the
        # job is stored before anything else happens (the relay decides, own messages included).
        try:
            await self._on_message(inbound)
        except StoreError as exc:
            log.error("discord: message %s could not be stored and will not be answered: %s", inbound.message_id, exc)

    async def _accept_command(self, inbound: Inbound) -> None:
        # Slash commands: deferred already (Discord needs that within 3 s). Stored in a task
        # stop() can cancel; the command's own task (discord.py's, not the gateway reader) waits.
        result = asyncio.ensure_future(self._on_message(inbound))
        self._pending.add(result)
        result.add_done_callback(self._pending.discard)
        await result

    # --- outbound ----------------------------------------------------------------------------

    async def send(self, outbound: Outbound) -> list[str]:
        """Post the parts where the conversation lives (DiscordPoster.send)."""
        typing = self._typing.get(outbound.reply_to) if outbound.reply_to else None
        if typing is not None and not typing.done():
            # The indicator first: sent after the answer, it would show for seconds after it.
            await asyncio.wait({typing}, timeout=TYPING_WAIT)
        return await self.poster.send(outbound)

    async def tell_refused(self, inbound: Inbound, refusal: PermanentSendError) -> bool:
        """A DM to the asker saying why the answer is not in the channel (a channel has no ephemeral posts)."""
        client = self._poster()
        if client is None or inbound.is_dm or inbound.is_command or not inbound.author_id.isdigit():
            return False  # a DM refused is final; a slash command's followups are their own channel
        gone = isinstance(refusal.__cause__, discord.NotFound)
        reason = "the channel is gone" if gone else "I'm not allowed to post there"
        text = f"I couldn't post my answer in <#{inbound.channel}>: {reason}. You can ask me here instead."
        try:
            dm = await client.http.start_private_message(int(inbound.author_id))
            await client.get_partial_messageable(int(dm["id"])).send(text, allowed_mentions=NO_MENTIONS)
        except REST_ERRORS as exc:
            log.info("discord: could not tell user %s why the answer is missing either: %s", inbound.author_id, exc)
            return False
        return True

    # --- alerts (AlertPoster) ------------------------------------------------------------------

    def render(self, markdown: str) -> list[str]:
        """Discord Markdown parts (adapters/discord/formatting.py)."""
        return to_discord(markdown)

    def render_card(self, alert: Alert, mentions: tuple[str, ...]) -> dict[str, Any]:
        """An embed with buttons (adapters/discord/cards.py)."""
        return discord_card(alert, mentions)

    async def post_alert(self, channel: str, card: dict[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        """Post a card (render_card); returns "<message>" or "<thread>/<message>"."""
        return await self._cards.post(channel, card, thread=thread, broadcast=broadcast, key=key)

    async def find_alert(self, channel: str, key: str, *, since: float, thread: str) -> str | None:
        return await self._cards.find(channel, key, since=since, thread=thread)

    async def update_alert(self, channel: str, reference: str, card: dict[str, Any]) -> None:
        await self._cards.update(channel, reference, card)

    # --- the weekly digest (PostsDigest) -----------------------------------------------------------

    async def post_digest(self, channel: str, report: Report, charts: Sequence[Chart], *, key: str) -> str:
        """The report digest as an embed with the charts attached (adapters/discord/digest.py)."""
        return await DiscordDigests(self._require_client).post(channel, report, charts, key=key)

    async def find_digest(self, channel: str, key: str, *, since: float) -> str | None:
        """A digest posted with `key` since `since`: marked like an alert card, so found like one."""
        return await self._cards.find(channel, key, since=since, thread="")

    async def permalink(self, conversation: Conversation) -> str | None:
        """A link to the conversation's thread (or, with threads off, to the question it answers)."""
        if conversation.platform != self.name:
            return None
        if not conversation.workspace:
            return jump_url(None, conversation.channel)
        if not conversation.thread:
            return jump_url(conversation.workspace, conversation.channel)
        if (
            conversation.thread.isdigit()
            and self._poster() is not None
            and await self.poster.thread_place(int(conversation.thread))
        ):
            return jump_url(conversation.workspace, conversation.thread)
        return jump_url(conversation.workspace, conversation.channel, conversation.thread)

    # --- outbound ----------------------------------------------------------------------------

    def _poster(self) -> discord.Client | None:
        # With a lease every post goes through the REST client, also on the holder: a gateway
        # closed when the lease moves on never cuts a post (or a followup) in half.
        return self._rest if self._lease is not None else self._client

    def _require_client(self) -> discord.Client:
        client = self._poster()
        if client is None:
            raise RuntimeError("the Discord adapter is not running")
        return client

    def _cached_channel(self, channel_id: int) -> Any:
        """A channel from the gateway client's cache; None without a gateway (a standby asks over REST)."""
        client = self._client
        return client.get_channel(channel_id) if client is not None else None

    def _followup_of(self, interaction: discord.Interaction) -> discord.Webhook:
        """The interaction's followup webhook, on the posting client's HTTP session.

        interaction.followup rides the gateway client's session, which closes with the gateway
        when the lease moves on; the token is good for 15 minutes from any client. This is
        exactly what discord.py builds for interaction.followup, on the REST client's state.
        """
        client = self._poster()
        if self._lease is None or client is None:
            return interaction.followup
        payload: Any = {"id": interaction.application_id, "type": 3, "token": interaction.token}
        return discord.Webhook.from_state(data=payload, state=client._connection)

    @contextlib.asynccontextmanager
    async def working(self, inbound: Inbound) -> AsyncIterator[None]:
        """The typing indicator for the whole wait, where the answer will be (a slash command shows "thinking")."""
        client = self._poster()
        where = ""
        if not inbound.is_command and client is not None:
            try:
                # Bounded: a thread Discord is slow to open (its rate limit) must not hold up the question.
                async with asyncio.timeout(PREPARE_TIMEOUT):
                    where = await self.poster.answer_place(inbound)
            except TimeoutError:
                log.info("discord: the thread for %s is slow to open; answering first", inbound.message_id)
        if client is None or not where:
            yield
            return
        typing = client.get_partial_messageable(int(where)).typing()
        # Sent beside the question rather than before it: the question leaves one Discord round
        # trip sooner. A post for this question waits for it (send), so the order stays.
        started = asyncio.ensure_future(self._start_typing(typing, where))
        self._typing[inbound.message_id] = started
        try:
            yield
        finally:
            if self._typing.get(inbound.message_id) is started:
                del self._typing[inbound.message_id]
            if not started.done():
                started.cancel()
            await asyncio.gather(started, return_exceptions=True)
            if not started.cancelled() and started.result():
                await typing.__aexit__(None, None, None)

    @staticmethod
    async def _start_typing(typing: discord.context_managers.Typing, where: str) -> bool:
        """Show the typing indicator (discord.py repeats it every 5 s until __aexit__); False if Discord refused."""
        try:
            await typing.__aenter__()
        except REST_ERRORS as exc:
            log.debug("discord: no typing indicator in %s: %s", where, exc)
            return False
        return True
