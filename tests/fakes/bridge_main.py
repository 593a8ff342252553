"""`python -m tests.fakes.bridge_main run --config ...`: the bridge's own command line, with discord.py aimed at a fake.

A bridge subprocess cannot share the test's class patches (FakeDiscord.patched()), and the
bridge has no Discord URL setting (Discord has one set of endpoints). With FAKE_DISCORD_URL
set, this does in the child what patched() does in the test's process, shortens discord.py's
wait for more guilds as the in-process tests do, and then runs the real CLI unchanged.
"""

from __future__ import annotations

import os
import sys


def _aim_discord_at(url: str) -> None:
    import discord.gateway
    import discord.http
    import yarl

    from adapters.discord import DiscordAdapter

    discord.http.Route.BASE = f"{url}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws://{url.removeprefix('http://')}/gateway")
    DiscordAdapter.guild_ready_timeout = 0.2


if __name__ == "__main__":
    fake = os.environ.get("FAKE_DISCORD_URL")
    if fake:
        _aim_discord_at(fake)
    from bridge.cli import main

    sys.exit(main())
