"""The ports between the core and the platform adapters: what an adapter offers, and the errors it raises."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bridge.alerts import Alert
from bridge.messages import Conversation, Inbound, Outbound

if TYPE_CHECKING:
    from bridge.charts import Chart
    from bridge.report import Report


class PermanentSendError(Exception):
    """The platform refused a post for a reason that cannot heal (channel gone, bot removed).

    The outbox stops retrying it. Anything else an adapter raises is tried again later.
    """


class PlatformRefused(Exception):
    """The platform refused the bridge for a reason that waiting will not fix (a revoked token, a disallowed intent).

    The message is the plain reason for the operator and never holds a secret. Any other
    exception from a platform's start is transient: the bridge tries again with backoff.
    Adapters raise a subclass of their own error type and this, so their callers keep
    catching what they caught before.
    """


@runtime_checkable
class Platform(Protocol):
    """A platform adapter as its supervisor sees it: start, stop, and a way to hear that the connection ended."""

    name: str

    async def start(self) -> None:
        """Connect; return once connected, raise (PlatformRefused when it cannot heal) otherwise."""

    async def stop(self) -> None:
        """Disconnect; safe to call twice and after a failed start."""

    async def wait_ended(self) -> Exception:
        """Return once the started connection is gone for good (its library will not bring it back).

        The result says why: a PlatformRefused when it cannot heal, any other exception when
        a new connection may work. Drops the library heals by itself do not end it.
        """


class GatewayLease(Protocol):
    """Which replica may hold a platform's gateway connection (bridge.leader.RedisLease is one).

    Several unsharded Discord gateway sessions of one bot each receive every event, so with
    several replicas only the leader connects one; every replica posts over REST. Without a
    lease an adapter is its own leader (one replica).
    """

    @property
    def is_leader(self) -> bool:
        """This replica holds the lease now."""

    @property
    def error(self) -> str:
        """Why the lease could not be checked the last time; "" while it can."""

    def holder(self) -> str | None:
        """The replica that holds the lease (this one's name while leader); None when nobody or unknown."""

    async def wait_changed(self) -> None:
        """Return the next time `is_leader` flips."""


@runtime_checkable
class Adapter(Protocol):
    """One chat platform as the relay and the outbox see it. Adapters translate; the core decides."""

    name: str  # the platform name used in routes: "slack", "discord", "console"

    async def start(self) -> None:
        """Connect and begin delivering Inbound messages to the relay. Returns once connected."""

    async def stop(self) -> None:
        """Disconnect; must be safe to call twice and after a failed start."""

    def render(self, markdown: str) -> list[str]:
        """The chatbot's Markdown as this platform's message parts: escaped, mention-safe, split; [] when empty."""

    async def send(self, outbound: Outbound) -> list[str]:
        """Post every part in order; return the platform ids of the posted messages.

        Raises on failure (PermanentSendError when it cannot heal) so the caller can retry
        or give up. Where the platform needs a thread created first (Discord), the adapter
        creates it on `Outbound.reply_to`; its id equals the conversation's thread id there.
        """

    def working(self, inbound: Inbound) -> AbstractAsyncContextManager[None]:
        """Show that an answer is being prepared (reaction, typing...) while inside."""


@runtime_checkable
class AlertPoster(Adapter, Protocol):
    """A platform that can also carry alert cards (Slack, Discord)."""

    def render_card(self, alert: Alert, mentions: tuple[str, ...]) -> dict[str, Any]:
        """The alert as this platform's card; `mentions` (the on-call ids) are its only pings."""

    async def post_alert(self, channel: str, card: dict[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        """Post a card from `render_card` to a channel, in `thread` if given; return its reference.

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


@runtime_checkable
class TellsRefusal(Protocol):
    """An adapter that can tell the asker privately that their answer could not be posted (Slack's ephemeral)."""

    async def tell_refused(self, inbound: Inbound, refusal: PermanentSendError) -> bool:
        """Tell the person who asked, where only they see it, why the answer is not there; True when told.

        Never raises: where even that cannot be posted (the bot left the channel), it logs one line.
        """


@runtime_checkable
class ReportsReadiness(Protocol):
    """An adapter whose connection can look open while it is not live (a socket, a gateway)."""

    def readiness(self) -> str | None:
        """None when the connection is live by its own heartbeat, else why not; /readyz reports it.

        A text starting with "ok" is ready, with a detail worth showing (a Discord standby).
        """


@runtime_checkable
class StopsIntake(Protocol):
    """An adapter that can stop taking new events while its sends still work (shutdown)."""

    async def stop_intake(self) -> None:
        """Take no new events, so the platform redelivers them to the next run; posting keeps working.

        Called before the relay drains at shutdown.
        """


@runtime_checkable
class PostsDigest(Protocol):
    """A platform that can carry the weekly report digest (Slack blocks, a Discord embed), with charts where it can."""

    async def post_digest(self, channel: str, report: Report, charts: Sequence[Chart], *, key: str) -> str:
        """Post the digest to a channel; return its reference. `key` marks the post, so `find_digest` finds it.

        The charts are an extra: one that cannot be attached is logged and left out, the text
        goes out regardless. Raises when the text was not posted (PermanentSendError when it never will be).
        """

    async def find_digest(self, channel: str, key: str, *, since: float) -> str | None:
        """The reference of a digest already posted with `key` since the epoch time `since`, if any."""
