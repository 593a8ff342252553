"""The ports between the core and the platform adapters: errors adapters raise, and connections that can end."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
