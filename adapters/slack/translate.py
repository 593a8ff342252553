"""Pure translation of Slack payloads (events, slash commands) into platform-neutral messages."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.slack.formatting import neutralise_slack
from bridge.messages import Inbound

PLATFORM = "slack"

# Message subtypes that are still a person (or bot) saying something new. Everything
# else (message_changed, message_deleted, channel_join, channel_topic, message_replied,
# ...) describes a change to the channel, never a question, and is not passed on.
# bot_message is passed so that the relay, the one place that decides, sees and drops it.
PASSED_SUBTYPES = frozenset({"", "bot_message", "file_share", "thread_broadcast", "me_message"})

_USER_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^<>]*)?>")
_GROUP_OR_CROWD = re.compile(r"<!(?:subteam\^[A-Za-z0-9]+|here|channel|everyone)(?:\^[^<>|]*)?(?:\|[^<>]*)?>")
_SPECIAL = re.compile(r"<([^<>\n]*)>")
_SPACES = re.compile(r"[ \t]{2,}")

# Longest question echoed in the visible "asked:" root post of the slash command.
_ECHO_LIMIT = 3000


@dataclass(frozen=True)
class BotIdentity:
    """Who the bot is in this workspace, learnt from auth.test at start."""

    user_id: str  # the bot user (U...), as it appears in <@U...>
    bot_id: str  # the bot (B...), as it appears in a message's bot_id
    team_id: str


@dataclass(frozen=True)
class SlashCommand:
    """A slash command invocation, parsed; `action` is "usage", "reset" or "ask"."""

    workspace: str
    channel: str
    user_id: str
    user_name: str
    is_dm: bool
    question: str  # plain text for the chatbot
    action: str


def event_to_inbound(body: Mapping[str, Any], me: BotIdentity) -> Inbound | None:
    """An Events API body (`message` or `app_mention`) as an Inbound; None when it is not a message.

    The `message` and `app_mention` events of one post carry the same team, channel and ts,
    so both translate to the same `Inbound.dedupe_key`, as do Slack's retries.
    """
    event = body.get("event")
    if not isinstance(event, Mapping) or event.get("type") not in ("message", "app_mention"):
        return None
    subtype = str(event.get("subtype") or "")
    if subtype not in PASSED_SUBTYPES:
        return None
    channel, ts = str(event.get("channel") or ""), str(event.get("ts") or "")
    if not channel or not ts:
        return None
    raw = str(event.get("text") or "")
    user, bot_id = str(event.get("user") or ""), str(event.get("bot_id") or "")
    mentioned = {m.group(1) for m in _USER_MENTION.finditer(raw)}
    return Inbound(
        platform=PLATFORM,
        # The installation's team (the envelope's), not the author's: in a Slack Connect
        # channel event.team is the guest's workspace, but routes name the host's.
        workspace=str(body.get("team_id") or event.get("team") or me.team_id),
        channel=channel,
        message_id=ts,
        author_id=user or bot_id,
        text=plain_text(raw, me.user_id),
        thread=str(event.get("thread_ts") or ""),
        is_dm=event.get("channel_type") == "im",
        mentions_bot=event.get("type") == "app_mention" or me.user_id in mentioned,
        mentions_others=bool(mentioned - {me.user_id}) or bool(_GROUP_OR_CROWD.search(raw)),
        author_is_bot=bool(bot_id) or subtype == "bot_message",
        author_is_self=(bool(user) and user == me.user_id) or (bool(bot_id) and bot_id == me.bot_id),
    )


def plain_text(text: str, bot_user_id: str = "") -> str:
    """Slack message text as plain text for the chatbot, the bot's own mention removed.

    Links become "label (url)" (or what the user typed), user/channel/group references
    their readable names, and Slack's &amp; &lt; &gt; escapes are undone last, so an
    escaped "&lt;!channel&gt;" typed by a user never becomes syntax on the way.
    """
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^<>]*)?>", "", text)

    def readable(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            return "@" + (label or target[1:])
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!subteam^"):
            return label or "@" + target[len("!subteam^"):]
        if target.startswith("!"):
            name = target[1:].split("^")[0]
            if name in ("here", "channel", "everyone"):
                return "@" + name
            return label  # <!date^...|fallback> and other specials: their fallback text
        if not label or label == target or target.split(":", 1)[-1].lstrip("/") == label:
            return label or target  # Slack's own auto-link of what the user typed
        return f"{label} ({target})"

    text = _SPECIAL.sub(readable, text)
    # Exactly Slack's three escapes, &amp; last: "&amp;lt;" is a user typing "&lt;".
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return text.strip()


def parse_command(payload: Mapping[str, Any], me: BotIdentity) -> SlashCommand:
    """A slash command payload (form fields, or the Socket Mode payload) as a SlashCommand."""
    channel = str(payload.get("channel_id") or "")
    question = plain_text(str(payload.get("text") or ""), me.user_id)
    if not question:
        action = "usage"
    elif question.lower().strip(" .!") == "reset":
        action = "reset"
    else:
        action = "ask"
    return SlashCommand(
        workspace=str(payload.get("team_id") or me.team_id),
        channel=channel,
        user_id=str(payload.get("user_id") or ""),
        user_name=str(payload.get("user_name") or ""),
        # DM channel ids start with D; Slack names every DM "directmessage" in the payload.
        is_dm=channel.startswith("D") or payload.get("channel_name") == "directmessage",
        question=question,
        action=action,
    )


def command_echo(command: SlashCommand) -> str:
    """The visible root post of an /ask: who asked what, unable to ping anyone but the asker."""
    question = command.question
    if len(question) > _ECHO_LIMIT:
        question = question[:_ECHO_LIMIT].rstrip() + "…"
    escaped = question.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<@{command.user_id}> asked: {neutralise_slack(escaped)}"


def command_inbound(command: SlashCommand, message_id: str) -> Inbound:
    """The Inbound for a slash command; `message_id` is the root post the answer threads under."""
    return Inbound(
        platform=PLATFORM,
        workspace=command.workspace,
        channel=command.channel,
        message_id=message_id,
        author_id=command.user_id,
        author_name=command.user_name,
        text=command.question,
        is_dm=command.is_dm,
        is_command=True,
    )
