"""The bridge as production runs it (`insitechat-bridge run`), pointed at the fake Discord when asked."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any


def _check_source(source: str) -> None:
    """BENCH_SOURCE: the bridge must come from that tree (another revision's checkout), or nothing runs."""
    import bridge

    found = Path(bridge.__file__).resolve()
    if not found.is_relative_to(Path(source).resolve()):
        sys.exit(f"bench: bridge imported from {found}, not from {source}")
    print(f"bench: bridge code from {found.parent}", file=sys.stderr, flush=True)


def _trace_sqlite(events: list[list[Any]]) -> None:
    """Every statement on every SQLite connection: [start (monotonic), connection, SQL, rows it changed].

    The rows a statement changed are the connection's total_changes at the next statement's
    start minus at its own (one connection runs one statement at a time); None for the last.
    """
    connect = sqlite3.connect
    opened = itertools.count()

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        number = next(opened)
        last: list[Any] = [conn.total_changes, None]  # total when the last statement began, its event

        def trace(statement: str) -> None:
            total = conn.total_changes
            if last[1] is not None:
                last[1][3] = total - last[0]
            event = [time.monotonic(), number, statement, None]
            events.append(event)
            last[:] = [total, event]

        conn.set_trace_callback(trace)
        return conn

    sqlite3.connect = traced_connect  # type: ignore[assignment]


def _dump(events: list[list[Any]], path: str) -> None:
    with open(path, "w") as f:
        json.dump(events, f)


def _time_steps(path: str) -> None:
    """Every step the event loop runs (a callback, a task's step) timed; those over 2 ms dumped at exit."""
    import asyncio.events
    import atexit

    long: list[list[Any]] = []
    run = asyncio.events.Handle._run

    def timed(self: asyncio.events.Handle) -> None:
        started = time.perf_counter()
        try:
            run(self)
        finally:
            took = time.perf_counter() - started
            if took > 0.002:
                task = getattr(self._callback, "__self__", None)  # a task's step or wake-up
                coro = task.get_coro() if isinstance(task, asyncio.Task) else None
                what = getattr(coro, "__qualname__", None) or repr(self)[:160]
                long.append([round(took * 1000, 2), what, round(time.monotonic(), 2)])

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    atexit.register(lambda: _dump(long, path))


def _time_sqlite(path: str) -> None:
    """Every SQLite statement timed; those over 1 ms dumped to path at exit: [ms, SQL]."""
    import atexit

    slow: list[list[Any]] = []

    class Timed(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            started = time.perf_counter()
            try:
                return super().execute(sql, *args)
            finally:
                took = time.perf_counter() - started
                if took > 0.001:
                    slow.append([round(took * 1000, 2), sql[:80]])

    connect = sqlite3.connect

    def timed_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", Timed)
        return connect(*args, **kwargs)

    sqlite3.connect = timed_connect  # type: ignore[assignment]
    atexit.register(lambda: _dump(slow, path))


def _time_gc(path: str) -> None:
    """Every collection of the cyclic GC: [generation, seconds, objects collected, when], dumped to path at exit."""
    import atexit
    import gc

    collections: list[list[Any]] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            took = time.perf_counter() - started[0]
            collections.append([info["generation"], took, info["collected"], time.monotonic()])

    gc.callbacks.append(timed)
    atexit.register(lambda: _dump(collections, path))


def _discord_adapter(source: str | None) -> Any:
    """The Discord adapter class of the tree that runs: adapters/discord/ since the platform packages
    (e5e4405), adapters/discord_bot.py before. Asking an older tree for `adapters.discord` would
    fall through to this checkout's editable install and mix the two trees' code."""
    if source and not (Path(source) / "adapters" / "discord").is_dir():
        from adapters.discord_bot import DiscordAdapter as Old  # type: ignore[import-not-found]

        return Old
    from adapters.discord import DiscordAdapter

    return DiscordAdapter


def main(argv: list[str]) -> int:
    discord_url = os.environ.get("BENCH_DISCORD_URL")
    if discord_url:
        # discord.py has no setting for its endpoints: two class attributes it reads at start.
        import discord.gateway
        import discord.http
        import yarl

        DiscordAdapter = _discord_adapter(os.environ.get("BENCH_SOURCE"))

        discord.http.Route.BASE = f"{discord_url}/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(
            discord_url.replace("http://", "ws://") + "/gateway"
        )
        # Only start-up gets faster: discord.py waits this long for more guilds before on_ready.
        DiscordAdapter.guild_ready_timeout = 0.1
    source = os.environ.get("BENCH_SOURCE")
    if source:
        _check_source(source)
    from bridge.cli import main as cli_main

    long_to = os.environ.get("BENCH_LONG_STEPS")
    if long_to:
        _time_steps(long_to)
    slow_to = os.environ.get("BENCH_SQL_SLOW")
    if slow_to:
        _time_sqlite(slow_to)
    gc_to = os.environ.get("BENCH_GC_LOG")
    if gc_to:
        _time_gc(gc_to)  # which pauses the cyclic GC makes (python -m bench.relay_cpu, BENCH_GC_LOG=FILE)
    trace_to = os.environ.get("BENCH_SQL_TRACE")
    if trace_to:
        # What the store runs per answer (bench/durability.py); costs time: no timing from such a run.
        events: list[list[Any]] = []
        _trace_sqlite(events)
        try:
            return cli_main(argv)
        finally:
            _dump(events, trace_to)
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
