"""The ports between the core and the platform adapters: errors adapters raise."""

from __future__ import annotations


class PermanentSendError(Exception):
    """The platform refused a post for a reason that cannot heal (channel gone, bot removed).

    The outbox stops retrying it. Anything else an adapter raises is tried again later.
    """
