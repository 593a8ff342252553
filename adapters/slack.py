"""The Slack adapter: slack-bolt's AsyncApp over Socket Mode or HTTP events, in our one event loop."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.middleware.authorization.async_single_team_authorization import AsyncSingleTeamAuthorization
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError

from adapters.slack_setup import (
    EVENTS_PATH,
    NETWORK_ERRORS,
    REQUIRED_SCOPES,
    SlackError,
    check,
    error_code,
    make_client,
    manifest,
    token_scopes,
)
from adapters.slack_translate import (
    PLATFORM,
    BotIdentity,
    command_echo,
    command_inbound,
    event_to_inbound,
    parse_command,
)
from bridge.clock import Clock, SystemClock
from bridge.config import ReplyMode, Settings
from bridge.desk import AlertDesk
from bridge.messages import Inbound, Outbound
from bridge.store import Store

__all__ = ["SlackAdapter", "SlackError", "check", "manifest"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0  # Socket Mode: the SDK retries a failed connect forever; we give up and say so
SIGNAL_GRACE = 2.0  # seconds stop() gives pending reaction removals
_DM_THREADS_KEPT = 1000

USAGE = "Ask the chatbot a question: `{command} <question>`. `{command} reset` in a DM starts a new conversation."
RESET_IN_CHANNEL = (
    "To start a new conversation here, reply `reset` in the thread you want to restart "
    "(mention me if I'm not following it). In a DM with me, `{command} reset` works too."
)
NO_ROUTE = "I'm not set up to answer here. An admin can add a route for this channel in the bridge's config."
NOT_IN_CHANNEL = "I can't post in this channel yet: invite me with `/invite @{bot}` and ask again."
POST_FAILED = "I couldn't post your question here ({error}). Please try again in a moment."


class SlackAdapter:
    """Slack in and out: events become Inbound for the relay; the relay's Outbound become posts.

    Translation is pure (adapters/slack_translate.py); every decision is the relay's. The
    adapter passes each plain message and mention on, even the `message` + `app_mention`
    pair of one post and Slack's retries: they share one dedupe key, which the relay
    claims in the persistent store, so each post is answered exactly once.
    """

    name = PLATFORM

    def __init__(
        self,
        settings: Settings,
        on_message: Callable[[Inbound], Awaitable[object]],
        *,
        web: web.Application | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        desk: AlertDesk | None = None,
    ) -> None:
        if settings.slack is None:
            raise ValueError("the config has no slack section")
        self._settings = settings
        self._slack = settings.slack
        self._on_message = on_message
        # Dedupe and follow state live in the relay; store and clock keep the adapter
        # constructor uniform across platforms.
        self._store = store
        self._clock = clock or SystemClock()
        self._desk = desk  # alert buttons and "Talk to a human" go through it
        self._http = self._slack.transport == "http"
        self.client = make_client(self._slack.bot_token, self._slack.api_url)
        self.app = AsyncApp(
            name="insitechat-bridge",
            client=self.client,
            signing_secret=self._slack.signing_secret or "",
            # Ack first, run listeners after: a slow chatbot must never trip Slack's 3 s retry.
            process_before_response=False,
            request_verification_enabled=self._http,
            # The relay decides about the bot's own messages (author_is_self), in one place.
            ignoring_self_events_enabled=False,
            attaching_conversation_kwargs_enabled=False,
        )
        self.app.event("message")(self._on_event)
        self.app.event("app_mention")(self._on_event)
        self.app.command(self._slack.command)(self._on_command)
        self.me: BotIdentity | None = None
        self.bot_name = ""  # the bot user's handle, for "/invite @name" hints
        self.scopes: frozenset[str] = frozenset()
        self._socket: AsyncSocketModeHandler | None = None
        self._running = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # DM messages written inside a thread (the assistant pane, a threaded DM reply):
        # the relay keeps one conversation per DM, but the answer belongs in that thread.
        self._dm_threads: OrderedDict[tuple[str, str], str] = OrderedDict()
        if self._http:
            if web is None:
                raise ValueError("Slack HTTP mode needs the bridge's web application")
            # Added now: aiohttp freezes the router when the server starts.
            web.router.add_post(EVENTS_PATH, self._handle_http)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """auth.test (who the bot is), then Socket Mode connect or HTTP events accepted."""
        if self._running:
            return
        try:
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            raise SlackError(f"Slack refused the bot token (auth.test: {error_code(exc)})") from None
        except NETWORK_ERRORS as exc:
            raise SlackError(f"cannot reach the Slack API at {self._slack.api_url} ({error_code(exc)})") from None
        self.me = BotIdentity(
            user_id=str(auth.get("user_id") or ""),
            bot_id=str(auth.get("bot_id") or ""),
            team_id=str(auth.get("team_id") or ""),
        )
        self.bot_name = str(auth.get("user") or "")
        self.scopes = token_scopes(auth.headers) or frozenset()
        missing = sorted(set(REQUIRED_SCOPES) - self.scopes) if self.scopes else []
        if missing:
            log.warning("the Slack bot token lacks scope(s) %s; `check` explains what each is for", ", ".join(missing))
        self._seed_authorization(auth)
        if not self._http:
            await self._connect_socket()
        self._running = True
        log.info(
            "slack connected: team=%s bot_user=%s transport=%s", self.me.team_id, self.me.user_id, self._slack.transport
        )

    def _seed_authorization(self, auth: Any) -> None:
        # Bolt calls auth.test lazily on the first event; hand it ours so the first event
        # after a restart cannot fail on a transient auth.test error.
        for middleware in getattr(self.app, "_async_middleware_list", []):
            if isinstance(middleware, AsyncSingleTeamAuthorization):
                middleware.auth_test_result = auth

    async def _connect_socket(self) -> None:
        handler = AsyncSocketModeHandler(self.app, self._slack.app_token)
        try:
            # Asked here, not inside connect(): connect() retries a refused app token forever.
            handler.client.wss_uri = await handler.client.issue_new_wss_url()
            await asyncio.wait_for(handler.connect_async(), CONNECT_TIMEOUT)
        except SlackApiError as exc:
            await handler.close_async()
            raise SlackError(f"Slack refused the app token (apps.connections.open: {error_code(exc)})") from None
        except (*NETWORK_ERRORS, asyncio.CancelledError) as exc:
            await handler.close_async()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SlackError(f"could not open the Slack Socket Mode connection ({error_code(exc)})") from None
        self._socket = handler

    async def stop(self) -> None:
        """Close the socket and finish pending feedback clean-up; safe to call twice or unstarted."""
        self._running = False
        handler, self._socket = self._socket, None
        if handler is not None:
            try:
                await handler.close_async()
            except Exception:
                log.warning("closing the Slack socket failed", exc_info=True)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=SIGNAL_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # --- inbound -------------------------------------------------------------------------------

    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        if not self._running:
            # Not started yet, or shutting down: Slack retries, and the retry is answered.
            return web.Response(status=503, text="not ready")
        bolt_request = await to_bolt_request(request)
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))

    async def _on_event(self, body: dict[str, Any], request: AsyncBoltRequest) -> None:
        if self.me is None:
            return
        inbound = event_to_inbound(body, self.me)
        event = body.get("event") or {}
        if inbound is None:
            log.debug("slack %s/%s event not passed on", event.get("type"), event.get("subtype"))
            return
        retry = (request.headers.get("x-slack-retry-num") or [""])[0]
        if retry:
            # Not dropped: after a restart the retry may be the only delivery. The relay dedupes.
            reason = (request.headers.get("x-slack-retry-reason") or [""])[0]
            log.info("slack retry %s (%s) of %s", retry, reason or "?", inbound.dedupe_key)
        if inbound.is_dm and inbound.in_thread:
            self._remember_dm_thread(inbound.channel, inbound.message_id, inbound.thread)
        self._submit(inbound)

    def _submit(self, inbound: Inbound) -> None:
        # relay.submit returns a task; a plain coroutine function is scheduled here.
        # Never awaited in a listener: answering takes seconds.
        result = self._on_message(inbound)
        if inspect.isawaitable(result) and not isinstance(result, asyncio.Future):
            self._spawn(result)  # type: ignore[arg-type]

    def _remember_dm_thread(self, channel: str, message_id: str, thread: str) -> None:
        self._dm_threads[(channel, message_id)] = thread
        while len(self._dm_threads) > _DM_THREADS_KEPT:
            self._dm_threads.popitem(last=False)

    async def _on_command(
        self, ack: Callable[..., Awaitable[None]], command: dict[str, Any], respond: Callable[..., Awaitable[Any]]
    ) -> None:
        if self.me is None:
            await ack(text="Starting up, please try again in a moment.")
            return
        cmd = parse_command(command, self.me)
        name = self._slack.command
        if cmd.action == "usage":
            await ack(text=USAGE.format(command=name))  # an ack with text is shown to the user only
            return
        if cmd.action == "reset" and not cmd.is_dm:
            await ack(text=RESET_IN_CHANNEL.format(command=name))
            return
        # A route lookup, not a trigger rule: without one the relay would stay silent, and
        # only the ack can still tell the user why.
        route = self._settings.route_for(PLATFORM, cmd.workspace, cmd.channel, cmd.is_dm)
        if route is None or route.reply is ReplyMode.OFF:
            await ack(text=NO_ROUTE)
            return
        await ack()
        if cmd.action == "reset":
            # The relay resets the DM conversation and confirms in the DM.
            trigger = str(command.get("trigger_id") or "") or f"{self._clock.time():.6f}"
            self._submit(command_inbound(cmd, f"cmd-{trigger}"))
            return
        try:
            posted = await self.client.chat_postMessage(
                channel=cmd.channel, text=command_echo(cmd), unfurl_links=False, unfurl_media=False
            )
        except (SlackApiError, *NETWORK_ERRORS) as exc:
            code = error_code(exc)
            log.warning("posting the %s question in %s failed: %s", name, cmd.channel, code)
            text = (
                NOT_IN_CHANNEL.format(bot=self.bot_name or "InsiteChat")
                if code in ("not_in_channel", "channel_not_found")
                else POST_FAILED.format(error=code)
            )
            with suppress(Exception):
                await respond(text=text, response_type="ephemeral")
            return
        # The question's root post is the message answered: the answer lands in its thread.
        self._submit(command_inbound(cmd, str(posted["ts"])))

    # --- outbound ------------------------------------------------------------------------------

    async def send(self, outbound: Outbound) -> list[str]:
        """chat.postMessage for each part in order, in the conversation's thread; returns the ts list."""
        conversation = outbound.conversation
        thread = conversation.thread or self._dm_threads.get((conversation.channel, outbound.reply_to), "")
        posted: list[str] = []
        for number, part in enumerate(outbound.parts, start=1):
            try:
                response = await self.client.chat_postMessage(
                    channel=conversation.channel,
                    text=part,  # already Slack mrkdwn, escaped and split by the relay
                    thread_ts=thread or None,
                    unfurl_links=False,
                    unfurl_media=False,
                )
            except (SlackApiError, *NETWORK_ERRORS) as exc:
                raise SlackError(
                    f"chat.postMessage to {conversation.channel} failed on part {number} of "
                    f"{len(outbound.parts)} ({error_code(exc)})"
                ) from None
            posted.append(str(response.get("ts") or ""))
        return posted

    @asynccontextmanager
    async def working(self, inbound: Inbound) -> AsyncIterator[None]:
        """A reaction on the user's post (and assistant status in DMs) while the answer is prepared.

        Both run in the background: a rate-limited reactions.add must never delay the answer.
        """
        shown = self._spawn(self._show_working(inbound))
        try:
            yield
        finally:
            self._spawn(self._clear_working(inbound, shown))

    async def _show_working(self, inbound: Inbound) -> None:
        add = self.client.reactions_add(channel=inbound.channel, timestamp=inbound.message_id, name=self._slack.reaction)
        await self._quietly("reactions.add", add, harmless=("already_reacted",))
        if inbound.is_dm and "assistant:write" in self.scopes:
            await self._quietly(
                "assistant.threads.setStatus",
                self.client.assistant_threads_setStatus(
                    channel_id=inbound.channel, thread_ts=inbound.thread or inbound.message_id, status="is thinking…"
                ),
            )

    async def _clear_working(self, inbound: Inbound, shown: asyncio.Task[None]) -> None:
        await asyncio.wait({shown})  # its outcome is already logged; our own cancellation still propagates
        remove = self.client.reactions_remove(
            channel=inbound.channel, timestamp=inbound.message_id, name=self._slack.reaction
        )
        await self._quietly("reactions.remove", remove, harmless=("no_reaction", "message_not_found"))
        if inbound.is_dm and "assistant:write" in self.scopes:
            await self._quietly(
                "assistant.threads.setStatus",
                self.client.assistant_threads_setStatus(
                    channel_id=inbound.channel, thread_ts=inbound.thread or inbound.message_id, status=""
                ),
            )

    async def _quietly(self, method: str, call: Awaitable[Any], harmless: tuple[str, ...] = ()) -> None:
        """Feedback is a courtesy: its failures are logged, never raised."""
        try:
            await call
        except SlackApiError as exc:
            code = error_code(exc)
            if code in harmless:
                log.debug("%s: %s", method, code)
            else:
                log.warning("%s failed: %s", method, code)
        except NETWORK_ERRORS as exc:
            log.warning("%s failed: %s", method, error_code(exc))

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
