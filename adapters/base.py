"""The Adapter protocol: the small surface every platform adapter offers the relay."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from bridge.messages import Conversation, Inbound, Outbound


@runtime_checkable
class Adapter(Protocol):
    """One chat platform. Adapters translate; the relay decides."""

    name: str  # the platform name used in routes: "slack", "discord", "console"

    async def start(self) -> None:
        """Connect and begin delivering Inbound messages to the relay. Returns once connected."""

    async def stop(self) -> None:
        """Disconnect; must be safe to call twice and after a failed start."""

    async def send(self, outbound: Outbound) -> list[str]:
        """Post every part in order; return the platform ids of the posted messages.

        Raises on failure so the relay can tell the user and log it. Where the
        platform needs a thread created first (Discord), the adapter creates it on
        `Outbound.reply_to`; its id equals the conversation's thread id there.
        """

    def working(self, inbound: Inbound) -> AbstractAsyncContextManager[None]:
        """Show that an answer is being prepared (reaction, typing...) while inside."""

    # Optional: `def readiness(self) -> str | None` — None when the connection is live by
    # its own heartbeat, else why not. /readyz reports it.
    # Optional: `async def stop_intake(self) -> None` — stop receiving new events (so the
    # platform redelivers them to the next run) while sends still work; called before the
    # relay drains at shutdown.


@runtime_checkable
class AlertPoster(Adapter, Protocol):
    """A platform that can also carry alert cards (Slack, Discord)."""

    async def post_alert(self, channel: str, card: dict[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        """Post a rendered card (bridge.cards) to a channel, in `thread` if given; return its reference.

        `key` identifies the delivery: store it with the message (Slack metadata, Discord
        nonce or embed footer) so `find_alert` can recognise it after a crash.
        `broadcast`: an escalation inside a thread is also shown in the channel itself.
        """

    async def find_alert(self, channel: str, key: str, *, since: float, thread: str) -> str | None:
        """The reference of a card already posted with `key` since the epoch time `since`, if any."""

    async def update_alert(self, channel: str, reference: str, card: dict[str, Any]) -> None:
        """Replace a posted card in place (claim / resolve)."""

    async def permalink(self, conversation: Conversation) -> str | None:
        """A link to a conversation's thread, for alerts about it."""
