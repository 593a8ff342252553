"""Async InsiteChat API client: typed results, typed errors, retries within a deadline, a circuit breaker.

Errors (every one has ``.status``, the HTTP status or None; no text ever holds the API key)::

    InsiteChatError            base; .status, .detail (the service's own words, readable)
     ├─ Unauthorized           401: missing, invalid or revoked key
     ├─ NotFound               404: no such chatbot, or another account's
     ├─ BadRequest             400 / 422: malformed body (a list of {loc, msg, type} made readable)
     ├─ RateLimited            429 "API rate limit exceeded...": .retry_after seconds
     ├─ QuotaExhausted         429 with any other detail: the monthly message quota; .retry_in seconds
     ├─ ServerError            5xx (or a 2xx whose body is not what the API promises)
     └─ Unavailable            network error, timeout, open circuit, shared rate budget (Redis)
                               unreachable: .reason, .request_sent

Re-sending. A GET is retried after any 5xx or network error, with backoff, until the deadline.
A chat call is not idempotent (it spends quota and adds a turn to the session's 10-turn
memory), so it is re-sent at most once in total, and only when the service cannot have
processed it::

    chat failure                                     re-sent?
    connect error, connect timeout, pool timeout     once: no byte of the request left
    503 Service Unavailable                          once: refused before processing
    500 Internal Server Error                        no: it may have failed after processing
    502 Bad Gateway, 504 Gateway Timeout             no: the gateway lost or timed out on the answer;
                                                     the service may have processed the message
    any other 5xx, a 2xx with an unusable body       no
    read timeout, write error, server disconnected   no: the request may have been received
    429 rate limit                                   waited out within the deadline, not counted as
                                                     the re-send (the service refused the request)
    429 quota, 4xx                                   never

After the one re-send the error is raised (ServerError or Unavailable) for the caller to report.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random as _random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import quote

import httpx

from bridge import __version__, metrics
from bridge.clock import Clock, SystemClock
from bridge.http_pool import AiohttpTransport, environment_proxy
from bridge.limiter import Grant, SlidingWindowLimiter
from bridge.store import StoreError

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 4000
# Requests in flight per key, and the connections kept for them; the real limit (60 a
# minute) keeps use far below this anyway.
MAX_CONNECTIONS = 64
# The one 429 detail that means "slow down" rather than "the monthly quota is gone".
_RATE_LIMIT_MARKER = "rate limit"
# Failures that happen before any byte of the request left: safe to re-send even a POST.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# 503 is the one 5xx that says the request was refused, not processed. 500 may come after the
# message was spent; 502 and 504 mean a gateway lost the answer, not that the service never ran.
_REFUSED_UNPROCESSED = 503
# A chat call that cannot have been processed is re-sent this many times in total, whatever
# failed: a service that keeps refusing is down, and the user should hear so.
_MAX_CHAT_RESENDS = 1
_MAX_DETAIL_CHARS = 300
_MAX_CACHED_URLS = 256

T = TypeVar("T")


# --- errors -------------------------------------------------------------------------------


class InsiteChatError(Exception):
    """Any failure talking to InsiteChat."""

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class Unauthorized(InsiteChatError):
    """401: the key is missing, invalid or revoked."""


class NotFound(InsiteChatError):
    """404: no such chatbot, or not one of this key's account."""


class BadRequest(InsiteChatError):
    """400 or 422: the service refused the request body."""


class RateLimited(InsiteChatError):
    """429 rate limit: too many requests for this key in the last minute."""

    def __init__(self, message: str, *, retry_after: float, detail: str = "") -> None:
        super().__init__(message, status=429, detail=detail)
        self.retry_after = retry_after


class QuotaExhausted(InsiteChatError):
    """429 for anything but the rate limit: the plan's monthly message quota is spent.

    `retry_in`: seconds until the client asks InsiteChat again (0 while a trial call is deciding).
    """

    def __init__(self, detail: str, *, retry_in: float) -> None:
        super().__init__(f"InsiteChat monthly message quota exhausted: {detail}", status=429, detail=detail)
        self.retry_in = retry_in


class ServerError(InsiteChatError):
    """5xx, or a success whose body is unusable."""


class Unavailable(InsiteChatError):
    """The service could not be reached or did not answer in time, or the circuit is open."""

    def __init__(self, reason: str, *, request_sent: bool = False) -> None:
        super().__init__(f"InsiteChat unavailable: {reason}")
        self.reason = reason
        # True when the request may have reached the service (a chat may have been spent).
        self.request_sent = request_sent


# --- results ------------------------------------------------------------------------------


def _text(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key)
    if value is None:
        return default
    return value if isinstance(value, str) else str(value)


def _flag(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key)
    return value if isinstance(value, bool) else default


def _count(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None


def _timestamp(data: Mapping[str, Any], key: str) -> datetime | None:
    value = data.get(key)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)  # 3.11 takes both "Z" and "+00:00" with microseconds
    except ValueError:
        return None


@dataclass(frozen=True)
class Chatbot:
    """One chatbot of the account, as listed."""

    id: str
    name: str
    slug: str
    provider: str  # open set: gemini, chatgpt, ollama, ...
    is_active: bool  # False: paused by its owner
    created_at: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(**_chatbot_fields(data))


def _chatbot_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": _text(data, "id"),
        "name": _text(data, "name"),
        "slug": _text(data, "slug"),
        "provider": _text(data, "provider"),
        "is_active": _flag(data, "is_active", True),
        "created_at": _timestamp(data, "created_at"),
    }


@dataclass(frozen=True)
class ChatbotDetail(Chatbot):
    """One chatbot with its prompt settings."""

    system_prompt: str
    fallback_message: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            **_chatbot_fields(data),
            system_prompt=_text(data, "system_prompt"),
            fallback_message=_text(data, "fallback_message"),
        )


@dataclass(frozen=True)
class Source:
    """One training source of a chatbot."""

    id: str
    type: str  # open set: url, file, text, youtube, notion, ...
    title: str
    url: str  # "" for non-URL types
    status: str  # pending | crawling | processing | done | failed
    page_count: int | None
    created_at: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            id=_text(data, "id"),
            type=_text(data, "type"),
            title=_text(data, "title"),
            url=_text(data, "url"),
            status=_text(data, "status"),
            page_count=_count(data, "page_count"),
            created_at=_timestamp(data, "created_at"),
        )


# --- policy and circuit ---------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries, and when the client stops trying at all."""

    deadline: float = 120.0  # overall budget per call, seconds
    base_backoff: float = 0.5  # jittered exponential backoff for connect errors / 5xx
    max_backoff: float = 15.0
    rate_limit_wait: float = 60.0  # when a 429 has no Retry-After
    # After QuotaExhausted chat is refused here, without a request, this long; then one trial call
    # asks again (a raised plan works within minutes, and a spent one costs one 429 per pause).
    quota_cooldown: float = 300.0
    failure_threshold: int = 5  # consecutive failures that open the circuit
    circuit_cooldown: float = 30.0


class _TrialInFlight(Unavailable):
    """Half-open, and another call is the trial: wait for its verdict rather than refuse."""


class _Circuit:
    """Consecutive 5xx / network failures open it; after a cooldown one trial call may pass.

    Calls that come while it is open wait for that trial (`wait_turn`), when it can come before
    their deadline, instead of being told "unreachable" by a service that is back. A failure of
    a call sent before the circuit last opened or closed is stale: it neither extends nor
    reopens it (a read timeout can come a minute after the request left).
    """

    def __init__(self, clock: Clock, policy: RetryPolicy, name: str) -> None:
        self._clock = clock
        self._policy = policy
        self._name = name
        self._failures = 0
        self._tripped = False
        self._open_until = float("-inf")
        self._trial_in_flight = False
        self._changed_at = float("-inf")  # when it last opened or closed
        self._openings = 0
        self._trial_ended = asyncio.Event()
        self._quota = False  # chat paused after a quota 429, until a chat call succeeds
        self._quota_until = float("-inf")  # then one trial chat call may go out
        self._quota_trial = False
        self._quota_detail = ""

    def state(self) -> str:
        # Quota first: it outlives any outage and is what users need to hear about.
        if self._quota:
            return "quota"
        now = self._clock.monotonic()
        if self._tripped:
            return "open" if now < self._open_until else "half-open"
        return "closed"

    def check(self, *, chat: bool) -> None:
        """Raise at once, without network, if this call may not go out now."""
        if chat and self._quota and (self._quota_trial or self._clock.monotonic() < self._quota_until):
            retry_in = 0.0 if self._quota_trial else self._quota_until - self._clock.monotonic()
            raise QuotaExhausted(self._quota_detail, retry_in=retry_in)
        if not self._tripped:
            return
        if self._clock.monotonic() < self._open_until:
            raise Unavailable("circuit open")
        if self._trial_in_flight:
            raise _TrialInFlight("circuit open (a trial call is in flight)")

    async def wait_turn(self, deadline: float) -> None:
        """While open, wait for the cooldown's end; while a trial is in flight, for its verdict.

        Returns at once when the wait would outlast `deadline` (check() then refuses), and
        raises Unavailable when the trial this call waited for failed.
        """
        openings = self._openings
        while self._tripped:
            if self._openings != openings:
                raise Unavailable("circuit open (the trial call failed)")
            now = self._clock.monotonic()
            if now < self._open_until:
                if self._open_until > deadline:
                    return
                await self._clock.sleep(self._open_until - now)
            elif self._trial_in_flight:
                if now >= deadline:
                    return
                await self._trial_ended.wait()  # the trial's own timeout bounds this
            else:
                return  # half-open: this call may be the trial

    def _end_trial(self) -> None:
        self._trial_in_flight = False
        self._trial_ended.set()
        self._trial_ended = asyncio.Event()

    def admit(self, *, chat: bool) -> bool:
        """check(), and claim the single trial call when half-open or after a quota pause; True if claimed."""
        self.check(chat=chat)
        trial = False
        if chat and self._quota:
            self._quota_trial = trial = True
            logger.info("[%s] InsiteChat quota pause over: one trial chat call asks again", self._name)
        if self._tripped:
            self._trial_in_flight = trial = True
            logger.info("[%s] InsiteChat circuit half-open: sending one trial call", self._name)
        return trial

    def release_trial(self) -> None:
        # A trial that ended without a verdict (cancelled, a 429) must not block the circuit forever.
        if self._trial_in_flight:
            self._end_trial()
        self._quota_trial = False

    @property
    def quota_paused(self) -> bool:
        """Chat is refused here after a quota 429 (the next trial is not due yet)."""
        return self._quota and not self._quota_trial and self._clock.monotonic() < self._quota_until

    def quota_try_now(self) -> None:
        """Someone else saw that InsiteChat may take chat again (`check --live`): the next call is a trial."""
        if self.quota_paused:
            logger.info("[%s] InsiteChat quota pause ended from outside: the next message asks again", self._name)
            self._quota_until = self._clock.monotonic()

    def record_chat_success(self) -> bool:
        """A chat call was answered: the quota is not spent (any more). True if that ends a pause."""
        ended, self._quota = self._quota, False
        self._quota_trial = False
        if ended:
            logger.info("[%s] InsiteChat takes chat again: the quota pause is over", self._name)
        return ended

    @property
    def closed(self) -> bool:
        return not self._tripped

    def record_success(self) -> None:
        if self._tripped:
            logger.info("[%s] InsiteChat circuit closed: the service answers again", self._name)
            self._changed_at = self._clock.monotonic()
        self._failures = 0
        self._tripped = False
        self._end_trial()

    def record_failure(self, sent_at: float) -> None:
        if sent_at < self._changed_at:
            return  # sent before the circuit last opened or closed: says nothing about now
        self._failures += 1
        if self._trial_in_flight or self._failures >= self._policy.failure_threshold:
            self._tripped = True
            self._openings += 1
            self._changed_at = self._clock.monotonic()
            self._open_until = self._changed_at + self._policy.circuit_cooldown
            self._end_trial()
            logger.warning(
                "[%s] InsiteChat circuit open for %.0fs after %d consecutive failures",
                self._name,
                self._policy.circuit_cooldown,
                self._failures,
            )

    def trip_quota(self, detail: str) -> None:
        self._quota = True
        self._quota_trial = False
        self._quota_until = self._clock.monotonic() + self._policy.quota_cooldown
        self._quota_detail = detail
        logger.error(
            "[%s] InsiteChat monthly message quota exhausted (%s); chat paused for %.0fs, then one trial call",
            self._name,
            detail,
            self._policy.quota_cooldown,
        )


# --- the quota pause, where other processes see it -----------------------------------------


class QuotaMark(Protocol):
    """A quota pause written outside the process: `check --live` ends it for every process at once.

    Each process keeps its own pause (it learns the quota from its own 429 and asks again on
    its own); the mark only carries "the key works again, ask now" from `check --live` to them.
    """

    async def set(self) -> None:
        """A process paused chat after a quota 429."""

    async def is_set(self) -> bool:
        """False once `check --live` cleared it (or the pause ended elsewhere)."""

    async def clear(self) -> bool:
        """End the pause for every process; True if there was one."""

    async def aclose(self) -> None:
        """Release what the mark holds."""


class FileQuotaMark:
    """The mark as a file beside the SQLite state (one bridge per file, `check --live` on the same host)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def set(self) -> None:
        self.path.write_text("paused after a quota 429; `insitechat-bridge check --live` clears it\n")

    async def is_set(self) -> bool:
        return self.path.exists()

    async def clear(self) -> bool:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    async def aclose(self) -> None:
        pass


class RedisQuotaMark:
    """The mark as a Redis key beside the shared state, seen by every replica."""

    KEEP = 7 * 24 * 3600  # a mark nobody clears (a key no longer used) goes by itself

    def __init__(self, url: str, key: str) -> None:
        from redis.asyncio import Redis  # needed only with a Redis state

        self.key = key
        self._redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def set(self) -> None:
        await self._redis.set(self.key, "1", ex=self.KEEP)

    async def is_set(self) -> bool:
        return bool(await self._redis.exists(self.key))

    async def clear(self) -> bool:
        return bool(await self._redis.delete(self.key))

    async def aclose(self) -> None:
        await self._redis.aclose()


# --- client -------------------------------------------------------------------------------


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: the API authenticates with the key, never with cookies."""

    def extract_cookies(self, response: httpx.Response) -> None:
        # httpx wraps every response and its request in urllib objects for the stdlib jar
        # before looking for a Set-Cookie header: 7% of the client's CPU per request.
        pass


class _CookielessClient(httpx.AsyncClient):
    """httpx's client with _NoCookies: a Set-Cookie (say, a load balancer's) is never sent back."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        pass  # nothing sets cookies on this client; any would be dropped, as every Set-Cookie is


class InsiteChatClient:
    """One API key's view of InsiteChat. Share one per key: its limiter and circuit are per key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        limiter: SlidingWindowLimiter | None = None,
        clock: Clock | None = None,
        policy: RetryPolicy | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        random: Callable[[], float] | None = None,
        name: str = "default",
        quota_mark: QuotaMark | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("the InsiteChat API key is empty")
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._limiter = limiter
        self._clock: Clock = clock or SystemClock()
        self._policy = policy or RetryPolicy()
        self._random = random or _random.random
        self._name = name
        self._circuit = _Circuit(self._clock, self._policy, name)
        self._quota_mark = quota_mark
        self._quota_news = False  # a quota 429 came in: the next _call step writes the mark
        self._http = _CookielessClient(
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": f"insitechat-bridge/{__version__}",
            },
            # A dead host should not eat half the deadline before the first retry.
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
            # aiohttp's pool under httpx's client: half the CPU of httpcore's per request
            # (bridge.http_pool). With a proxy in the environment, httpx's own transport and
            # pool (the limits above), which apply it: a transport given here would not.
            transport=transport if transport is not None or environment_proxy(base_url) else AiohttpTransport(
                MAX_CONNECTIONS
            ),
        )
        self._in_flight = asyncio.Semaphore(MAX_CONNECTIONS)
        # Parsed once per path: httpx parses a URL given as text on every request (a third of building one).
        self._urls: dict[str, httpx.URL] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def limiter(self) -> SlidingWindowLimiter | None:
        return self._limiter

    @property
    def circuit_open(self) -> bool:
        """True while chat() would fail at once: circuit open, or quota exhausted."""
        return self.circuit_state() in ("open", "quota")

    def circuit_state(self) -> str:
        """One of closed, open, half-open (one trial call may pass) or quota (chat blocked)."""
        return self._circuit.state()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._quota_mark is not None:
            await self._quota_mark.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- endpoints ---

    async def list_chatbots(self) -> list[Chatbot]:
        data = await self._call("GET", "/v1/chatbots")
        return self._parse_list(data, Chatbot.from_json, "chatbot")

    async def get_chatbot(self, chatbot_id: str) -> ChatbotDetail:
        data = await self._call("GET", f"/v1/chatbots/{quote(chatbot_id, safe='')}")
        if not isinstance(data, dict):
            raise ServerError("InsiteChat sent a chatbot that is not a JSON object", status=200)
        detail = ChatbotDetail.from_json(data)
        return detail if detail.id else ChatbotDetail.from_json({**data, "id": chatbot_id})

    async def list_sources(self, chatbot_id: str) -> list[Source]:
        data = await self._call("GET", f"/v1/chatbots/{quote(chatbot_id, safe='')}/sources")
        return self._parse_list(data, Source.from_json, "source")

    async def chat(
        self,
        chatbot_id: str,
        message: str,
        session_id: str,
        *,
        lane: str = "",
        before_send: Callable[[], Awaitable[None]] | None = None,
        on_wait: Callable[[float], Awaitable[None]] | None = None,
    ) -> str:
        """Send one message in a session; returns the reply text (may contain Markdown).

        `before_send` is awaited each time the request is about to leave, after the wait in
        the limiter's queue: the relay records there that the call may have been received.
        `on_wait(seconds)` is awaited before a rate limit is waited out (the relay's queued notice).
        """
        if len(message) > MAX_MESSAGE_CHARS:
            logger.debug(
                "[%s] chat message cut from %d to %d characters", self._name, len(message), MAX_MESSAGE_CHARS
            )
            message = message[:MAX_MESSAGE_CHARS]
        data = await self._call(
            "POST",
            f"/v1/chatbots/{quote(chatbot_id, safe='')}/chat",
            payload={"message": message, "session_id": session_id},
            lane=lane,
            chat=True,
            before_send=before_send,
            on_wait=on_wait,
        )
        reply = data.get("response") if isinstance(data, dict) else None
        if not isinstance(reply, str):
            raise ServerError("InsiteChat chat reply has no 'response' text", status=200)
        return reply

    # --- one call: attempts, retries, deadline ---

    async def _call(
        self,
        method: str,
        path: str,
        *,
        payload: dict[str, Any] | None = None,
        lane: str = "",
        chat: bool = False,
        before_send: Callable[[], Awaitable[None]] | None = None,
        on_wait: Callable[[float], Awaitable[None]] | None = None,
    ) -> Any:
        if chat and self._circuit.quota_paused and not await self._quota_marked():
            self._circuit.quota_try_now()  # `check --live` saw the key work: this call is the trial
        deadline = self._clock.monotonic() + self._policy.deadline
        await self._circuit.wait_turn(deadline)  # a trial may be due within our deadline: no stale refusal
        self._circuit.check(chat=chat)  # fail fast, before waiting in the limiter's queue
        backoffs = 0
        while True:
            try:
                result = await self._attempt(method, path, payload, lane, chat=chat, before_send=before_send)
            except _TrialInFlight:
                # Another call became the trial while this one waited in the limiter's queue.
                await self._circuit.wait_turn(deadline)
                self._circuit.check(chat=chat)
                continue
            except InsiteChatError as error:
                if self._quota_news:
                    self._quota_news = False
                    await self._mark_quota(True)
                delay = self._retry_delay(error, backoffs, chat=chat)
                if delay is None or not self._circuit.closed:
                    raise
                if self._clock.monotonic() + delay > deadline:
                    logger.warning("[%s] %s %s: giving up, no time left to retry: %s", self._name, method, path, error)
                    raise
                if not isinstance(error, RateLimited):
                    backoffs += 1
                logger.info("[%s] %s %s failed (%s); retrying in %.1fs", self._name, method, path, error, delay)
                if on_wait is not None and isinstance(error, RateLimited):
                    await on_wait(delay)
                await self._clock.sleep(delay)
                continue
            if chat and self._circuit.record_chat_success():
                await self._mark_quota(False)
            return result

    async def _quota_marked(self) -> bool:
        """Whether the shared quota mark still stands; a mark that cannot be read stands."""
        if self._quota_mark is None:
            return True
        try:
            return await self._quota_mark.is_set()
        except Exception as exc:
            logger.warning("[%s] reading the quota pause mark failed: %s: %s", self._name, type(exc).__name__, exc)
            return True

    async def _mark_quota(self, paused: bool) -> None:
        if self._quota_mark is None:
            return
        try:
            if paused:
                await self._quota_mark.set()
            else:
                await self._quota_mark.clear()
        except Exception as exc:
            # Only `check --live` reads it: the pause itself still ends with its trial call.
            logger.warning("[%s] writing the quota pause mark failed: %s: %s", self._name, type(exc).__name__, exc)

    def _retry_delay(self, error: InsiteChatError, backoffs: int, *, chat: bool) -> float | None:
        """Seconds to wait before the next attempt, or None when this error must not be retried.

        ``backoffs`` counts the earlier retries that were not rate limits: for chat, its re-sends.
        """
        if isinstance(error, RateLimited):
            # Refused, not processed: waiting it out never spends a message twice.
            return error.retry_after
        if chat:
            # Not idempotent: re-sent only when the service cannot have processed it (module docstring).
            unprocessed = (isinstance(error, Unavailable) and not error.request_sent) or (
                isinstance(error, ServerError) and error.status == _REFUSED_UNPROCESSED
            )
            return self._backoff(backoffs) if unprocessed and backoffs < _MAX_CHAT_RESENDS else None
        if isinstance(error, Unavailable):
            return self._backoff(backoffs)
        if isinstance(error, ServerError) and error.status is not None and error.status >= 500:
            return self._backoff(backoffs)
        return None

    def _backoff(self, backoffs: int) -> float:
        growth: int = 2**backoffs  # typeshed types int ** int as Any (a negative power is a float)
        cap = min(self._policy.max_backoff, self._policy.base_backoff * growth)
        # Half fixed, half random: spreads retries without ever retrying at once.
        return cap * (0.5 + 0.5 * self._random())

    async def _attempt(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        lane: str,
        *,
        chat: bool,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        grant: Grant | None = None
        if self._limiter is not None:
            queued = self._clock.monotonic()
            # The upstream limit counts every endpoint and every retry. The slot is held until
            # the answer: the service may count the request any time before it answers.
            try:
                grant = await self._limiter.acquire(lane, hold=True)
            except StoreError as exc:
                # The budget shared with the other replicas (Redis) cannot say whether we may
                # send: nothing was sent, and the user hears "unavailable".
                raise Unavailable(str(exc)) from exc
            metrics.LIMITER_WAIT.observe(self._clock.monotonic() - queued)
        try:
            return await self._send(method, path, payload, chat=chat, before_send=before_send)
        finally:
            if grant is not None and self._limiter is not None:
                self._limiter.settle(grant)

    async def _send(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        *,
        chat: bool,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        # Checked again after the queue: the circuit may have opened while we waited (the slot is then unused).
        trial = self._circuit.admit(chat=chat)
        endpoint = _endpoint_name(path)
        try:
            # Requests beyond the connection pool wait here, in arrival order, not in the
            # transport's queue (httpcore's, for a proxy, costs more the longer it is).
            async with self._in_flight:
                if before_send is not None:
                    await before_send()
                sent = self._clock.monotonic()
                try:
                    response = await self._http.request(method, self._url(path), json=payload)
                except httpx.TransportError as exc:
                    metrics.INSITECHAT_RESPONSES.labels(endpoint, "network").inc()
                    self._circuit.record_failure(sent)
                    raise self._transport_error(exc) from exc
            metrics.INSITECHAT_SECONDS.labels(endpoint).observe(self._clock.monotonic() - sent)
            metrics.INSITECHAT_RESPONSES.labels(endpoint, str(response.status_code)).inc()
            return self._handle(response, sent)
        finally:
            if trial:
                self._circuit.release_trial()

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self._base + path)
            if len(self._urls) < _MAX_CACHED_URLS:  # paths carry chatbot ids: a few per configured bot
                self._urls[path] = url
        return url

    def _transport_error(self, exc: httpx.TransportError) -> Unavailable:
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "network error"
        reason = f"{kind} ({type(exc).__name__}: {self._redact(str(exc)) or 'no details'})"
        return Unavailable(reason, request_sent=not isinstance(exc, _NEVER_SENT))

    def _handle(self, response: httpx.Response, sent: float) -> Any:
        status = response.status_code
        if status >= 500:
            self._circuit.record_failure(sent)
            detail = self._detail(response)
            raise ServerError(f"InsiteChat server error {status}: {detail}", status=status, detail=detail)
        # Anything below 500 proves the service is up, errors included.
        self._circuit.record_success()
        if 200 <= status < 300:
            try:
                return response.json()
            except ValueError:
                raise ServerError(f"InsiteChat answered {status} with a body that is not JSON", status=status) from None
        raise self._client_error(response)

    def _client_error(self, response: httpx.Response) -> InsiteChatError:
        status = response.status_code
        detail = self._detail(response)
        if status == 401:
            return Unauthorized(f"InsiteChat rejected the API key (401): {detail}", status=status, detail=detail)
        if status == 404:
            return NotFound(f"InsiteChat: not found (404): {detail}", status=status, detail=detail)
        if status in (400, 422):
            return BadRequest(f"InsiteChat refused the request ({status}): {detail}", status=status, detail=detail)
        if status == 429:
            return self._too_many(response, detail)
        return InsiteChatError(f"InsiteChat answered {status}: {detail}", status=status, detail=detail)

    def _too_many(self, response: httpx.Response, detail: str) -> InsiteChatError:
        # A 429 without a JSON detail is most likely a proxy's rate limit: treating it as quota
        # would block chat for an hour, so only the service's own non-rate-limit text is quota.
        said = _json_detail(response)
        if isinstance(said, str) and said.strip() and _RATE_LIMIT_MARKER not in said.lower():
            self._circuit.trip_quota(detail)
            self._quota_news = True
            return QuotaExhausted(detail, retry_in=self._policy.quota_cooldown)
        wait = self._retry_after(response)
        if self._limiter is not None:
            self._limiter.penalize(self._clock.monotonic() + wait)
        logger.warning("[%s] InsiteChat rate limit hit; holding calls for %.0fs", self._name, wait)
        return RateLimited(f"InsiteChat rate limit (429): {detail}", retry_after=wait, detail=detail)

    def _retry_after(self, response: httpx.Response) -> float:
        raw = response.headers.get("Retry-After", "").strip()
        seconds: float | None = None
        if raw:
            try:
                seconds = float(raw)
            except ValueError:
                try:
                    seconds = parsedate_to_datetime(raw).timestamp() - self._clock.time()
                except (TypeError, ValueError):
                    seconds = None
        if seconds is None or not math.isfinite(seconds):
            return self._policy.rate_limit_wait
        return max(0.0, seconds)

    def _detail(self, response: httpx.Response) -> str:
        """The error's own words, readable: a string detail, or a validation list flattened."""
        detail = _json_detail(response)
        if isinstance(detail, list):
            text = "; ".join(_validation_item(item) for item in detail)
        elif isinstance(detail, str):
            text = detail
        elif detail is not None:
            text = str(detail)
        else:
            text = response.text.strip() or response.reason_phrase
        text = " ".join(self._redact(text).split())
        return text[:_MAX_DETAIL_CHARS]

    def _redact(self, text: str) -> str:
        # The service (or a proxy) might echo the key back; it must never reach a log or an error.
        return text.replace(self._api_key, "[redacted]")

    def _parse_list(self, data: Any, parse: Callable[[Mapping[str, Any]], T], what: str) -> list[T]:
        if not isinstance(data, list):
            raise ServerError(f"InsiteChat sent a {what} list that is not a JSON array", status=200)
        items: list[T] = []
        for entry in data:
            if isinstance(entry, dict) and entry.get("id"):
                items.append(parse(entry))
            else:
                logger.warning("[%s] skipped a %s entry without an id", self._name, what)
        return items


def _endpoint_name(path: str) -> str:
    """A metric label without ids: chatbots, chatbot, sources or chat."""
    parts = path.strip("/").split("/")  # v1, chatbots[, id[, sources|chat]]
    if len(parts) >= 4:
        return parts[3]
    return "chatbot" if len(parts) == 3 else "chatbots"


def _json_detail(response: httpx.Response) -> Any:
    """The body's "detail" member, or None when the body is not the API's error JSON."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("detail") if isinstance(body, dict) else None


def _validation_item(item: Any) -> str:
    """One {loc, msg, type} entry as "body.message: field required"."""
    if not isinstance(item, dict):
        return str(item)
    loc = item.get("loc")
    where = ".".join(str(part) for part in loc) if isinstance(loc, list) else str(loc or "")
    msg = str(item.get("msg") or item.get("type") or "invalid")
    return f"{where}: {msg}" if where else msg
