"""The bridge as production runs it (`insitechat-bridge run`), pointed at the fake Discord when asked."""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    discord_url = os.environ.get("BENCH_DISCORD_URL")
    if discord_url:
        # discord.py has no setting for its endpoints: two class attributes it reads at start.
        import discord.gateway
        import discord.http
        import yarl

        from adapters.discord_bot import DiscordAdapter

        discord.http.Route.BASE = f"{discord_url}/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(discord_url.replace("http://", "ws://") + "/gateway")
        # Only start-up gets faster: discord.py waits this long for more guilds before on_ready.
        DiscordAdapter.guild_ready_timeout = 0.1
    from bridge.cli import main as cli_main

    profile_to = os.environ.get("BENCH_PROFILE")
    if profile_to:
        # Where the bridge's time goes under load: `python -m pstats FILE` to read it.
        import cProfile

        profiler = cProfile.Profile()
        try:
            return profiler.runcall(cli_main, argv)
        finally:
            profiler.dump_stats(profile_to)
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
