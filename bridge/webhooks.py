"""The InsiteChat webhook receiver: verify the raw bytes, parse loosely, store durably, answer fast."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
from datetime import UTC, datetime, timedelta

from aiohttp import web

from bridge import metrics
from bridge.alerts import HUMAN_REQUESTED, KNOWN_EVENTS, parse_envelope
from bridge.clock import Clock
from bridge.config import Settings
from bridge.desk import AlertDesk
from bridge.store import StoreError
from bridge.webserver import BODY_TIMEOUT, BodyTooLarge, read_body

log = logging.getLogger(__name__)

PATH = "/webhooks/insitechat/{chatbot_id}"
SIGNATURE_HEADER = "X-InsiteChat-Signature"
MAX_BODY = 256 * 1024
FUTURE_SKEW = timedelta(minutes=5)  # a sender's clock may run a little ahead
MAX_DEPTH = 32  # an event is a few levels deep; a signed body nested far deeper is refused before anything walks it


def signature_matches(raw: bytes, header: str, secret: str) -> bool:
    """HMAC-SHA256 of the raw body: hex (any case, optional "sha256=") or base64; constant time.

    The vendor does not document the encoding, so every common one is accepted.
    """
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).digest()
    value = header.strip()
    if value[:7].lower() == "sha256=":
        value = value[7:].strip()
    matched = False
    for candidate in _decodings(value):
        # Every candidate is compared (no early exit), each in constant time.
        matched |= hmac.compare_digest(expected, candidate)
    return matched


def _decodings(value: str) -> list[bytes]:
    found = []
    with contextlib.suppress(ValueError):
        found.append(bytes.fromhex(value))
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        with contextlib.suppress(binascii.Error, ValueError):
            found.append(decode(value + "=" * (-len(value) % 4)))
    return [d for d in found if len(d) == hashlib.sha256().digest_size]


class WebhookReceiver:
    """POST /webhooks/insitechat/<chatbot id>: 2xx only once the event is stored (or a duplicate)."""

    def __init__(
        self, settings: Settings, desk: AlertDesk, clock: Clock, *, body_timeout: float = BODY_TIMEOUT
    ) -> None:
        self._settings = settings
        self._body_timeout = body_timeout
        self._desk = desk
        self._clock = clock
        self._max_age = timedelta(minutes=settings.webhooks.max_age_minutes)
        self._verify = settings.webhooks.verify_signatures

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)
        if not self._verify:
            log.warning(
                "WEBHOOK SIGNATURE CHECKS ARE OFF (webhooks.verify_signatures: false): anyone who can "
                "reach %s can raise alerts. Switch them on before exposing this server.",
                PATH,
            )

    async def handle(self, request: web.Request) -> web.Response:
        chatbot_id = request.match_info["chatbot_id"]
        bot = self._settings.chatbot_settings(chatbot_id)
        if bot is None and not any(rule.chatbot == chatbot_id for rule in self._settings.alerts):
            return _refuse(404, "unknown chatbot", chatbot_id)
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _refuse(413, "body over 256 KiB", chatbot_id)
        try:
            raw = await read_body(request, limit=MAX_BODY, within=self._body_timeout)
        except BodyTooLarge:
            return _refuse(413, "body over 256 KiB", chatbot_id)
        except web.HTTPRequestTimeout:
            return _refuse(408, "the body took too long to arrive", chatbot_id)
        if self._verify:
            secret = bot.webhook_secret if bot else None
            if not secret:
                log.error("webhook for chatbot %s refused: no webhook_secret configured for it", chatbot_id)
                return _refuse(401, "no signing secret configured", chatbot_id)
            header = request.headers.get(SIGNATURE_HEADER, "")
            if not header or not signature_matches(raw, header, secret):
                return _refuse(401, "bad or missing signature", chatbot_id)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _refuse(400, "body is not JSON", chatbot_id)
        except RecursionError:  # deeper than json (and anything after it) can walk
            return _refuse(400, f"JSON nested deeper than {MAX_DEPTH} levels", chatbot_id)
        if _depth(body) > MAX_DEPTH:
            return _refuse(400, f"JSON nested deeper than {MAX_DEPTH} levels", chatbot_id)
        event = parse_envelope(body)
        if event is None:
            return _refuse(400, "not an InsiteChat event envelope", chatbot_id)
        if event.chatbot_id != chatbot_id:
            return _refuse(400, "chatbot_id does not match the URL", chatbot_id)
        if event.name == HUMAN_REQUESTED:
            return _refuse(400, "reserved event name", chatbot_id)
        if event.timestamp is not None:
            now = datetime.fromtimestamp(self._clock.time(), UTC)
            if event.timestamp < now - self._max_age:
                return _refuse(400, "event too old (a replay?)", chatbot_id)
            if event.timestamp > now + FUTURE_SKEW:
                return _refuse(400, "event timestamp is in the future", chatbot_id)
        if event.name not in KNOWN_EVENTS and not event.is_test:
            log.info("webhook for chatbot %s: unknown event %r acknowledged and ignored", chatbot_id, event.name[:80])
            metrics.WEBHOOKS.labels("ignored").inc()
            return web.json_response({"ok": True, "ignored": "unknown event"}, status=202)
        try:
            fresh = await self._desk.raise_event(event, raw)
        except StoreError as exc:
            log.error("webhook for chatbot %s could not be stored: %s", chatbot_id, exc)
            metrics.WEBHOOKS.labels("storage-failure").inc()
            return web.json_response({"ok": False, "error": "storage failure"}, status=503)
        metrics.WEBHOOKS.labels("accepted" if fresh else "duplicate").inc()
        if not fresh:
            metrics.DEDUPE_HITS.labels("webhook").inc()
            log.info("webhook %s for chatbot %s is a duplicate", event.name, chatbot_id)
        return web.json_response({"ok": True, "duplicate": not fresh})


def _depth(value: object) -> int:
    """How deeply lists and objects nest in parsed JSON, without recursion (so the walk itself is safe)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        node, level = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        pending.extend((child, level + 1) for child in children)
    return deepest


def _refuse(status: int, reason: str, chatbot_id: str) -> web.Response:
    metrics.WEBHOOKS.labels(f"refused-{status}").inc()
    log.warning("webhook for chatbot %s refused (%d): %s", chatbot_id[:64], status, reason)
    return web.json_response({"ok": False, "error": reason}, status=status)
