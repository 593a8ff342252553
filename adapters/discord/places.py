"""Where Discord messages live: discord.py channels as Places, and bounded memories of recent ones."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import discord

from adapters.discord.translate import Place, PlaceKind

REMEMBERED = 5000  # recent message ids kept in memory (origins, the bot's own answers)

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A bounded mapping that forgets the oldest entries first."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._size = size

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def as_mapping(self) -> Mapping[K, V]:
        return self._items


@dataclass(frozen=True)
class Origin:
    """Where a user's message was posted, kept until it is answered."""

    place: Place
    guild_id: str
    hint: str  # the question's first words, for the thread name


@dataclass
class Memory:
    """What this process remembers of Discord, shared by the adapter's parts.

    A restart forgets it (nothing depends on it).
    """

    origins: Recent[str, Origin] = field(default_factory=Recent)  # a question's id -> where it was asked
    roots: Recent[str, str] = field(default_factory=Recent)  # the bot's message id -> its conversation's thread root
    places: Recent[int, Place] = field(default_factory=lambda: Recent(500))  # threads fetched over REST
    # A question's id -> True: its thread is open (made here); False: Discord would not make one there.
    threads: Recent[str, bool] = field(default_factory=lambda: Recent(1000))
    # A slash command's id -> (monotonic time, its interaction), answered through followups for 15 minutes.
    interactions: dict[str, tuple[float, discord.Interaction]] = field(default_factory=dict)


def place_of_channel(channel: object) -> Place | None:
    """The translation's view of a discord.py channel object."""
    if isinstance(channel, discord.Thread):
        parent = channel.parent
        return Place(
            str(channel.id),
            PlaceKind.THREAD,
            parent_id=str(channel.parent_id),
            parent_is_forum=isinstance(parent, discord.ForumChannel),
        )
    if isinstance(channel, discord.TextChannel):
        return Place(str(channel.id), PlaceKind.TEXT)
    if isinstance(channel, (discord.DMChannel, discord.GroupChannel)):
        return Place(str(channel.id), PlaceKind.DM)
    if isinstance(channel, (discord.VoiceChannel, discord.StageChannel)):
        return Place(str(channel.id), PlaceKind.OTHER)
    return None
