"""The Slack adapter: slack-bolt's AsyncApp over Socket Mode or HTTP events, in our one event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_bolt.middleware.authorization.async_single_team_authorization import AsyncSingleTeamAuthorization
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier

from adapters.slack.alerts import SECTION_LIMIT, alert_key, alert_metadata
from adapters.slack.assistant import PromptsFor, Shown, SlackAssistant, StatusWatch, settled
from adapters.slack.feedback import PLAIN_BUTTONS, answer_blocks
from adapters.slack.digest import SlackDigests, digest_key
from adapters.slack.delivery import SlackPostRefused, part_mark, part_metadata, quietly, refusal_notice, send_error
from adapters.slack.interactions import BotUser, Serves, SlackInteractions
from adapters.slack.setup import (
    EVENTS_PATH,
    NETWORK_ERRORS,
    REFUSED_CODES,
    SlackError,
    SlackRefused,
    error_code,
    make_client,
    required_scopes,
    token_scopes,
)
from adapters.slack.translate import PLATFORM, BotIdentity, event_to_inbound
from bridge.clock import Clock, SystemClock
from bridge.config import SlackSettings
from bridge.desk import AlertDesk
from adapters.slack.cards import slack_card
from adapters.slack.formatting import to_slack
from bridge.alerts import Alert
from bridge.charts import Chart
from bridge.report import Report
from bridge.formatting import split_text
from bridge.messages import Conversation, Delivery, Inbound, Outbound
from bridge.handover import HandOvers
from bridge.feedback import Feedback
from bridge.ports import PermanentSendError
from bridge.store import Records, StoreError
from bridge.webserver import BodyTooLarge, read_body


log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0  # Socket Mode: the SDK retries a failed connect forever; we give up and say so
SIGNAL_GRACE = 2.0  # seconds stop() gives pending reaction removals
SOCKET_PING_INTERVAL = 10.0  # Socket Mode ping every this many seconds (Bolt's default)
SILENT_AFTER = 2  # pings: a socket silent for longer is not ready, even if it looks connected
FIND_PAGES = 5  # conversations.history/replies pages searched for an earlier post after a crash
FIND_PAGE_SIZE = 200
MAX_EVENT_BODY = 1024 * 1024  # Slack's events and interaction payloads are far smaller


class _SameTokenTwice(logging.Filter):
    """Drops Bolt's "client given, token unused" warning: Bolt reads SLACK_BOT_TOKEN (the README's name)
    on its own, and the client we hand it carries that very token, so nothing is unused."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != warning_client_prioritized_and_token_skipped()


logging.getLogger("slack_bolt.AsyncApp").addFilter(_SameTokenTwice())


class SlackAdapter:
    """Slack in and out: events become Inbound for the relay; the relay's Outbound become posts.

    Translation is pure (adapters/slack/translate.py); every decision is the relay's. The
    adapter passes each plain message and mention on, even the `message` + `app_mention`
    pair of one post and Slack's retries: they share one dedupe key, which the relay
    claims in the persistent store, so each post is answered exactly once.
    """

    name = PLATFORM
    token_check_interval = 300.0  # seconds between auth.test checks of the bot token while connected
    _ended: asyncio.Future[Exception] | None = None  # set when Slack refuses the bridge mid-run (wait_ended)

    def __init__(
        self,
        config: SlackSettings,
        on_message: Callable[[Inbound], Awaitable[object]],
        *,
        web: web.Application | None = None,
        clock: Clock | None = None,
        serves: Serves | None = None,
        handovers: HandOvers | None = None,
        desk: AlertDesk | None = None,
        feedback: Feedback | None = None,
        prompts: PromptsFor | None = None,
        records: Records | None = None,
    ) -> None:
        """`web`: the bridge's web app (HTTP mode adds /slack/events to it); `serves`, `handovers`,
        `desk` and `feedback` are the core's answers for the slash command and the buttons; `prompts`
        the suggested prompts of the assistant view (Settings.assistant_prompts); `records` the state
        store, shared by replicas (the assistant view's thread titles)."""
        self._slack = config
        self._on_message = on_message
        self._clock = clock or SystemClock()
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
        # HTTP mode only (config validation requires its signing secret there).
        self._verifier = SignatureVerifier(config.signing_secret) if self._http and config.signing_secret else None
        self.app.use(self._accept_before_ack)
        self._bot = BotUser()
        # slack.feedback_style, until Slack refuses its feedback block once (invalid_blocks): plain buttons then.
        self._feedback_style: str = config.feedback_style
        SlackInteractions(
            self.client,
            config,
            self._bot,
            self._on_message,
            clock=self._clock,
            serves=serves,
            handovers=handovers,
            desk=desk,
            feedback=feedback,
        ).register(self.app)
        self._assistant = SlackAssistant(self.client, config, prompts, records)
        if self._assistant.enabled:
            self._assistant.register(self.app)
        self._started_at = 0.0  # wall-clock start: older questions may carry a dead run's reaction
        # Tests shorten it; readiness allows SILENT_AFTER intervals without a pong or frame.
        self.ping_interval = SOCKET_PING_INTERVAL
        self.scopes: frozenset[str] = frozenset()
        self._socket: AsyncSocketModeHandler | None = None
        self._session: aiohttp.ClientSession | None = None
        self._running = False
        self._intake = True  # False once stop_intake() ran: no new events, sends still work
        self._last_frame = 0.0  # wall-clock time of the socket's last text frame (hello, envelope)
        self._tasks: set[asyncio.Task[Any]] = set()
        if self._http:
            if web is None:
                raise ValueError("Slack HTTP mode needs the bridge's web application")
            # Added now: aiohttp freezes the router when the server starts.
            web.router.add_post(EVENTS_PATH, self._handle_http)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """auth.test (who the bot is), then Socket Mode connect or HTTP events accepted.

        Raises SlackRefused when Slack refuses a token for good, SlackError when Slack cannot
        be reached or fails otherwise (another try may work).
        """
        if self._running:
            return
        self._intake = True
        self._ended = asyncio.get_running_loop().create_future()
        # One connection pool for every Web API call: without a session slack_sdk opens a
        # new connection per call (three per answer), which dominated the bridge's CPU.
        self._session = aiohttp.ClientSession()
        self.client.session = self._session
        try:
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            await self._close_session()
            code = error_code(exc)
            if code in REFUSED_CODES:
                raise SlackRefused(f"Slack refused the bot token (auth.test: {code})") from None
            raise SlackError(f"Slack could not check the bot token (auth.test: {code})") from None
        except NETWORK_ERRORS as exc:
            await self._close_session()
            raise SlackError(f"cannot reach the Slack API at {self._slack.api_url} ({error_code(exc)})") from None
        me = self._bot.me = BotIdentity(
            user_id=str(auth.get("user_id") or ""),
            bot_id=str(auth.get("bot_id") or ""),
            team_id=str(auth.get("team_id") or ""),
        )
        self._bot.name = str(auth.get("user") or "")
        self.scopes = token_scopes(auth.headers) or frozenset()
        missing = sorted(set(required_scopes(self._slack)) - self.scopes) if self.scopes else []
        if missing:
            log.warning("the Slack bot token lacks scope(s) %s; `check` explains what each is for", ", ".join(missing))
        self._seed_authorization(auth)
        if not self._http:
            try:
                await self._connect_socket()
            except BaseException:
                await self._close_session()
                raise
        self._running = True
        self._started_at = self._clock.time()
        log.info(
            "slack connected: team=%s bot_user=%s transport=%s", me.team_id, me.user_id, self._slack.transport
        )

    @property
    def me(self) -> BotIdentity | None:
        """Who the bot is, once started."""
        return self._bot.me

    def _seed_authorization(self, auth: Any) -> None:
        # Bolt calls auth.test lazily on the first event; hand it ours so the first event
        # after a restart cannot fail on a transient auth.test error.
        for middleware in getattr(self.app, "_async_middleware_list", []):
            if isinstance(middleware, AsyncSingleTeamAuthorization):
                middleware.auth_test_result = auth

    async def _connect_socket(self) -> None:
        handler = AsyncSocketModeHandler(self.app, self._slack.app_token, ping_interval=self.ping_interval)
        handler.client.on_message_listeners.append(self._heard)
        issue_url = handler.client.issue_new_wss_url
        ended = self._ended

        async def issue_url_watched() -> str:
            # The SDK asks for a new URL on each reconnect and retries a refusal forever, so a
            # revoked app token would leave the socket down for good, unseen: tell wait_ended().
            try:
                return await issue_url()
            except SlackApiError as exc:
                code = error_code(exc)
                if code in REFUSED_CODES and ended is not None and not ended.done():
                    ended.set_result(SlackRefused(f"Slack refused the app token (apps.connections.open: {code})"))
                raise

        try:
            # Asked here, not inside connect(): connect() retries a refused app token forever.
            handler.client.wss_uri = await issue_url()
            # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that comes
            # in the same loop turn as the connect completing (a SIGTERM during start-up).
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await handler.connect_async()
        except SlackApiError as exc:
            await handler.close_async()
            code = error_code(exc)
            if code in REFUSED_CODES:
                raise SlackRefused(f"Slack refused the app token (apps.connections.open: {code})") from None
            raise SlackError(f"Slack did not open a Socket Mode connection (apps.connections.open: {code})") from None
        except (*NETWORK_ERRORS, asyncio.CancelledError) as exc:
            await handler.close_async()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SlackError(f"could not open the Slack Socket Mode connection ({error_code(exc)})") from None
        handler.client.issue_new_wss_url = issue_url_watched  # type: ignore[method-assign]
        self._last_frame = time.time()
        self._socket = handler

    async def _heard(self, message: Any) -> None:
        # Wall-clock, like the SDK's last_ping_pong_time, so the two compare.
        self._last_frame = time.time()

    async def wait_ended(self) -> Exception:
        """Return when Slack refuses the bridge mid-run; Slack's clients heal every other drop themselves.

        The app token is watched on each Socket Mode reconnect (see _connect_socket). The bot
        token is checked with auth.test every `token_check_interval`: a revoked one would
        otherwise leave a bot that neither hears nor answers behind a healthy-looking process.
        """
        ended = self._ended
        if ended is None:
            raise RuntimeError("the Slack adapter was not started")
        while True:
            nap = asyncio.ensure_future(self._clock.sleep(self.token_check_interval))
            try:
                either: set[asyncio.Future[Any]] = {ended, nap}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                nap.cancel()
            if ended.done():
                return ended.result()
            refusal = await self._bot_token_refused()
            if refusal is not None:
                return refusal

    async def _bot_token_refused(self) -> SlackRefused | None:
        try:
            await self.client.auth_test()
        except SlackApiError as exc:
            code = error_code(exc)
            if code in REFUSED_CODES:
                return SlackRefused(f"Slack refused the bot token (auth.test: {code})")
            log.info("slack: the bot token check failed (%s); checking again later", code)
        except NETWORK_ERRORS as exc:
            log.info("slack: the bot token check failed (%s); checking again later", error_code(exc))
        return None

    async def stop_intake(self) -> None:
        """Take no new events while answers in flight finish; posting keeps working.

        Socket Mode: the socket is closed, so Slack redelivers unacknowledged events to the
        next run. HTTP: new requests get 503 and Slack retries them.
        """
        self._intake = False
        await self._close_socket()
        log.info("slack: no longer taking events")

    async def _close_socket(self) -> None:
        handler, self._socket = self._socket, None
        if handler is not None:
            try:
                await handler.close_async()
            except Exception:
                log.warning("closing the Slack socket failed", exc_info=True)

    def readiness(self) -> str | None:
        """None when Slack can reach us: HTTP once started; a socket only while it keeps talking."""
        if not self._running:
            return "not connected"
        if not self._intake:
            return "shutting down: not taking Slack events"
        if self._http:
            return None
        handler = self._socket
        if handler is None:
            return "the Socket Mode connection is closed"
        client = handler.client
        session = client.current_session
        if client.closed or session is None or session.closed or getattr(client, "stale", False):
            return "the Socket Mode connection is down; reconnecting"
        # A half-open connection looks connected: only a recent pong or frame proves it live.
        heard = max(client.last_ping_pong_time or 0.0, self._last_frame)
        silent = time.time() - heard
        if silent > SILENT_AFTER * self.ping_interval:
            return f"the Slack socket has been silent for {silent:.0f} s (no pong, no events)"
        return None

    async def stop(self) -> None:
        """Close the socket and finish pending feedback clean-up; safe to call twice or unstarted."""
        self._running = False
        await self._close_socket()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=SIGNAL_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._close_session()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        self.client.session = None
        if session is not None:
            await session.close()

    # --- inbound -------------------------------------------------------------------------------

    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        if not self._running or not self._intake:
            # Not started yet, or shutting down: Slack retries, and the retry is answered.
            return web.Response(status=503, text="not ready")
        try:
            raw = await read_body(request, limit=MAX_EVENT_BODY)
        except BodyTooLarge:
            return web.Response(status=413, text="too large")
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature")
        try:
            text = raw.decode("utf-8")  # Slack sends UTF-8; slack_sdk's verifier decodes it too
        except UnicodeDecodeError:
            return web.Response(status=400 if signature else 401, text="not a Slack request")
        # Verified before anything parses the body: Bolt's parser raises on junk (a 500 with a
        # traceback), and an unsigned request must learn nothing but 401 from us.
        if self._verifier is None or not timestamp.isdigit() or not self._verifier.is_valid(text, timestamp, signature):
            return web.Response(status=401, text="invalid signature")
        try:
            headers: dict[str, str | Sequence[str]] = {name: request.headers.getall(name) for name in request.headers}
            bolt_request = AsyncBoltRequest(body=text, query=request.query_string, headers=headers)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # JSON and UTF-8 errors are ValueErrors;
            # a body that parses to something other than an object (`[]`, `null`) fails on .get()
            log.warning("slack: a signed request to %s was not an event (%s); refused", EVENTS_PATH, type(exc).__name__)
            return web.Response(status=400, text="malformed body")
        if not isinstance(bolt_request.body, dict):
            return web.Response(status=400, text="malformed body")
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))

    async def _accept_before_ack(
        self, req: AsyncBoltRequest, next: Callable[[], Awaitable[BoltResponse]]  # Bolt's name for it
    ) -> BoltResponse:
        """Messages and mentions are stored as jobs before Bolt acknowledges them.

        Slack never redelivers an acknowledged event, and Bolt acks before it runs
        listeners; so this middleware does the (sub-millisecond) store write first and
        answers the request itself. Everything else goes on to Bolt's listeners.
        """
        body = req.body
        event = body.get("event") if body.get("type") == "event_callback" else None
        if not isinstance(event, dict) or event.get("type") not in ("message", "app_mention"):
            return await next()
        me = self._bot.me
        if me is None:
            return BoltResponse(status=503, body="starting")  # not acknowledged: Slack retries it
        inbound = event_to_inbound(body, me)
        if inbound is None:
            log.debug("slack %s/%s event not passed on", event.get("type"), event.get("subtype"))
            return BoltResponse(status=200, body="")
        if self._assistant.enabled and inbound.is_dm and inbound.in_thread:
            inbound = dataclasses.replace(inbound, own_thread=True)  # an assistant thread: a chat of its own
        retry = (req.headers.get("x-slack-retry-num") or ["0"])[0]
        if retry.isdigit() and int(retry) > 0:
            # Not dropped: after a restart the retry may be the only delivery. The relay dedupes.
            reason = (req.headers.get("x-slack-retry-reason") or [""])[0]
            log.info("slack retry %s (%s) of %s", retry, reason or "?", inbound.dedupe_key)
        try:
            await self._on_message(inbound)
        except StoreError as exc:
            log.error("slack: %s not stored, so not acknowledged (Slack retries it): %s", inbound.dedupe_key, exc)
            return BoltResponse(status=503, body="state store unavailable")
        if self._assistant.enabled and inbound.is_dm and inbound.in_thread:
            self._spawn(self._assistant.name_thread(inbound))  # a courtesy, after the job is safe
        return BoltResponse(status=200, body="")

    # --- outbound ------------------------------------------------------------------------------

    def render(self, markdown: str) -> list[str]:
        """Slack mrkdwn parts (adapters/slack/formatting.py)."""
        return to_slack(markdown)

    async def send(self, outbound: Outbound) -> list[str]:
        """chat.postMessage for each part in order, in the conversation's thread; returns the ts list.

        With `human_chatbot`, the last part carries the "Talk to a human" button, with `feedback_job`
        👍 / 👎 (adapters/slack/feedback.py). Notices the
        outbox sends (no `reply_to`) go to the conversation's thread, or the DM itself.

        With a `delivery`, each part carries (key, part, parts) in its message metadata; with
        `look_first`, the parts an earlier attempt already posted are found by that mark and
        only the others are posted. Raises SlackPostRefused (a PermanentSendError) when Slack
        refuses for good, another SlackError when trying later may work.
        """
        conversation = outbound.conversation
        thread = conversation.thread or outbound.question_thread
        parts = list(outbound.parts)
        chatbot = outbound.human_chatbot if parts else ""
        feedback = outbound.feedback_job if parts else ""  # 👍 / 👎 under the last part
        if (chatbot or feedback) and len(parts[-1]) > SECTION_LIMIT:
            # A section holds less than a plain message: the last part is split once more.
            parts[-1:] = split_text(parts[-1], SECTION_LIMIT)
        delivery = outbound.delivery
        posted: dict[int, str] = {}
        if delivery is not None and delivery.look_first and parts:
            posted = await self._find_parts(conversation.channel, thread, delivery, len(parts))
        for number, part in enumerate(parts, start=1):
            if number in posted:
                continue
            extra: dict[str, Any] = {}
            if (chatbot or feedback) and number == len(parts):
                # `text` stays the fallback
                extra["blocks"] = answer_blocks(
                    part, conversation, chatbot=chatbot, feedback_job=feedback, style=self._feedback_style
                )
            if delivery is not None:
                extra["metadata"] = part_metadata(delivery.key, number, len(parts))
            statuses = self._assistant.statuses_up(conversation.channel, thread) if thread else ()
            try:
                response = await self._post_part(conversation, part, thread, extra, chatbot=chatbot, feedback=feedback)
            except (SlackApiError, *NETWORK_ERRORS) as exc:
                raise send_error(
                    f"chat.postMessage to {conversation.channel} failed on part {number} of "
                    f"{len(parts)} ({error_code(exc)})",
                    exc,
                ) from None
            posted[number] = str(response.get("ts") or "")
            self._assistant.posted(statuses)  # Slack cleared the statuses that were up there
        return [posted[number] for number in range(1, len(parts) + 1)]

    async def _post_part(
        self, conversation: Conversation, part: str, thread: str, extra: dict[str, Any], *, chatbot: str, feedback: str
    ) -> Any:
        """chat.postMessage of one part; where Slack refuses its own feedback block, once more with plain buttons."""

        async def post() -> Any:
            return await self.client.chat_postMessage(
                channel=conversation.channel,
                text=part,  # already Slack mrkdwn, escaped and split by the relay
                thread_ts=thread or None,
                unfurl_links=False,
                unfurl_media=False,
                **extra,
            )

        try:
            return await post()
        except SlackApiError as exc:
            if not (feedback and self._feedback_style != PLAIN_BUTTONS and error_code(exc) == "invalid_blocks"):
                raise
        # Plain 👍 / 👎 buttons from now on: the answer must not be lost for the sake of its buttons.
        log.warning("slack refused the feedback_buttons block (invalid_blocks); using plain buttons from now on")
        self._feedback_style = PLAIN_BUTTONS
        extra["blocks"] = answer_blocks(part, conversation, chatbot=chatbot, feedback_job=feedback, style=PLAIN_BUTTONS)
        return await post()

    async def _find_parts(self, channel: str, thread: str, delivery: Delivery, count: int) -> dict[int, str]:
        """The parts of `delivery` already in Slack: part number -> ts. Raises when Slack cannot be asked."""
        found: dict[int, str] = {}

        def visit(message: dict[str, Any]) -> bool:
            mark = part_mark(message)
            ts = str(message.get("ts") or "")
            if mark is None or mark.key != delivery.key or not ts:
                return False
            if mark.parts != count or not 1 <= mark.part <= count:
                # Split differently then (another config): matching by number would garble the answer.
                log.warning(
                    "slack: an earlier post of %s is part %d of %d, not of %d; ignored",
                    delivery.key,
                    mark.part,
                    mark.parts,
                    count,
                )
                return False
            if mark.part not in found or float(ts) < float(found[mark.part]):
                found[mark.part] = ts  # posted twice (before this fix): the first one stands
            return len(found) == count

        await self._scan(channel, thread=thread, since=delivery.since, what="the parts of an answer", visit=visit)
        if found:
            log.info(
                "slack: %d of %d part(s) of %s were already posted; posting the rest", len(found), count, delivery.key
            )
        return found

    async def tell_refused(self, inbound: Inbound, refusal: PermanentSendError) -> bool:
        """An ephemeral note to the asker, in the question's thread, saying why the answer is not there."""
        code = refusal.code if isinstance(refusal, SlackPostRefused) else ""
        try:
            await self.client.chat_postEphemeral(
                channel=inbound.channel,
                user=inbound.author_id,
                text=refusal_notice(code, self._bot.name),
                thread_ts=inbound.thread or None,
            )
        except (SlackApiError, *NETWORK_ERRORS) as exc:
            log.info(
                "slack: could not tell %s why the answer is missing either (%s)", inbound.author_id, error_code(exc)
            )
            return False
        return True

    @asynccontextmanager
    async def working(self, inbound: Inbound) -> AsyncIterator[None]:
        """Slack's loading status ("is thinking…") in the answer's thread, else a reaction on the post.

        The status is one call: Slack clears it when the answer is posted in its thread. The
        reaction is two (add, remove) and runs in the background: a rate-limited
        reactions.add must never delay the answer. See SlackAssistant.status_place for where.
        """
        place = self._assistant.status_place(inbound)
        if place is not None:
            async with self._status_working(inbound, place):
                yield
            return
        shown = self._spawn(self._show_working(inbound))
        try:
            yield
        finally:
            self._spawn(self._clear_working(inbound, shown))

    @asynccontextmanager
    async def _status_working(self, inbound: Inbound, place: tuple[str, str]) -> AsyncIterator[None]:
        watch = self._assistant.watch(place)
        shown: asyncio.Task[Shown] | None = None
        try:
            # In the background, as the reaction: the question is asked at once. A status Slack
            # takes only after the answer's post would stay (two minutes): the watch tells, and
            # then it is cleared here.
            shown = self._spawn(self._assistant.show(inbound, watch))
            yield
        finally:
            if shown is None:
                self._assistant.unwatch(watch)
            else:
                self._spawn(self._clear_status(inbound, watch, shown))

    async def _clear_status(self, inbound: Inbound, watch: StatusWatch, shown: asyncio.Task[Shown]) -> None:
        try:
            signal = await settled(shown)
            if signal is Shown.REACTION:
                await self._remove_reaction(inbound)
            elif signal is Shown.STATUS:
                if not watch.replied:
                    await self._assistant.clear(watch.place)
                if self._asked_before_start(inbound):
                    await self._remove_reaction(inbound)  # a run that died may have left its reaction
        finally:
            self._assistant.unwatch(watch)

    def _asked_before_start(self, inbound: Inbound) -> bool:
        try:
            return float(inbound.message_id) < self._started_at
        except ValueError:
            return False  # not a message ts ("cmd-..."): nothing to react to

    async def _remove_reaction(self, inbound: Inbound) -> None:
        remove = self.client.reactions_remove(
            channel=inbound.channel, timestamp=inbound.message_id, name=self._slack.reaction
        )
        await quietly("reactions.remove", remove, harmless=("no_reaction", "message_not_found"))

    async def _show_working(self, inbound: Inbound) -> None:
        add = self.client.reactions_add(
            channel=inbound.channel, timestamp=inbound.message_id, name=self._slack.reaction
        )
        await quietly("reactions.add", add, harmless=("already_reacted",))
        if self._legacy_dm_status(inbound):
            await quietly(
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
        await quietly("reactions.remove", remove, harmless=("no_reaction", "message_not_found"))
        if self._legacy_dm_status(inbound):
            await quietly(
                "assistant.threads.setStatus",
                self.client.assistant_threads_setStatus(
                    channel_id=inbound.channel, thread_ts=inbound.thread or inbound.message_id, status=""
                ),
            )

    def _legacy_dm_status(self, inbound: Inbound) -> bool:
        # With slack.assistant off, a DM also shows the status (set and cleared) when the token allows it.
        return inbound.is_dm and "assistant:write" in self.scopes and not self._assistant.enabled

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- alerts (AlertPoster) ------------------------------------------------------------------

    def render_card(self, alert: Alert, mentions: tuple[str, ...]) -> dict[str, Any]:
        """A Block Kit card (adapters/slack/cards.py)."""
        return slack_card(alert, mentions)

    async def post_alert(self, channel: str, card: dict[str, Any], *, thread: str, broadcast: bool, key: str) -> str:
        """chat.postMessage of a card, with the delivery key in the message metadata; returns its ts.

        The card's own mentions (the configured on-call ids) are the only pings. Raises on
        failure: the outbox retries with backoff.
        """
        try:
            response = await self.client.chat_postMessage(
                channel=channel,
                text=card["text"],
                blocks=card["blocks"],
                thread_ts=thread or None,
                reply_broadcast=bool(broadcast and thread),
                unfurl_links=False,
                unfurl_media=False,
                metadata=alert_metadata(key),
            )
        except (SlackApiError, *NETWORK_ERRORS) as exc:
            code = error_code(exc)
            hint = (
                f"; invite the bot with /invite @{self._bot.name or 'InsiteChat'}" if code == "not_in_channel" else ""
            )
            raise SlackError(f"posting an alert to {channel} failed ({code}{hint})") from None
        ts = str(response.get("ts") or "")
        if not ts:
            raise SlackError(f"posting an alert to {channel}: Slack answered without a message ts")
        return ts

    async def find_alert(self, channel: str, key: str, *, since: float, thread: str) -> str | None:
        """The ts of a card posted with `key` since `since`, found by its metadata; None if there is none.

        Searches the thread or the channel (see _scan); raises when Slack cannot be asked,
        so the outbox waits instead of guessing.
        """
        found: list[str] = []

        def visit(message: dict[str, Any]) -> bool:
            if alert_key(message) != key:
                return False
            found.append(str(message.get("ts") or ""))
            return True

        await self._scan(channel, thread=thread, since=since, what="an alert", visit=visit)
        return (found[0] or None) if found else None

    async def _scan(
        self, channel: str, *, thread: str, since: float, what: str, visit: Callable[[dict[str, Any]], bool]
    ) -> None:
        """Show `visit` the bot's own messages posted since `since`, metadata included, until it returns True.

        In the thread (conversations.replies on its root) when there is one, else in the
        channel or DM itself (conversations.history); at most FIND_PAGES pages, after which
        what was not found counts as not posted. Raises when Slack cannot be asked (a
        SlackPostRefused when it never will be), so the outbox waits instead of guessing.
        """
        oldest = f"{max(0.0, since - 60):.6f}"  # a minute of slack for clock skew
        cursor: str | None = None
        for _ in range(FIND_PAGES):
            args: dict[str, Any] = {
                "channel": channel,
                "oldest": oldest,
                "include_all_metadata": True,
                "limit": FIND_PAGE_SIZE,
                "cursor": cursor,
            }
            try:
                if thread:
                    response = await self.client.conversations_replies(ts=thread, **args)
                else:
                    response = await self.client.conversations_history(**args)
            except (SlackApiError, *NETWORK_ERRORS) as exc:
                if thread and isinstance(exc, SlackApiError) and error_code(exc) == "thread_not_found":
                    return  # the thread's root is gone, and so is anything posted in it
                raise send_error(f"looking for {what} in {channel} failed ({error_code(exc)})", exc) from None
            for message in response.get("messages") or []:
                if self._posted_by_me(message) and visit(message):
                    return
            cursor = str((response.get("response_metadata") or {}).get("next_cursor") or "") or None
            if not cursor:
                return
        log.warning("search for %s in %s stopped after %d pages; posting again", what, channel, FIND_PAGES)

    def _posted_by_me(self, message: dict[str, Any]) -> bool:
        bot_id = str(message.get("bot_id") or "")
        me = self._bot.me
        return not bot_id or me is None or not me.bot_id or bot_id == me.bot_id

    async def update_alert(self, channel: str, reference: str, card: dict[str, Any]) -> None:
        """chat.update of a posted card (claimed, resolved): same place, new content, buttons as the state allows."""
        try:
            await self.client.chat_update(channel=channel, ts=reference, text=card["text"], blocks=card["blocks"])
        except SlackApiError as exc:
            code = error_code(exc)
            if code == "message_not_found":
                log.info("alert card %s in %s was deleted; nothing to update", reference, channel)
                return
            raise SlackError(f"updating the alert card in {channel} failed ({code})") from None
        except NETWORK_ERRORS as exc:
            raise SlackError(f"updating the alert card in {channel} failed ({error_code(exc)})") from None

    # --- the weekly digest (PostsDigest) -----------------------------------------------------------

    async def post_digest(self, channel: str, report: Report, charts: Sequence[Chart], *, key: str) -> str:
        """The report digest as Block Kit (adapters/slack/digest.py); returns its ts."""
        return await SlackDigests(self.client).post(channel, report, charts, key=key)

    async def find_digest(self, channel: str, key: str, *, since: float) -> str | None:
        """The ts of a digest posted with `key` since `since`, found by its metadata."""
        found: list[str] = []

        def visit(message: dict[str, Any]) -> bool:
            if digest_key(message) != key:
                return False
            found.append(str(message.get("ts") or ""))
            return True

        await self._scan(channel, thread="", since=since, what="the report digest", visit=visit)
        return (found[0] or None) if found else None

    async def permalink(self, conversation: Conversation) -> str | None:
        """A link to the conversation's thread, for alert cards; None for a DM (nobody else can open it)."""
        if not conversation.thread:
            return None
        try:
            response = await self.client.chat_getPermalink(channel=conversation.channel, message_ts=conversation.thread)
        except (SlackApiError, *NETWORK_ERRORS) as exc:
            raise SlackError(f"chat.getPermalink in {conversation.channel} failed ({error_code(exc)})") from None
        return str(response.get("permalink") or "") or None
