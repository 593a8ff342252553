"""Discord: discord.py's Client in the bridge's loop, translated to and from the bridge's messages."""

from adapters.discord.adapter import DiscordAdapter
from adapters.discord.posting import make_nonce, thread_name
from adapters.discord.setup import (
    REQUIRED_PERMISSIONS,
    DiscordRefused,
    DiscordSetupError,
    DiscordStartError,
    application_id_from_token,
    channel_permissions,
    check,
    invite_url,
)

__all__ = [
    "REQUIRED_PERMISSIONS",
    "DiscordAdapter",
    "DiscordRefused",
    "DiscordSetupError",
    "DiscordStartError",
    "application_id_from_token",
    "channel_permissions",
    "check",
    "invite_url",
    "make_nonce",
    "thread_name",
]
