"""What a store process remembers of its own writes: a dict that forgets its oldest entries past a size."""

from __future__ import annotations

from typing import TypeVar

V = TypeVar("V")


def remember(known: dict[str, V], key: str, value: V, limit: int) -> None:
    """Put `key` last in `known` with `value`; past `limit` entries the oldest is forgotten (read again)."""
    known.pop(key, None)  # to the end: the oldest entry goes first when full
    known[key] = value
    if len(known) > limit:
        del known[next(iter(known))]
