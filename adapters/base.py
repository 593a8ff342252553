"""The Adapter protocol: the small surface every platform adapter offers the relay."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from bridge.messages import Inbound, Outbound


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
