"""Pure translation of Discord gateway message payloads and slash commands into Inbound messages."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.messages import Conversation, Inbound

PLATFORM = "discord"

# DEFAULT and REPLY are what people write; joins, pins, thread-created notices, the
# thread starter copy and command responses are system or bot output.
USER_MESSAGE_TYPES = frozenset({0, 19})
REPLY_REFERENCE = 0  # message_reference.type: 0 reply, 1 forward (a forward addresses no one)


class PlaceKind(str, enum.Enum):
    TEXT = "text"  # a guild text or announcement channel: threads can be created on its messages
    THREAD = "thread"  # a thread, or a forum post (a thread whose starter message has the thread's id)
    DM = "dm"
    OTHER = "other"  # text chat of a voice or stage channel: answered in place


@dataclass(frozen=True)
class Place:
    """Where a message was posted, as far as the conversation key needs to know."""

    channel_id: str
    kind: PlaceKind
    parent_id: str = ""  # the channel a thread belongs to
    parent_is_forum: bool = False

    @property
    def conversation_channel(self) -> str:
        """Routes and sessions are per channel: a thread belongs to its parent's."""
        return self.parent_id if self.kind is PlaceKind.THREAD and self.parent_id else self.channel_id


@dataclass(frozen=True)
class BotIdentity:
    """Who "the bot" is: its user id and the managed roles Discord gave it (one per server)."""

    user_id: str
    role_ids: frozenset[str] = frozenset()


def translate_message(
    data: Mapping[str, Any], bot: BotIdentity, place: Place, *, roots: Mapping[str, str] | None = None
) -> Inbound | None:
    """A MESSAGE_CREATE payload as an Inbound; None for system messages nobody wrote.

    `roots` maps the bot's message ids to the conversation each belongs to, so that a
    platform reply to one of them, outside a thread, continues that conversation.
    """
    if int(data.get("type", 0)) not in USER_MESSAGE_TYPES:
        return None
    author = data.get("author") or {}
    author_id = str(author.get("id", ""))
    mentioned = {str(user.get("id")): user for user in data.get("mentions") or []}
    roles = {str(role) for role in data.get("mention_roles") or []}
    bot_roles = roles & bot.role_ids
    replied = _replied_message(data)
    replied_id = str((data.get("message_reference") or {}).get("message_id", ""))
    # Discord omits the replied message when it was deleted or not loaded; the bot's own
    # recent message ids still tell.
    replies_to_bot = _is_reply(data) and (
        (replied is not None and str((replied.get("author") or {}).get("id")) == bot.user_id)
        or replied_id in (roots or {})
    )
    is_dm = not data.get("guild_id")
    thread = place.channel_id if place.kind is PlaceKind.THREAD else ""
    if replies_to_bot and place.kind is PlaceKind.TEXT:
        thread = _conversation_root(data, replied, roots or {})
    return Inbound(
        platform=PLATFORM,
        workspace=str(data.get("guild_id") or ""),
        channel=place.conversation_channel,
        message_id=str(data["id"]),
        author_id=author_id,
        text=_clean_text(str(data.get("content") or ""), bot, mentioned),
        thread=thread,
        is_dm=is_dm,
        mentions_bot=bot.user_id in mentioned or bool(bot_roles),
        mentions_others=(
            bool(set(mentioned) - {bot.user_id}) or bool(roles - bot.role_ids) or bool(data.get("mention_everyone"))
        ),
        replies_to_bot=replies_to_bot,
        # Webhook posts (and other integrations) are not people either.
        author_is_bot=bool(author.get("bot") or author.get("system") or data.get("webhook_id")),
        author_is_self=author_id == bot.user_id,
        author_name=_display_name(data),
    )


def translate_command(
    *,
    interaction_id: str,
    guild_id: str,
    place: Place,
    author_id: str,
    author_name: str,
    author_is_bot: bool,
    text: str,
) -> Inbound:
    """A slash command as an Inbound: always addressed to the bot; its id stands in for a message id."""
    return Inbound(
        platform=PLATFORM,
        workspace=guild_id,
        channel=place.conversation_channel,
        message_id=interaction_id,
        author_id=author_id,
        text=text,
        thread=place.channel_id if place.kind is PlaceKind.THREAD else "",
        is_dm=not guild_id,
        is_command=True,
        author_is_bot=author_is_bot,
        author_name=author_name,
    )


def content_withheld(data: Mapping[str, Any], inbound: Inbound, *, has_intent: bool) -> bool:
    """True when Discord sent no text because the bot lacks the message-content intent.

    Without the intent only DMs, messages that mention the bot and the bot's own
    messages carry content; anything else is an empty shell that must not look like a
    bare mention to the relay.
    """
    if has_intent or inbound.is_dm or inbound.mentions_bot or inbound.author_is_self:
        return False
    return not data.get("content") and not data.get("attachments") and not data.get("embeds")


def _is_reply(data: Mapping[str, Any]) -> bool:
    reference = data.get("message_reference")
    if not reference:
        return False
    return int(reference.get("type", REPLY_REFERENCE)) == REPLY_REFERENCE


def _replied_message(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if not _is_reply(data):
        return None
    replied = data.get("referenced_message")
    return replied if isinstance(replied, Mapping) else None


def _conversation_root(data: Mapping[str, Any], replied: Mapping[str, Any] | None, roots: Mapping[str, str]) -> str:
    """The conversation a reply to the bot continues: the one the bot's message answered.

    Known roots come from the adapter's memory; after a restart the bot's message itself
    says what it answered (its own reply reference, or the slash command it followed up).
    """
    replied_id = str((data.get("message_reference") or {}).get("message_id", ""))
    if roots.get(replied_id):
        return roots[replied_id]
    if replied is not None:
        answered = (replied.get("message_reference") or {}).get("message_id")
        if answered:
            return str(answered)
        interaction = replied.get("interaction_metadata") or replied.get("interaction") or {}
        if interaction.get("id"):
            return str(interaction["id"])
    return replied_id


def _clean_text(content: str, bot: BotIdentity, mentioned: Mapping[str, Mapping[str, Any]]) -> str:
    """The text without the bot's own mention; other people's mentions as readable @names."""
    text = re.sub(rf"<@!?{re.escape(bot.user_id)}>[ \t]?", "", content) if bot.user_id else content
    for role in bot.role_ids:
        text = re.sub(rf"<@&{re.escape(role)}>[ \t]?", "", text)

    def name(match: re.Match[str]) -> str:
        user = mentioned.get(match.group(1))
        if user is None:
            return match.group(0)
        return "@" + str(user.get("global_name") or user.get("username") or match.group(1))

    return re.sub(r"<@!?(\d+)>", name, text).strip()


def _display_name(data: Mapping[str, Any]) -> str:
    member = data.get("member") or {}
    author = data.get("author") or {}
    return str(member.get("nick") or author.get("global_name") or author.get("username") or "")


def click_conversation(
    *,
    guild_id: str,
    place: Place,
    message_id: str,
    replied_id: str = "",
    interaction_id: str = "",
    roots: Mapping[str, str] | None = None,
) -> Conversation:
    """The conversation a button under one of the bot's answers belongs to, by the translation's rules.

    In a thread or forum post it is that thread; in a DM the DM; an answer posted in place
    (threads off, or a slash command's followup) belongs to the question it answered.
    """
    if not guild_id or place.kind is PlaceKind.DM:
        return Conversation(PLATFORM, "", place.channel_id, "")
    if place.kind is PlaceKind.THREAD:
        return Conversation(PLATFORM, guild_id, place.conversation_channel, place.channel_id)
    root = (roots or {}).get(message_id) or replied_id or interaction_id or message_id
    return Conversation(PLATFORM, guild_id, place.channel_id, root)
