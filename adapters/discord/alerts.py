"""Discord alert cards over discord.py's REST client: post into session threads, find after a crash, edit in place."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import discord

if TYPE_CHECKING:
    # Types only: imported on its own at run time, discord.types trips over a circular import.
    from discord.types.threads import ThreadArchiveDuration

log = logging.getLogger(__name__)

HUMAN_PREFIX = "insitechat_human"  # custom_id "insitechat_human:<chatbot id>" under an answer
HUMAN_LABEL = "Talk to a human"
ALERT_EXPIRED = "This alert is no longer known to the bridge (it expired), so nothing was changed."
ALERT_FAILED = "That click could not be recorded just now. Please try again in a minute."

NONCE_LIMIT = 25
MARKER_PREFIX = "#icb-"  # the delivery marker rides in the embed URL's fragment: invisible, kept by history
LOOKBACK = 300.0  # seconds searched before `since`: the bridge's clock and Discord's may differ
HISTORY_PAGE = 100
HISTORY_PAGES = 3  # an alert channel rarely gets 300 messages between a crash and the retry
# A week: a visitor's session thread stays open for the team.
ALERT_THREAD_ARCHIVE_MINUTES: ThreadArchiveDuration = 10080
THREAD_ALREADY_CREATED = 160004
UNKNOWN_MESSAGE = 10008
CONTENT_LIMIT = 2000
KNOWN_THREADS = 5000

_USER = re.compile(r"<@!?(\d+)>")
_ROLE = re.compile(r"<@&(\d+)>")
_LINK = re.compile(r"\]\((https?://[^)\s]+)\)")


# --- pure helpers ----------------------------------------------------------------------------


def delivery_nonce(key: str, part: str = "card") -> str:
    """A nonce per outbox delivery (and per part of it): a re-send within minutes is deduped by Discord."""
    return ("ic" + hashlib.sha256(f"{part}|{key}".encode()).hexdigest())[:NONCE_LIMIT]


def key_marker(key: str) -> str:
    """A short, stable stand-in for the delivery key, stored in the posted embed."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def allowed_mentions_for(content: str) -> discord.AllowedMentions:
    """Only the users and roles written in the content (the configured on-call ids); never everyone."""
    users = [discord.Object(int(i)) for i in dict.fromkeys(_USER.findall(content))]
    roles = [discord.Object(int(i)) for i in dict.fromkeys(_ROLE.findall(content))]
    return discord.AllowedMentions(everyone=False, users=users or False, roles=roles or False, replied_user=False)


def view_of(components: Iterable[Mapping[str, Any]]) -> discord.ui.View | None:
    """Action rows of buttons as a discord.py View, custom_ids kept; None when there are none.

    The view is stopped before it is used, so discord.py does not keep it in memory waiting
    for clicks: clicks arrive as interactions and are matched by custom_id, also after a restart.
    """
    view = discord.ui.View(timeout=None)
    for row, action_row in enumerate(components):
        for item in action_row.get("components", []):
            if int(item.get("type", 0)) != 2:
                continue
            view.add_item(
                discord.ui.Button(
                    style=discord.ButtonStyle(int(item.get("style", 2))),
                    label=item.get("label"),
                    custom_id=item.get("custom_id") if not item.get("url") else None,
                    url=item.get("url"),
                    disabled=bool(item.get("disabled", False)),
                    row=row,
                )
            )
    view.stop()
    return view if view.children else None


def human_custom_id(chatbot_id: str) -> str:
    return f"{HUMAN_PREFIX}:{chatbot_id}"


def parse_human_id(custom_id: str) -> str | None:
    """The chatbot id from a "Talk to a human" button's custom_id, or None for other buttons."""
    prefix, _, chatbot_id = custom_id.partition(":")
    return chatbot_id if prefix == HUMAN_PREFIX and chatbot_id else None


def human_view(chatbot_id: str) -> discord.ui.View | None:
    button = {"type": 2, "style": 2, "label": HUMAN_LABEL, "custom_id": human_custom_id(chatbot_id)}
    return view_of([{"type": 1, "components": [button]}])


def make_reference(thread: str, message_id: str) -> str:
    """"<message>" for a card in the channel, "<thread>/<message>" for one inside a thread."""
    return f"{thread}/{message_id}" if thread else message_id


def split_reference(channel: str, reference: str) -> tuple[str, str]:
    """(where the message is, its id) from a reference."""
    where, _, message_id = reference.rpartition("/")
    return (where or channel), message_id


def jump_url(guild_id: int | str | None, channel_id: int | str, message_id: int | str | None = None) -> str:
    """discord.com link to a channel or thread, or to one message in it."""
    base = f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}"
    return f"{base}/{message_id}" if message_id else base


def card_embed(card: Mapping[str, Any], marker: str = "") -> discord.Embed:
    """The card's embed; its title links to InsiteChat, with the delivery marker as the URL fragment."""
    data = copy.deepcopy(dict(card["embed"]))
    link = _LINK.search(str(data.get("description", "")))
    if link:
        data["url"] = link.group(1) + (MARKER_PREFIX + marker if marker else "")
    elif marker:
        data["url"] = "https://discord.com/" + MARKER_PREFIX + marker  # never reached by today's cards
    return discord.Embed.from_dict(data)


def marked_with(message: Mapping[str, Any], marker: str) -> bool:
    return any(str(embed.get("url", "")).endswith(MARKER_PREFIX + marker) for embed in message.get("embeds") or [])


def broadcast_line(card: Mapping[str, Any], link: str) -> str:
    """The escalation's line in the channel itself: the on-call mentions, what happened, where."""
    title = str(card["embed"].get("title", "")).strip()
    line = " ".join(part for part in (str(card.get("content") or ""), title, link) if part)
    return line[:CONTENT_LIMIT]


def thread_title(card: Mapping[str, Any]) -> str:
    """A name for a visitor session's alert thread."""
    for field in card["embed"].get("fields", []):
        if field.get("name") == "Session":
            value = str(field.get("value", "")).replace("\\", "").strip()
            if value and value != "-":
                return f"Visitor session {value}"[:100]
    return (str(card["embed"].get("title", "")).strip() or "InsiteChat alerts")[:100]


def snowflake_at(epoch: float) -> int:
    return discord.utils.time_snowflake(datetime.fromtimestamp(max(epoch, 1_420_070_400.0), tz=UTC))


# --- posting -----------------------------------------------------------------------------------


class AlertCards:
    """Posts, finds and edits alert cards through a logged-in discord.py client."""

    def __init__(self, client: Callable[[], discord.Client]) -> None:
        self._client = client
        self._guilds: dict[str, int | None] = {}  # channel id -> guild id (for jump links)
        self._threads: set[str] = set()  # alert threads known to exist

    async def post(self, channel: str, card: Mapping[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        """Post a card; in the session thread on `thread` (the root card's message) if given.

        An escalation in a thread is also announced in the channel, with the mentions and a
        link, before the card itself: a lost card is re-posted by the outbox, whereas a
        lost announcement would never be repeated.
        """
        content = str(card.get("content") or "")
        embed = card_embed(card, key_marker(key))
        view = view_of(card.get("components") or [])
        thread_id = await self._thread_for(channel, thread.split("/")[0], card) if thread else ""
        if not thread_id:
            message = await self._send(channel, content, embed, view, delivery_nonce(key))
            return str(message.id)
        if broadcast:
            guild_id = await self._guild_of(channel)
            await self._send(
                channel, broadcast_line(card, jump_url(guild_id, thread_id)), None, None, delivery_nonce(key, "line")
            )
        # The announcement carried the mentions: the copy in the thread does not ping twice.
        message = await self._send(thread_id, "" if broadcast else content, embed, view, delivery_nonce(key))
        return make_reference(thread_id, str(message.id))

    async def find(self, channel: str, key: str, *, since: float, thread: str) -> str | None:
        """A card posted with this key since `since`, by reading the bot's recent messages there."""
        client = self._client()
        bot_id = str(client.user.id) if client.user else ""
        where = thread.split("/")[0] if thread else channel
        marker = key_marker(key)
        after = snowflake_at(since - LOOKBACK)
        for _ in range(HISTORY_PAGES):
            try:
                page = await client.http.logs_from(int(where), HISTORY_PAGE, after=after)
            except discord.NotFound:
                return None  # the thread was never created: nothing was posted in it
            for message in page:
                if str((message.get("author") or {}).get("id")) == bot_id and marked_with(message, marker):
                    return make_reference(where if thread else "", str(message["id"]))
            if len(page) < HISTORY_PAGE:
                return None
            after = max(int(m["id"]) for m in page)
        log.warning(
            "discord: gave up looking for an earlier post in %s after %d messages", where, HISTORY_PAGE * HISTORY_PAGES
        )
        return None

    async def update(self, channel: str, reference: str, card: Mapping[str, Any]) -> None:
        """Replace the embed and buttons of a posted card; its content (the mentions) stays."""
        where, message_id = split_reference(channel, reference)
        client = self._client()
        message = client.get_partial_messageable(int(where)).get_partial_message(int(message_id))
        try:
            await message.edit(embed=card_embed(card), view=view_of(card.get("components") or []))
        except discord.NotFound:
            # Deleted by someone: nothing left to update, and retrying would never succeed.
            log.warning("discord: alert message %s in %s is gone; not updated", message_id, where)

    async def _send(
        self, channel: str, content: str, embed: discord.Embed | None, view: discord.ui.View | None, nonce: str
    ) -> discord.Message:
        target = self._client().get_partial_messageable(int(channel))
        return await target.send(
            content or None,
            embed=embed,  # type: ignore[arg-type]
            view=view,  # type: ignore[arg-type]
            nonce=nonce,  # discord.py adds enforce_nonce
            allowed_mentions=allowed_mentions_for(content),
        )

    async def _thread_for(self, channel: str, root: str, card: Mapping[str, Any]) -> str:
        """The thread on the session's first card (its id is the card's id), created on first use.

        "" when the root card was deleted: the card then goes to the channel itself.
        """
        if root in self._threads:
            return root
        client = self._client()
        try:
            await client.http.start_thread_with_message(
                int(channel), int(root), name=thread_title(card), auto_archive_duration=ALERT_THREAD_ARCHIVE_MINUTES
            )
        except discord.HTTPException as exc:
            if exc.code == UNKNOWN_MESSAGE:
                log.warning("discord: the first alert of a session in %s was deleted; posting in the channel", channel)
                return ""
            if exc.code != THREAD_ALREADY_CREATED:  # made earlier (before a restart) or by a person
                raise
        if len(self._threads) > KNOWN_THREADS:
            self._threads.clear()  # only saves a request: an unknown thread is answered with 160004
        self._threads.add(root)
        return root

    async def _guild_of(self, channel: str) -> int | None:
        if channel in self._guilds:
            return self._guilds[channel]
        client = self._client()
        found = client.get_channel(int(channel))
        if found is None:
            found = await client.fetch_channel(int(channel))
        guild = getattr(found, "guild", None)
        self._guilds[channel] = guild.id if guild is not None else None
        return self._guilds[channel]
