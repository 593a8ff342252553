"""The platform-neutral messages that flow between adapters and the relay."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

# InsiteChat session ids should stay short ASCII; longer compound keys are hashed.
SESSION_PREFIX = "icb-"
_MAX_SESSION_ID = 100


@dataclass(frozen=True)
class Conversation:
    """Where a conversation lives: one thread of one channel, or one DM."""

    platform: str
    workspace: str  # Slack team id, Discord guild id, "" for DMs or the console
    channel: str
    thread: str = ""  # thread root id; "" for a DM or a message not in a thread

    @property
    def key(self) -> str:
        """A stable text form, used for storage keys and logs (ids only, never content)."""
        return ":".join((self.platform, self.workspace, self.channel, self.thread))

    @classmethod
    def from_key(cls, key: str) -> Conversation:
        """The conversation a `key` names; ValueError for text that is not one."""
        fields = key.split(":")
        if len(fields) != 4 or not fields[0] or not fields[2]:
            raise ValueError("not a conversation key")
        return cls(*fields)

    def session_id(self, generation: int = 0) -> str:
        """The InsiteChat session id for this conversation; a reset bumps the generation.

        Deterministic, so that a restart continues the same InsiteChat memory, and
        prefixed, so that webhook events about the bridge's own sessions are recognised.
        """
        raw = f"{self.key}#{generation}"
        readable = SESSION_PREFIX + raw.replace(":", "-")
        if len(readable) <= _MAX_SESSION_ID and readable.isascii() and " " not in readable:
            return readable
        digest = hashlib.sha256(raw.encode()).hexdigest()[:40]
        return f"{SESSION_PREFIX}{self.platform}-{digest}"


def is_bridge_session(session_id: str) -> bool:
    """True for InsiteChat sessions this bridge created (so their webhooks are not echoed)."""
    return session_id.startswith(SESSION_PREFIX)


@dataclass(frozen=True)
class Inbound:
    """A message a person (or bot) wrote on a platform, as the adapter understood it."""

    platform: str
    workspace: str
    channel: str
    message_id: str  # unique within the channel (Slack ts, Discord snowflake)
    author_id: str
    text: str  # the message with the bot's own mention removed
    thread: str = ""  # thread root id if the message is inside a thread
    is_dm: bool = False
    mentions_bot: bool = False
    mentions_others: bool = False  # mentions some user or group other than the bot
    replies_to_bot: bool = False  # a platform "reply" to one of the bot's messages
    author_is_bot: bool = False
    author_is_self: bool = False
    is_command: bool = False  # came through a slash command: always addressed to the bot
    author_name: str = ""
    # The platform sent no text: Discord without the Message Content intent, for a message that
    # neither mentions the bot nor replies to it. `text` is "" then, which is not a bare mention.
    text_withheld: bool = False
    # A DM thread that is a conversation of its own: Slack's assistant threads, each a new chat
    # (as Bolt's Assistant sees every DM thread then). Other DM threads continue the DM's one.
    own_thread: bool = False

    @property
    def in_thread(self) -> bool:
        return bool(self.thread) and self.thread != self.message_id

    @property
    def dedupe_key(self) -> str:
        """The platform message identity: one answer per key, ever."""
        return f"msg:{self.platform}:{self.workspace}:{self.channel}:{self.message_id}"

    @property
    def conversation(self) -> Conversation:
        """The conversation this message belongs to.

        A DM is one conversation (but for its `own_thread`s); a channel message starts (or
        continues) the thread rooted at itself, which is where the bot answers.
        """
        if self.is_dm and not (self.own_thread and self.in_thread):
            return Conversation(self.platform, self.workspace, self.channel, "")
        return Conversation(self.platform, self.workspace, self.channel, self.thread or self.message_id)


class OutboundKind(enum.Enum):
    ANSWER = "answer"
    NOTICE = "notice"


@dataclass(frozen=True)
class Delivery:
    """What makes a post safe to repeat after a crash: its durable identity.

    The adapter marks every posted part with `key` (Slack message metadata, a Discord
    nonce derived from it). With `look_first`, an earlier attempt may have posted some
    parts before it could record so: the adapter looks for parts marked with `key`
    (posted since the epoch time `since`) and posts only the missing ones.
    """

    key: str
    look_first: bool = False
    since: float = 0.0


@dataclass(frozen=True)
class Outbound:
    """Something the bridge posts: already formatted and split for the platform."""

    conversation: Conversation
    parts: tuple[str, ...]
    kind: OutboundKind = OutboundKind.ANSWER
    reply_to: str = ""  # the message being answered (for thread creation and nonces)
    # The thread the question was written in, where the conversation spans more than it
    # (a Slack DM is one conversation, but a question asked in a DM thread is answered there).
    question_thread: str = ""
    human_chatbot: str = ""  # show a "Talk to a human" button for this chatbot under the last part
    feedback_job: str = ""  # show 👍 / 👎 for this answer (its chat job's id) under the last part
    delivery: Delivery | None = None  # set by the outbox: mark the parts, look before re-posting
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
