"""Where Discord answers go: a thread on the question, a reply in place, or an interaction's followups."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import discord

from adapters.discord.alerts import delivery_nonce
from adapters.discord.feedback import answer_view
from adapters.discord.places import Memory, Origin, place_of_channel
from adapters.discord.setup import PERMISSION_NAMES, REST_ERRORS
from adapters.discord.translate import Place, PlaceKind
from bridge.clock import Clock
from bridge.messages import Conversation, Inbound, Outbound, OutboundKind
from bridge.ports import PermanentSendError

if TYPE_CHECKING:
    # Types only: imported on its own at run time, discord.types trips over a circular import.
    from discord.types.threads import ThreadArchiveDuration

log = logging.getLogger(__name__)

# AI text must never ping anyone: no @everyone/@here, roles, users or the replied-to author.
NO_MENTIONS = discord.AllowedMentions.none()

THREAD_ALREADY_CREATED = 160004  # Discord's error code when a message already has a thread
MISSING_ACCESS = 50001
MISSING_PERMISSIONS = 50013
WRONG_CHANNEL_TYPE = 50024  # "Cannot execute action on this channel type": no threads here
# What starting a thread on a message and answering in it takes, beyond posting in the channel.
THREAD_PERMISSIONS = discord.Permissions(
    create_public_threads=True, send_messages_in_threads=True, read_message_history=True
)
THREAD_NAME_LIMIT = 100
THREAD_ARCHIVE_MINUTES: ThreadArchiveDuration = 1440
NONCE_LIMIT = 25
INTERACTION_LIFETIME = 15 * 60.0
FIND_LIMIT = 100  # messages read back when looking for parts posted before a crash
DISCORD_EPOCH_SECONDS = discord.utils.DISCORD_EPOCH / 1000  # an interaction token accepts followups for 15 minutes


def make_nonce(outbound: Outbound, index: int) -> str:
    """A nonce from the delivery key (or else the source message id), and the part index; at most 25 characters.

    The same part re-sent after a crash gets the same nonce, so Discord (with enforce_nonce)
    returns the earlier message instead of posting it twice. The outbox's delivery key is
    unique per answer and per notice; without one, notices add a digest of their text: a
    "queued" and an "error" notice on one message are different posts.
    """
    if outbound.delivery is not None:
        return delivery_nonce(outbound.delivery.key, f"part{index}")
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


class DiscordPoster:
    """The Discord adapter's outbound half: answers and notices posted where the conversation lives."""

    def __init__(
        self,
        memory: Memory,
        clock: Clock,
        *,
        client: Callable[[], discord.Client],
        cached_channel: Callable[[int], Any],
        followup_of: Callable[[discord.Interaction], discord.Webhook],
        threads_for: Callable[[str, str], bool],
    ) -> None:
        """`client`: the client posts go through (raises when not running); `cached_channel`: the gateway
        client's cache (None without a gateway); `threads_for(guild, channel)`: answer in a new thread there."""
        self._memory = memory
        self._clock = clock
        self._client = client
        self._cached_channel = cached_channel
        self._followup_of = followup_of
        self._threads_for = threads_for

    async def answer_place(self, inbound: Inbound) -> str:
        """The channel id the answer to `inbound` will be posted in; "" when unknown (not seen by this process).

        Where the answer gets a thread of its own, the thread is opened now: the person sees it
        at once, and the typing indicator shows in it rather than in the channel they left.
        """
        origin = self._memory.origins.get(inbound.message_id)
        if origin is None:
            return ""
        place = origin.place
        if self._gets_own_thread(origin, inbound.conversation, inbound.message_id):
            try:
                return await self._ensure_thread(origin, inbound.message_id) or place.channel_id
            except REST_ERRORS as exc:
                # Not fatal: posting the answer tries again, and the typing shows in the channel meanwhile.
                log.info("discord: could not open the thread for %s yet: %s", inbound.message_id, exc)
        return place.channel_id

    def _gets_own_thread(self, origin: Origin, conversation: Conversation, message_id: str) -> bool:
        """Whether the answer to `message_id` goes in a thread opened on it: a channel message, threads on there."""
        return (
            origin.place.kind is PlaceKind.TEXT
            and bool(message_id)
            and conversation.thread == message_id
            and self._threads_for(conversation.workspace, conversation.channel)
        )

    async def _origin_of(self, outbound: Outbound) -> Origin:
        origin = self._memory.origins.get(outbound.reply_to) if outbound.reply_to else None
        if origin is not None:
            return origin
        # Not seen by this process (a restart, or a notice from the outbox): infer from the key.
        conversation = outbound.conversation
        if not conversation.workspace:
            return Origin(Place(conversation.channel, PlaceKind.DM), "", "")
        thread = conversation.thread
        if thread and thread != outbound.reply_to and thread.isdigit():
            place = await self.thread_place(int(thread))
            if place is not None:
                return Origin(place, conversation.workspace, "")
        return Origin(Place(conversation.channel, PlaceKind.TEXT), conversation.workspace, "")

    async def thread_place(self, channel_id: int) -> Place | None:
        """The thread with this id, from discord.py's cache or REST; None when there is no such thread."""
        client = self._client()
        place = place_of_channel(self._cached_channel(channel_id)) or self._memory.places.get(channel_id)
        if place is None:
            try:
                place = place_of_channel(await client.fetch_channel(channel_id))
            except discord.NotFound:
                return None  # threads off: the conversation's "thread" is the question's id
            except REST_ERRORS as exc:
                log.info("discord: cannot look up channel %s: %s", channel_id, exc)
                return None
            if place is not None:
                self._memory.places[channel_id] = place
        return place if place is not None and place.kind is PlaceKind.THREAD else None

    async def send(self, outbound: Outbound) -> list[str]:
        """Post the parts in order where the conversation lives; returns the message ids; raises on failure.

        A notice with no message to answer (from the outbox: "I'm back") goes into the
        conversation's thread, or as a reply to its question when threads are off or
        cannot be made. Raises PermanentSendError when Discord refuses for good: 404 (the
        channel is gone: 10003) or 403 (the bot may not post there: 50001, 50013, also after
        the reply in the channel was tried). Anything else it raises (429, 5xx, network, and
        also a 400 such as 50035) is left to the outbox to try again.
        """
        try:
            return await self._send(outbound)
        except (discord.NotFound, discord.Forbidden) as exc:
            raise PermanentSendError(
                f"discord refused the post to {outbound.conversation.channel} "
                f"({exc.status}, code {exc.code}: {exc.text})"
            ) from exc

    async def _send(self, outbound: Outbound) -> list[str]:
        client = self._client()
        held = self._memory.interactions.get(outbound.reply_to) if outbound.reply_to else None
        if held is not None and self._clock.monotonic() - held[0] < INTERACTION_LIFETIME:
            return await self._send_followups(held[1], outbound)
        origin = await self._origin_of(outbound)
        conversation = outbound.conversation
        answering = outbound.reply_to or conversation.thread
        reference: discord.MessageReference | None = None
        thread_id: str | None = None
        if self._gets_own_thread(origin, conversation, outbound.reply_to):
            # None when no thread can be made here: the answer becomes a reply to the question,
            # and a reply to it continues the conversation (thread = question id) through the memory of roots.
            thread_id = await self._ensure_thread(origin, outbound.reply_to)
        if origin.place.kind in (PlaceKind.DM, PlaceKind.THREAD):
            target_id = origin.place.channel_id
        elif thread_id is not None:
            target_id = thread_id
        else:
            target_id = origin.place.channel_id
            if answering.isdigit():
                reference = discord.MessageReference(
                    message_id=int(answering),
                    channel_id=int(origin.place.channel_id),
                    guild_id=int(origin.guild_id) if origin.guild_id else None,
                    fail_if_not_exists=False,  # the question was deleted: still answer
                )
        target = client.get_partial_messageable(
            int(target_id), guild_id=int(origin.guild_id) if origin.guild_id else None
        )
        last_view = self._answer_view(outbound)
        posted = (
            await self._posted_parts(target, outbound) if outbound.delivery and outbound.delivery.look_first else {}
        )
        ids: list[str] = []
        for index, part in enumerate(outbound.parts):
            if index in posted:
                ids.append(posted[index])
                continue
            extra: dict[str, Any] = {}
            if last_view is not None and index == len(outbound.parts) - 1:
                extra["view"] = last_view
            message = await target.send(
                part,
                nonce=make_nonce(outbound, index),  # discord.py adds enforce_nonce with it
                allowed_mentions=NO_MENTIONS,
                reference=reference if index == 0 else None,  # type: ignore[arg-type]
                # discord.py's send() overloads say bool; its implementation and docs take None (the default).
                mention_author=False if reference is not None and index == 0 else None,  # type: ignore[arg-type]
                **extra,
            )
            ids.append(str(message.id))
            self._memory.roots[str(message.id)] = conversation.thread
        return ids

    async def _posted_parts(self, target: discord.PartialMessageable, outbound: Outbound) -> dict[int, str]:
        """Parts an earlier attempt already posted here: the bot's own messages since the job began, by their text.

        Discord dedupes a re-sent nonce for a few minutes only; after a longer outage or a
        restart the history is what tells. A part counts once, matched in order.
        """
        delivery = outbound.delivery
        client = self._client()
        if delivery is None or client.user is None:
            return {}
        # A minute of slack for clock skew; history after a snowflake of that time.
        start = datetime.fromtimestamp(max(delivery.since - 60, DISCORD_EPOCH_SECONDS), UTC)
        after = discord.Object(id=discord.utils.time_snowflake(start))
        mine = [
            message
            async for message in target.history(after=after, limit=FIND_LIMIT, oldest_first=True)
            if message.author.id == client.user.id
        ]
        found: dict[int, str] = {}
        for index, part in enumerate(outbound.parts):
            match = next((m for m in mine if m.content == part), None)
            if match is not None:
                found[index] = str(match.id)
                mine.remove(match)
        if found:
            log.info("discord: %d of %d part(s) of %s were posted before; not posting them again",
                     len(found), len(outbound.parts), delivery.key)
        return found

    def _answer_view(self, outbound: Outbound, *, human: bool = True) -> discord.ui.View | None:
        """The buttons for the last part of an answer: "Talk to a human" when the relay offers it, 👍 / 👎."""
        if outbound.kind is not OutboundKind.ANSWER:
            return None
        return answer_view(outbound.human_chatbot if human else "", outbound.feedback_job)

    async def _ensure_thread(self, origin: Origin, message_id: str) -> str | None:
        """The thread on the user's message, created on first use (its id is the message id).

        None when Discord will not make one there (the bot lacks Create Public Threads, or
        the channel cannot hold threads): the caller answers in the channel instead, so the
        answer and any error notice still arrive.
        """
        client = self._client()
        known = self._memory.threads.get(message_id)
        if known is not None:  # opened, or refused, for this message before: asked once
            return message_id if known else None
        if isinstance(self._cached_channel(int(message_id)), discord.Thread):
            return message_id
        channel = self._cached_channel(int(origin.place.channel_id))
        if not isinstance(channel, discord.TextChannel):
            channel = await client.fetch_channel(int(origin.place.channel_id))
        if not isinstance(channel, discord.TextChannel):
            log.warning("discord: channel %s cannot hold threads; answering in the channel", origin.place.channel_id)
            self._memory.threads[message_id] = False
            return None
        fallback = f"Chat with {client.user.display_name if client.user else 'the bot'}"
        try:
            # Through the posting client, not the cached channel's own (the gateway client's) session.
            await client.http.start_thread_with_message(
                channel.id,
                int(message_id),
                name=thread_name(origin.hint, fallback),
                auto_archive_duration=THREAD_ARCHIVE_MINUTES,
            )
        except discord.HTTPException as exc:
            if isinstance(exc, discord.Forbidden) and exc.code in (MISSING_PERMISSIONS, MISSING_ACCESS):
                log.warning(
                    "discord: cannot start a thread in #%s (%s): the bot lacks %s; answering in the channel instead",
                    channel.name, channel.id, _thread_permissions_missing(channel, exc.code),
                )
                self._memory.threads[message_id] = False
                return None
            if exc.code == WRONG_CHANNEL_TYPE:
                log.warning("discord: channel %s cannot hold threads; answering in the channel", channel.id)
                self._memory.threads[message_id] = False
                return None
            # Created before a crash, or by a person in the meantime: post into it.
            if exc.code != THREAD_ALREADY_CREATED:
                raise
        self._memory.threads[message_id] = True
        return message_id

    async def _send_followups(self, interaction: discord.Interaction, outbound: Outbound) -> list[str]:
        # Outside a thread a slash command's conversation is keyed by the interaction, which no
        # link can point at: the team would not find it, so no hand-over button there.
        last_view = self._answer_view(outbound, human=isinstance(interaction.channel, discord.Thread))
        ids: list[str] = []
        for index, part in enumerate(outbound.parts):
            extra: dict[str, Any] = {}
            if last_view is not None and index == len(outbound.parts) - 1:
                extra["view"] = last_view
            message = await self._followup_of(interaction).send(part, allowed_mentions=NO_MENTIONS, wait=True, **extra)
            ids.append(str(message.id))
            self._memory.roots[str(message.id)] = outbound.conversation.thread
        return ids


def _thread_permissions_missing(channel: discord.TextChannel, code: int) -> str:
    """The permission names behind a refused thread, from discord.py's cache.

    Discord's code tells when the cache knows nothing.
    """
    me = channel.guild.me
    if me is not None:
        perms = channel.permissions_for(me)
        missing = [
            PERMISSION_NAMES.get(name, name) for name, on in THREAD_PERMISSIONS if on and not getattr(perms, name)
        ]
        if missing:
            return ", ".join(missing)
    return (
        "View Channel or Read Message History" if code == MISSING_ACCESS else PERMISSION_NAMES["create_public_threads"]
    )
