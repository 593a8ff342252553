"""Wires config, state, InsiteChat clients, the relay, the adapters and the web server into one loop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TextIO

from aiohttp import web

from adapters.console import ConsoleAdapter, ConsoleCommand
from bridge import metrics
from bridge.backoff import Backoff
from bridge.clock import Clock, SystemClock
from bridge.config import Settings
from bridge.desk import AlertDesk
from bridge.digest import DigestScheduler
from bridge.facts import FactLog
from bridge.feedback import Feedback
from bridge.handover import HandOvers
from bridge.insitechat import FileQuotaMark, InsiteChatClient, QuotaMark, RedisQuotaMark, RetryPolicy
from bridge.leader import LEASE, RedisLease
from bridge.limiter import SlidingWindowLimiter
from bridge.outbox import ATTEMPT_LEASE, Outbox
from bridge.ports import Adapter, Platform, ReportsReadiness, StopsIntake
from bridge.relay import JOB_LEASE, Relay
from bridge.store import LOCK_LEASE, SQLiteStore, Store, StoreError, open_store
from bridge.store.redis import RedisStore
from bridge.store.wire import Wire
from bridge.supervisor import Supervisor
from bridge.webhooks import WebhookReceiver
from bridge.webserver import quiet_malformed_requests

log = logging.getLogger(__name__)

# Together well inside `docker stop`'s 10 s before SIGKILL; whatever is not done stays stored.
GRACE = 6.0  # answers in flight may finish
FINAL_PASS = 2.0  # then the outbox posts what is due
PRUNE_EVERY = 3600.0
# Tests only: multiplies every lease, so that a killed replica's work is taken over in
# seconds, not minutes (the subprocess replica tests).
LEASE_SCALE_ENV = "INSITECHAT_BRIDGE_LEASE_SCALE"


@dataclass(frozen=True)
class Leases:
    """How long a replica's work stays its own after it stopped renewing: then another takes it over."""

    job: float = JOB_LEASE
    conversation_lock: float = LOCK_LEASE
    delivery_attempt: float = ATTEMPT_LEASE
    discord_gateway: float = LEASE

    @classmethod
    def from_env(cls) -> Leases:
        scale = float(os.environ.get(LEASE_SCALE_ENV) or 1.0)
        defaults = cls()
        return cls(*(scale * getattr(defaults, f.name) for f in fields(cls)))


def quota_mark(settings: Settings, api_key: str) -> QuotaMark:
    """Where a quota pause of this key is marked, for `check --live` to end in every running bridge.

    Beside the state: a key in its Redis (every replica), or a file next to the SQLite file.
    Named by a hash of the key, never the key.
    """
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:32]
    state = settings.state
    if state.redis_url:
        return RedisQuotaMark(state.redis_url, f"{state.redis_prefix}quota-pause:{digest}")
    sqlite = Path(state.sqlite)
    return FileQuotaMark(sqlite.with_name(f"{sqlite.name}.quota-pause-{digest[:16]}"))


def build_clients(
    settings: Settings,
    clock: Clock,
    *,
    redis_url: str | None = None,
    quota_marks: bool = False,
    wire: Wire | None = None,
) -> dict[str, InsiteChatClient]:
    """One client and one limiter per API key: the upstream limit is per key, whatever the chatbot.

    With `redis_url` each key's window is kept in Redis, shared by every replica, over `wire` when
    given (the store's connection: one per replica), else a connection of its own. With
    `quota_marks` a quota pause is marked beside the state, where `check --live` ends it.
    """
    ic = settings.insitechat

    def limiter(key: str) -> SlidingWindowLimiter:
        if not redis_url:
            return SlidingWindowLimiter(ic.rate_limit, ic.rate_window, clock=clock)
        from bridge.budget import DEFAULT_HOLD, RedisWindow  # redis is needed only then

        # A held slot must outlast one attempt on its way: connect, write and read timeouts.
        hold = max(DEFAULT_HOLD, 3 * ic.timeout + 10)
        if wire is not None:
            shared = RedisWindow(wire, key, ic.rate_limit, ic.rate_window, clock=clock, hold=hold)
        else:
            shared = RedisWindow.from_url(redis_url, key, ic.rate_limit, ic.rate_window, clock=clock, hold=hold)
        return SlidingWindowLimiter(ic.rate_limit, ic.rate_window, clock=clock, shared=shared)

    return {
        name: InsiteChatClient(
            ic.base_url,
            key,
            limiter=limiter(key),
            clock=clock,
            policy=RetryPolicy(deadline=ic.deadline),
            timeout=ic.timeout,
            name=name,
            quota_mark=quota_mark(settings, key) if quota_marks else None,
        )
        for name, key in ic.all_keys.items()
    }


def gateway_lease_key(token: str, prefix: str) -> str:
    """One lease per bot: two bots sharing a Redis do not compete for one gateway."""
    from adapters.discord.setup import application_id_from_token

    return f"{prefix}discord-gateway:{application_id_from_token(token) or 'bot'}"


class BridgeApp:
    """The running bridge: start everything, run until told to stop, stop everything once.

    Slack and Discord connect in the background, each kept connected by its Supervisor: the
    webhook receiver and the outbox run whatever a platform does. A platform that refuses
    the bridge for good (a wrong token) at start stops it (`failure` says why, `stopped`
    is set); one that does so mid-run makes /healthz fail, so the orchestrator restarts it.
    """

    backoff = Backoff()  # between the connection attempts of each platform; tests shorten it

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        console_in: TextIO | None = None,
        console_out: TextIO | None = None,
        console_commands: Mapping[str, ConsoleCommand] | None = None,
        grace: float = GRACE,
        gateway_lease: RedisLease | None = None,
        leases: Leases | None = None,
        wal_checkpointer: bool = False,
    ) -> None:
        self.settings = settings
        # `run`: an SQLite state file's WAL checkpoints (fsyncs) go to a child process, off the loop.
        self._wal_checkpointer = wal_checkpointer
        self.clock = clock or SystemClock()
        leases = leases or Leases.from_env()
        self.store = store or open_store(
            settings.state.sqlite,
            redis_url=settings.state.redis_url,
            redis_prefix=settings.state.redis_prefix,
            clock=self.clock,
            keep_text=settings.state.keep_text_hours * 3600,
            lock_lease=leases.conversation_lock,
        )
        # Several replicas share one Redis: its InsiteChat budget per key, and one Discord gateway.
        self.clients = build_clients(
            settings, self.clock, redis_url=settings.state.redis_url, quota_marks=True,
            wire=self.store.wire if isinstance(self.store, RedisStore) else None,
        )
        # What the report counts (answers, votes, alerts), written a second at a time.
        self.facts = FactLog(self.store, self.clock)
        self.desk = AlertDesk(settings, self.store, self.clock, facts=self.facts)
        # 👍 / 👎 under answers: votes, and a 👎 as an answer.flagged alert.
        self.feedback = Feedback(settings, self.store, self.clock, desk=self.desk, facts=self.facts)
        self.outbox = Outbox(
            self.store, self.desk, self.clock, attempt_lease=leases.delivery_attempt,
            offers_feedback=self.feedback.offered,
        )
        self.desk.on_queued = self.outbox.wake
        self.handovers = HandOvers(settings, self.desk)
        # The weekly report digest, when configured: queued once per week whichever replica checks first.
        digest = settings.report.digest
        self.digest = (
            DigestScheduler(settings, digest, self.store, self.facts, self.clock, on_queued=self.outbox.wake)
            if digest is not None
            else None
        )
        self.relay = Relay(
            settings, self.store, self.clients, self.outbox,
            clock=self.clock, desk=self.desk, handovers=self.handovers, lease=leases.job, facts=self.facts,
        )
        self.grace = grace
        # Several replicas: only the holder of this lease connects Discord's gateway (all post).
        # Started and released by this app; None: one replica, always on the gateway.
        if gateway_lease is None and settings.state.redis_url and settings.discord is not None:
            lease_key = gateway_lease_key(settings.discord.token, settings.state.redis_prefix)
            if isinstance(self.store, RedisStore):  # on the store's connection: one per replica
                gateway_lease = RedisLease(self.store.wire, lease_key, clock=self.clock, lease=leases.discord_gateway)
            else:
                gateway_lease = RedisLease.from_url(
                    settings.state.redis_url, lease_key, clock=self.clock, lease=leases.discord_gateway
                )
        self.gateway_lease = gateway_lease
        self.adapters: list[Adapter] = []
        self.console: ConsoleAdapter | None = None
        if settings.console is not None and settings.console.enabled:
            # The console awaits each answer (one line after another); submit() keeps the
            # answer visible to drain() so a shutdown lets it finish.
            self.console = ConsoleAdapter(
                self.relay.submit, stdin=console_in, stdout=console_out, desk=self.desk, commands=console_commands,
                feedback=self.feedback,
            )
            self.adapters.append(self.console)
        self.web = web.Application()
        self.web.router.add_get("/healthz", self._healthz)
        self.web.router.add_get("/readyz", self._readyz)
        self.web.router.add_get("/metrics", self._metrics)
        # Platform adapters are imported only when configured: each pulls in a large SDK.
        if settings.slack is not None:
            from adapters.slack import SlackAdapter

            self.adapters.append(
                SlackAdapter(
                    settings.slack, self.relay.accept, web=self.web, clock=self.clock,
                    serves=self.relay.serves, handovers=self.handovers, desk=self.desk, feedback=self.feedback,
                    prompts=settings.assistant_prompts, records=self.store,
                )
            )
        if settings.discord is not None:
            from adapters.discord import DiscordAdapter

            self.adapters.append(
                DiscordAdapter(
                    settings.discord, self.relay.accept, clock=self.clock,
                    threads_for=settings.discord_threads, handovers=self.handovers, desk=self.desk,
                    leadership=gateway_lease, needs_message_content=settings.answers_everything("discord"),
                    feedback=self.feedback,
                )
            )
        WebhookReceiver(settings, self.desk, self.clock).add_routes(self.web)
        self._runner: web.AppRunner | None = None
        self.server_url = ""
        self.stopped = asyncio.Event()  # set to ask for a stop (signals, end of input, a refusal at start)
        self._maintenance: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.supervisors: dict[str, Supervisor] = {}
        self.failure = ""  # why the bridge stopped itself: a platform refused it at start

    async def start(self) -> None:
        """Start the web server, local adapters and the outbox; connect each platform in the background.

        Returns without waiting for Slack or Discord: webhooks are taken (and stored) while a
        platform is still connecting or down. `connected()` waits for the platforms.
        """
        # A Redis that keeps nothing on disk loses what is queued when it restarts: say so.
        # The first command also tells at once (StoreError) when Redis cannot be reached.
        persistence_warning = getattr(self.store, "persistence_warning", None)
        if persistence_warning is not None:
            warning = await persistence_warning()
            if warning:
                log.warning("%s", warning)
        if self._wal_checkpointer and isinstance(self.store, SQLiteStore):
            self.store.checkpoint_elsewhere()
        for adapter in self.adapters:
            self.relay.register(adapter)
            self.outbox.register(adapter)
        await self._start_server()
        started: list[Adapter] = []
        try:
            for adapter in self.adapters:
                if not isinstance(adapter, Platform):  # the console: nothing to reach, nothing to lose
                    await adapter.start()
                    started.append(adapter)
                    log.info("%s adapter started", adapter.name)
        except BaseException:
            for adapter in reversed(started):
                await adapter.stop()
            raise
        # Alerts and replies flow from the start; one for a platform that is not up yet fails
        # and waits in the store for the outbox's next try.
        self.outbox.start()
        if self.digest is not None:
            self.digest.start()
        if self.gateway_lease is not None:
            await self.gateway_lease.start()  # one try first: a lone replica's first attempt connects the gateway
        for adapter in self.adapters:
            if isinstance(adapter, Platform):
                supervisor = Supervisor(
                    adapter, self.clock, backoff=self.backoff, on_refused=self._refused, on_up=self._platform_up
                )
                self.supervisors[adapter.name] = supervisor
                supervisor.start()
        # The jobs a dead run left are answered now (their replies wait in the outbox like the rest).
        await self.relay.recover()
        self.relay.start()
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain(), name="store-maintenance")
        if self.console is not None and self.settings.platforms == ["console"]:
            # A console-only bridge (the sandbox) ends with its input.
            asyncio.get_running_loop().create_task(self._stop_at_end_of_input(self.console))

    async def _start_server(self) -> None:
        quiet_malformed_requests()
        self._runner = web.AppRunner(self.web, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.server.host, self.settings.server.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # the real port when listening on :0
        port = sockets[0].getsockname()[1] if sockets else self.settings.server.port
        self.server_url = f"http://{self.settings.server.host}:{port}"
        log.info("web server listening on %s", self.server_url)

    async def _maintain(self) -> None:
        """Forget what expired and drop kept texts past their window, hour by hour."""
        while True:
            await self.clock.sleep(PRUNE_EVERY)
            try:
                await self.store.prune()
            except StoreError as exc:
                log.error("pruning the state store failed: %s", exc)

    async def _stop_at_end_of_input(self, console: ConsoleAdapter) -> None:
        await console.finished.wait()
        log.info("end of input: stopping")
        self.stopped.set()

    async def connected(self) -> None:
        """Wait until every platform is connected; raises PlatformRefused if one never will be."""
        for supervisor in self.supervisors.values():
            await supervisor.wait_up()

    def _platform_up(self, supervisor: Supervisor) -> None:
        # What waited out the outage goes now, not at the end of its backoff (up to minutes).
        task = asyncio.get_running_loop().create_task(self.outbox.platform_up(supervisor.name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _refused(self, supervisor: Supervisor) -> None:
        reason = f"{supervisor.name}: {supervisor.refused}"
        if supervisor.was_up:
            # Mid-run (a token reset): webhooks are still taken and stored, but a deaf bot must
            # not look healthy. /healthz fails and the orchestrator restarts the process.
            log.error("%s; /healthz now fails so that the bridge is restarted", reason)
            return
        # At start: a token that was never accepted will not be on the next try either.
        log.error("%s; stopping", reason)
        self.failure = reason
        self.stopped.set()

    async def stop(self) -> None:
        """Stop taking messages, let answers in flight finish within the grace period, close all."""
        # No more connection attempts; a platform that is up stays up until the answers in flight went out.
        for supervisor in self.supervisors.values():
            await supervisor.halt()
        if self.gateway_lease is not None:
            # Released first: this gateway closes now and a standby takes it within a poll, so
            # messages sent while the answers in flight finish here are heard there.
            await self.gateway_lease.stop()
        for adapter in self.adapters:
            # Platforms that redeliver (Slack) stop taking events first, so nothing new is
            # acked and then dropped while the answers in flight finish.
            if isinstance(adapter, StopsIntake):
                await adapter.stop_intake()
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self.digest is not None:
            await self.digest.stop()
        await self.relay.drain(self.grace)
        # What is due goes out now if it can (a bounded try); the rest stays queued.
        await self.outbox.stop(final_pass=min(self.grace, FINAL_PASS))
        for adapter in reversed(self.adapters):
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping the %s adapter failed", adapter.name)
        if self._runner is not None:
            await self._runner.cleanup()
        for client in self.clients.values():
            await client.aclose()
            if client.limiter is not None:
                await client.limiter.aclose()  # a shared budget writes its last settles
        await self.facts.aclose()
        await self.store.close()
        self.stopped.set()

    async def _healthz(self, request: web.Request) -> web.Response:
        """Alive: the loop answers and no platform refused the bridge for good. Restart the process when this fails.

        A platform that is merely unreachable keeps this at 200 (a restart would not help;
        /readyz says what is down); a refused token is 503 with the reason.
        """
        refused = [f"{name}: {s.refused}" for name, s in self.supervisors.items() if s.refused is not None]
        if refused:
            return web.json_response({"status": "failing", "reason": "; ".join(refused)}, status=503)
        return web.json_response({"status": "ok"})

    async def readiness(self) -> dict[str, str]:
        """Each part's state: "ok" (maybe with a note: "ok (standby; ...)") or why it cannot do its job right now."""
        parts: dict[str, str] = {}
        parts["state"] = "ok" if await self.store.ping() else "the state store does not answer"
        for name, client in self.clients.items():
            # Degraded, not unready: chat gets a notice, and webhooks (a visitor asking for a
            # human) must keep reaching this replica, so a load balancer must keep it.
            parts[f"insitechat:{name}"] = {
                "open": "ok (degraded: InsiteChat is failing, circuit open; questions get a notice)",
                "quota": "ok (degraded: monthly message quota exhausted; questions get a notice)",
            }.get(client.circuit_state(), "ok")
        for adapter in self.adapters:
            supervisor = self.supervisors.get(adapter.name)
            connecting = supervisor.readiness() if supervisor is not None else None
            if connecting is not None:  # connecting, refused: the supervisor knows why
                parts[adapter.name] = connecting
                continue
            if isinstance(adapter, ReportsReadiness):
                parts[adapter.name] = adapter.readiness() or "ok"
        return parts

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready: every part can do its job. The body says which part is not, and which is degraded."""
        parts = await self.readiness()
        ready = all(v == "ok" or v.startswith("ok (") for v in parts.values())
        degraded = [name for name, v in parts.items() if v.startswith("ok (degraded")]
        body = {"ready": ready, "degraded": degraded, "parts": parts}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        depth, oldest = await self.store.outbox_depth()
        for state, count in (await self.store.job_counts()).items():
            metrics.CHAT_JOBS.labels(state.value).set(count)
        metrics.OUTBOX_DEPTH.set(depth)
        metrics.OUTBOX_OLDEST.set(oldest or 0.0)
        for name, client in self.clients.items():
            if client.limiter is not None:
                metrics.LIMITER_QUEUE.labels(name).set(client.limiter.waiting)
            now = client.circuit_state()
            for circuit in metrics.CIRCUIT_STATES:
                metrics.INSITECHAT_CIRCUIT.labels(name, circuit).set(1.0 if circuit == now else 0.0)
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})
