"""The insitechat-bridge command line: run, check, chatbots, sources, emulator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from bridge import __version__, config
from bridge.app import GRACE
from bridge.config import ConfigError, Settings
from bridge.emulator import SANDBOX_WEBHOOK_SECRET

if TYPE_CHECKING:
    from bridge.app import BridgeApp
    from bridge.insitechat import InsiteChatClient

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
CONFIG_ENV = "INSITECHAT_BRIDGE_CONFIG"


class CommandFailed(Exception):
    """A command could not do its job; the message is for the user, already plain."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        status: int = asyncio.run(args.func(args))  # argparse's Namespace is untyped: func is a _cmd_* command
        return status
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="insitechat-bridge",
        description="Your InsiteChat chatbot in Slack and Discord, and its webhooks as team alerts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, help_text: str, func: Callable[[argparse.Namespace], Awaitable[int]]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        p.add_argument("--log-format", default=None, choices=["text", "json"], help="readable lines or JSON lines")
        return p

    run = command(
        "run",
        "Run the bridge. Without --config: a local sandbox (emulated InsiteChat + a terminal chat).",
        _cmd_run,
    )
    run.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), help=f"YAML config (or ${CONFIG_ENV})")
    run.add_argument(
        "--grace", type=float, default=GRACE, help=f"seconds answers in flight get at shutdown ({GRACE:.0f})"
    )

    check = command(
        "check",
        "Validate the config. With --live, also test every connection it names: InsiteChat keys and "
        "routed chatbots (missing or paused), Slack auth, scopes and channels, Discord login and channels.",
        _cmd_check,
    )
    check.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), required=CONFIG_ENV not in os.environ)
    check.add_argument("--live", action="store_true", help="also run every connectivity check (makes requests)")

    chatbots = command("chatbots", "List the chatbots each API key reaches.", _cmd_chatbots)
    chatbots.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), help="default: INSITECHAT_API_KEY")

    sources = command("sources", "List a chatbot's training sources and their status.", _cmd_sources)
    sources.add_argument("chatbot", help="the chatbot id")
    sources.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), help="default: INSITECHAT_API_KEY")

    manifest = command("slack-manifest", "Print a Slack app manifest for the configured options.", _cmd_slack_manifest)
    manifest.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), required=CONFIG_ENV not in os.environ)
    manifest.add_argument("--request-url", default="", help="public base URL for HTTP mode, e.g. https://bridge.example.com")

    invite = command(
        "discord-invite",
        "Print the OAuth2 URL that invites the bot with the permissions it needs.",
        _cmd_discord_invite,
    )
    invite.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), required=CONFIG_ENV not in os.environ)

    test_alert = command(
        "send-test-alert",
        "Send a signed test event to the running bridge, which posts it as an alert wherever the chatbot's rules say.",
        _cmd_send_test_alert,
    )
    test_alert.add_argument("chatbot", help="the chatbot id whose alert rules to use")
    test_alert.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), required=CONFIG_ENV not in os.environ)
    test_alert.add_argument("--url", default="", help="the running bridge's base URL (default: from server.listen)")

    health = command(
        "health",
        "Ask the bridge running with this config for /healthz (the container's HEALTHCHECK); exit 0 when healthy.",
        _cmd_health,
    )
    health.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), required=CONFIG_ENV not in os.environ)

    report = command(
        "report",
        "Print per chatbot: questions answered, unanswered rate, votes, flagged answers, escalations, human "
        "requests, time to claim and to resolve alerts, alerts still open. Reads the config's state store; "
        "a running bridge is not disturbed.",
        _cmd_report,
    )
    report.add_argument(
        "--since", default=7 * 86_400.0, type=_duration, help="how far back: 7d, 24h, 90m, 2w (default 7d; at most 35d)"
    )
    report.add_argument(
        "--config", "-c", default=os.environ.get(CONFIG_ENV), help="default: the state file ./bridge-state.db"
    )

    emulator = command("emulator", "Serve a local InsiteChat-compatible API for development and tests.", _cmd_emulator)
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8765)
    emulator.add_argument(
        "--webhook-url",
        default=None,
        help="where the chatbot's webhooks go, e.g. http://127.0.0.1:8080/webhooks/insitechat/CHATBOT "
        "(without it /visitor, /lead and /send-test fire nothing)",
    )
    emulator.add_argument(
        "--webhook-secret",
        default=SANDBOX_WEBHOOK_SECRET,
        help=f"the secret the webhooks are signed with (the bridge's chatbots[].webhook_secret; "
        f"default {SANDBOX_WEBHOOK_SECRET})",
    )
    return parser


def _setup_logs(args: argparse.Namespace, settings: Settings | None) -> None:
    from bridge.logs import setup_logging

    level = args.log_level or (settings.logging.level if settings else "INFO")
    fmt = args.log_format or (settings.logging.format if settings else "text")
    setup_logging(level, fmt, secrets=_secrets_of(settings))


def _secrets_of(settings: Settings | None) -> list[str]:
    if settings is None:
        return [os.environ.get("INSITECHAT_API_KEY", "")]
    found = list(settings.insitechat.all_keys.values())
    found += [bot.webhook_secret or "" for bot in settings.chatbots]
    if settings.slack:
        found += [settings.slack.bot_token, settings.slack.app_token or "", settings.slack.signing_secret or ""]
    if settings.discord:
        found.append(settings.discord.token)
    return found


# --- run -------------------------------------------------------------------------------------


async def _cmd_run(args: argparse.Namespace) -> int:
    from bridge.app import BridgeApp

    if args.config:
        settings = config.load(args.config)
        _setup_logs(args, settings)
        _log_start(args.config, settings)
        from bridge.store import StoreError

        try:
            app = BridgeApp(settings, grace=args.grace, wal_checkpointer=True)
        except StoreError as exc:  # it names the file or the Redis URL (without its password) and why
            raise CommandFailed(str(exc)) from None
        return await _run_until_signal(app)
    return await _run_sandbox(args)


def _log_start(path: str, settings: Settings) -> None:
    """One line that says which bridge runs with what: the first thing to read in an incident."""
    fields = {
        "version": _version(),
        "config": path,
        "platforms": ",".join(settings.platforms) or "none",
        "routes": len(settings.routes),
        "alert_rules": len(settings.alerts),
    }
    log.info("insitechat-bridge starting: %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("insitechat-bridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


async def _run_sandbox(args: argparse.Namespace) -> int:
    from bridge.sandbox import Sandbox

    sandbox = Sandbox(grace=args.grace)
    try:
        app = await sandbox.prepare()
        # The sandbox keeps the terminal for the chat: only warnings and errors are logged.
        args.log_level = args.log_level or "WARNING"
        _setup_logs(args, app.settings)
        # The banner comes once the web server listens, so that it can say where.
        return await _run_until_signal(app, on_started=sandbox.started)
    finally:
        await sandbox.close()


async def _run_until_signal(app: BridgeApp, on_started: Callable[[], None] | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = app.stopped
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await app.start()
        except Exception as exc:
            log.error("start-up failed: %s", exc)
            await app.stop()
            return EXIT_FAILURE
        # What start-up made (modules, classes, settings) lives as long as the process: out of the
        # cyclic GC's way, so that its full collections in the middle of answers scan only what
        # answers make (25-46 ms pauses at 50 conversations before, bench/README.md).
        gc.collect()
        gc.freeze()
        if on_started is not None:
            on_started()
        await stop.wait()
        log.info("stopping")
        stop.clear()
        await app.stop()
        if app.failure:
            # A platform refused the bridge at start (a wrong token): one line, exit 1.
            raise CommandFailed(app.failure)
        return EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


# --- check, chatbots, sources ----------------------------------------------------------------


async def _cmd_check(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    _setup_logs(args, settings)
    print(f"ok    config: {args.config} is valid ({', '.join(settings.platforms) or 'no platform'})")
    if not settings.webhooks.verify_signatures:
        ignored = [bot.id for bot in settings.chatbots if bot.webhook_secret]
        print(
            "WARN  webhooks.verify_signatures is false: ANYONE who can reach the webhook URL can raise alerts"
            + (f", and the webhook_secret of {', '.join(ignored)} is ignored" if ignored else "")
            + "; set it to true before exposing the bridge"
        )
    if not args.live:
        return EXIT_OK
    checks: list[tuple[str, list[str]]] = [("state", await _check_state(settings))]
    checks.append(("insitechat", await _check_chatbots(settings)))
    if settings.slack is not None:
        from adapters import slack

        checks.append(("slack", await slack.check(settings)))
    if settings.discord is not None:
        from adapters import discord as discord_adapter

        checks.append(("discord", await discord_adapter.check(settings)))
    for part, problems in checks:
        for problem in problems:
            print(f"FAIL  {problem}" if problem.startswith(part) else f"FAIL  {part}: {problem}")
        if not problems:
            print(f"ok    {part}: every check passed")
    return EXIT_FAILURE if any(problems for _, problems in checks) else EXIT_OK


async def _check_state(settings: Settings) -> list[str]:
    """The state store can be written; a Redis that keeps nothing on disk is a loud warning.

    The SQLite file is not opened: opening it takes over the leases of a bridge running on
    it (one process per file). Its directory must be writable.
    """
    from pathlib import Path

    from bridge.store import StoreError
    from bridge.store.redis import RedisStore

    state = settings.state
    if not state.redis_url:
        folder = Path(state.sqlite).resolve().parent  # noqa: ASYNC240 (a one-off check, not the serving loop)
        while not folder.exists():
            folder = folder.parent
        return [] if os.access(folder, os.W_OK) else [f"state.sqlite: cannot write in {folder}"]
    store = RedisStore(state.redis_url, prefix=state.redis_prefix)
    try:
        if not await store.ping():
            return ["state.redis_url: the Redis server cannot be written (see the error above)"]
        warning = await store.persistence_warning()
        if warning:
            print(f"WARN  state: {warning}")
    except StoreError as exc:
        return [f"state.redis_url: {exc}"]
    finally:
        await store.close()
    return []


async def _check_chatbots(settings: Settings) -> list[str]:
    from bridge.app import build_clients
    from bridge.clock import SystemClock
    from bridge.insitechat import Chatbot, InsiteChatError

    problems: list[str] = []
    clients = build_clients(settings, SystemClock())
    try:
        chatbots_of: dict[str, dict[str, Chatbot]] = {}
        for name, client in clients.items():
            try:
                bots = await client.list_chatbots()
            except InsiteChatError as exc:
                problems.append(f"insitechat key {name!r}: {exc}")
                continue
            chatbots_of[name] = {bot.id: bot for bot in bots}
            print(f"ok    insitechat key {name!r}: {len(bots)} chatbot(s)")
            await _end_quota_pause(settings, name)
            for bot in bots:
                print(f"        {bot.id}  {bot.name}{'' if bot.is_active else '  (paused)'}")
        for i, route in enumerate(settings.routes):
            key = settings.chatbot_key(route.chatbot)
            if key not in chatbots_of:
                continue  # that key's failure is already reported
            routed = chatbots_of[key].get(route.chatbot)
            if routed is None:
                problems.append(f"routes[{i}].chatbot: {route.chatbot} is not a chatbot of key {key!r}")
            elif not routed.is_active:
                problems.append(f"routes[{i}].chatbot: {routed.name} ({route.chatbot}) is paused in InsiteChat")
    finally:
        for client in clients.values():
            await client.aclose()
    return problems


async def _end_quota_pause(settings: Settings, name: str) -> None:
    """The key works: a bridge that paused chat after a quota 429 asks InsiteChat again with its next message."""
    from bridge.app import quota_mark

    mark = quota_mark(settings, settings.insitechat.all_keys[name])
    try:
        if await mark.clear():
            print(f"ok    insitechat key {name!r}: quota pause cleared; the bridge asks again with the next message")
    except Exception as exc:
        print(f"WARN  insitechat key {name!r}: could not clear the bridge's quota pause: {type(exc).__name__}: {exc}")
    finally:
        await mark.aclose()


def _client_for(args: argparse.Namespace) -> tuple[Settings, dict[str, InsiteChatClient]]:
    """Clients from the config, or from INSITECHAT_API_KEY (+ INSITECHAT_BASE_URL) without one."""
    from bridge.app import build_clients
    from bridge.clock import SystemClock

    if args.config:
        settings = config.load(args.config)
    else:
        if not os.environ.get("INSITECHAT_API_KEY"):
            raise ConfigError("<environment>", ["INSITECHAT_API_KEY is not set, and no --config was given"])
        base = os.environ.get("INSITECHAT_BASE_URL", "https://backend.insitechat.ai/api")
        settings = config.loads(
            f"insitechat:\n  base_url: {base}\n  api_key: ${{INSITECHAT_API_KEY}}\n"
            "console: {enabled: true}\nroutes: [{platform: console, chatbot: 00000000-0000-0000-0000-000000000000}]\n",
            source="<environment>",
        )
    _setup_logs(args, settings)
    return settings, build_clients(settings, SystemClock())


async def _cmd_chatbots(args: argparse.Namespace) -> int:
    from bridge.insitechat import InsiteChatError

    _, clients = _client_for(args)
    failed = False
    for name, client in clients.items():
        try:
            bots = await client.list_chatbots()
        except InsiteChatError as exc:
            print(f"key {name!r}: {exc}", file=sys.stderr)
            failed = True
            continue
        finally:
            await client.aclose()
        for bot in bots:
            state = "active" if bot.is_active else "paused"
            print(f"{bot.id}  {state:6}  {bot.provider:10}  {bot.name}")
    return EXIT_FAILURE if failed else EXIT_OK


async def _cmd_sources(args: argparse.Namespace) -> int:
    from bridge.insitechat import InsiteChatError

    settings, clients = _client_for(args)
    key = settings.chatbot_key(args.chatbot)
    client = clients.get(key) or next(iter(clients.values()))
    try:
        sources = await client.list_sources(args.chatbot)
    except InsiteChatError as exc:
        raise CommandFailed(str(exc)) from None
    finally:
        for c in clients.values():
            await c.aclose()
    for src in sources:
        print(f"{src.status:10}  {src.type:12}  {src.page_count:5}  {src.title}  {src.url}".rstrip())
    if not sources:
        print("no sources")
    return EXIT_OK


# --- platform set-up helpers ----------------------------------------------------------------


async def _cmd_slack_manifest(args: argparse.Namespace) -> int:
    import json

    from adapters.slack import manifest
    from adapters.slack.setup import EVENTS_PATH, PLACEHOLDER_URL

    # The manifest creates the Slack app the tokens come from: no ${VAR} needs to be set yet.
    settings = config.load(args.config, env_needed_by=())
    if settings.slack is None:
        raise CommandFailed("the config has no slack section")
    print(json.dumps(manifest(settings, request_url=args.request_url), indent=2))
    if settings.slack.transport == "http" and not args.request_url:
        print(
            f"note: slack.mode is http and no --request-url was given, so the manifest points at "
            f"{PLACEHOLDER_URL}{EVENTS_PATH}: replace that with your bridge's public URL, or run again "
            f"with --request-url https://your-bridge-host",
            file=sys.stderr,
        )
    return EXIT_OK


async def _cmd_discord_invite(args: argparse.Namespace) -> int:
    from adapters.discord import DiscordSetupError, invite_url

    settings = config.load(args.config, env_needed_by=("discord",))  # the invite comes before the other secrets
    if settings.discord is None:
        raise CommandFailed("the config has no discord section")
    try:
        print(await invite_url(settings))
    except DiscordSetupError as exc:
        raise CommandFailed(str(exc)) from None
    return EXIT_OK


async def _cmd_send_test_alert(args: argparse.Namespace) -> int:
    """A signed test event to the running bridge: receiver, store, outbox and platforms all take part."""
    import hashlib
    import hmac
    import json
    from datetime import UTC, datetime

    import httpx

    from bridge.alerts import Event, destinations_for
    from bridge.webhooks import SIGNATURE_HEADER

    settings = config.load(args.config)
    _setup_logs(args, settings)
    now = datetime.now(UTC)
    data = {"test": True, "session_id": f"test-{int(now.timestamp())}", "message": "This is a test alert."}
    destinations = destinations_for(settings, Event("webhook.test", args.chatbot, now, data))
    if not destinations:
        raise CommandFailed(f"no alert rule in the config names chatbot {args.chatbot}")
    body = json.dumps(
        {"event": "webhook.test", "chatbot_id": args.chatbot, "timestamp": now.isoformat(), "data": data}
    ).encode()
    headers = {"Content-Type": "application/json"}
    bot = settings.chatbot_settings(args.chatbot)
    if bot is not None and bot.webhook_secret:
        headers[SIGNATURE_HEADER] = hmac.new(bot.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    base = args.url or _local_url(settings)
    url = f"{base.rstrip('/')}/webhooks/insitechat/{args.chatbot}"
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise CommandFailed(f"the bridge at {base} did not answer ({type(exc).__name__}): is it running?") from None
    if response.status_code >= 300:
        raise CommandFailed(f"the bridge refused the test event ({response.status_code}): {response.text[:200]}")
    print(f"accepted by the bridge at {base}; the test alert goes to:")
    for destination in destinations:
        print(f"  {destination.address}")
    return EXIT_OK


def _local_url(settings: Settings) -> str:
    """The bridge's own web server as seen from its host (0.0.0.0 listens everywhere, 127.0.0.1 reaches it)."""
    host = settings.server.host if settings.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.server.port}"


async def _cmd_health(args: argparse.Namespace) -> int:
    """GET /healthz on server.listen: the HEALTHCHECK follows the configured port, and needs no secret."""
    import httpx

    url = _local_url(config.load(args.config, env_needed_by=())) + "/healthz"
    try:
        async with httpx.AsyncClient(timeout=4) as http:
            response = await http.get(url)
    except httpx.HTTPError as exc:
        raise CommandFailed(f"no answer from {url} ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise CommandFailed(f"{url}: {response.status_code} {response.text[:200]}")
    print(f"ok    {url}")
    return EXIT_OK


# --- report --------------------------------------------------------------------------------


def _duration(text: str) -> float:
    """--since: argparse says what is wrong, with the usage, and exits 2."""
    from bridge.report import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _cmd_report(args: argparse.Namespace) -> int:
    """The report from the store the config names, read without taking anything over from a running bridge."""
    import time

    from bridge.report import gather_report, render_text
    from bridge.store import StoreError
    from bridge.store.redis import RedisStore
    from bridge.store.sqlite import FactsReader

    window: float = args.since
    # Only the state section's ${VARS} are needed (a Redis password): the report makes no other connection.
    settings = config.load(args.config, env_needed_by=("state",)) if args.config else None
    _setup_logs(args, settings)
    state = settings.state if settings is not None else config.StateSettings()
    names = {bot.id: bot.name for bot in settings.chatbots if bot.name} if settings is not None else {}
    timezone = settings.report.timezone if settings is not None else "UTC"
    until = time.time()
    try:
        # A state file is read through a read-only connection: opening it as a store voids its leases.
        source = (
            RedisStore(state.redis_url, prefix=state.redis_prefix) if state.redis_url else FactsReader(state.sqlite)
        )
        try:
            report = await gather_report(source, since=until - window, until=until, names=names, timezone=timezone)
        finally:
            await source.close()
    except StoreError as exc:
        raise CommandFailed(str(exc)) from None
    sys.stdout.write(render_text(report))
    return EXIT_OK


# --- emulator --------------------------------------------------------------------------------


async def _cmd_emulator(args: argparse.Namespace) -> int:
    from bridge.emulator import serve_forever

    _setup_logs(args, None)
    serving = asyncio.ensure_future(
        serve_forever(args.host, args.port, webhook_url=args.webhook_url, webhook_secret=args.webhook_secret)
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    return EXIT_OK
