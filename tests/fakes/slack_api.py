"""A fake Slack (Web API and its messages, Socket Mode, response URLs) on 127.0.0.1 for the real slack_sdk and Bolt."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import WSMsgType, web

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads" / "slack"

BOT_TOKEN = "xoxb-test-token"
APP_TOKEN = "xapp-test-token"
SIGNING_SECRET = "test-signing-secret"
TEAM = "T0TEST"
BOT_USER = "UBOT"
BOT_ID = "BBOT"
ALL_SCOPES = (
    "app_mentions:read,chat:write,channels:history,groups:history,im:history,im:read,im:write,"
    "reactions:write,commands,channels:read,groups:read"
)


def payload(name: str, **event_fields: Any) -> dict[str, Any]:
    """A recorded payload from tests/payloads/slack, with event fields overridden."""
    data: dict[str, Any] = json.loads((PAYLOADS / f"{name}.json").read_text())
    if event_fields:
        data["event"].update(event_fields)
    return data


def command_form(**fields: str) -> dict[str, str]:
    """The recorded slash command form fields, some overridden."""
    data: dict[str, str] = json.loads((PAYLOADS / "slash_command.json").read_text())
    data.update(fields)
    return data


def block_actions(
    action_id: str,
    *,
    value: str = "",
    user: str = "U0CAROL",
    channel: str = "C0ALERTS",
    message: dict[str, Any] | None = None,
    response_url: str = "",
) -> dict[str, Any]:
    """A recorded block_actions payload (a button click on a message), some fields overridden."""
    data: dict[str, Any] = json.loads((PAYLOADS / "block_actions.json").read_text())
    data["user"].update(id=user, username=user.lower(), name=user.lower())
    data["channel"]["id"] = channel
    data["container"]["channel_id"] = channel
    if message is not None:
        data["message"] = message
        data["container"]["message_ts"] = message["ts"]
        if message.get("thread_ts"):
            data["container"]["thread_ts"] = message["thread_ts"]
    if response_url:
        data["response_url"] = response_url
    data["actions"][0].update(action_id=action_id, value=value)
    return data


def feedback_click(
    value: str,
    *,
    user: str = "U0ALICE",
    channel: str = "C0GENERAL",
    message: dict[str, Any] | None = None,
    response_url: str = "",
    element: str = "feedback_buttons",
) -> dict[str, Any]:
    """A click on 👍 / 👎 under an answer: Slack's feedback_buttons element (the clicked button's value), or a
    plain button (`element="button"`, action_id insitechat_feedback:<up|down>)."""
    vote = value.partition(":")[0]
    action_id = "insitechat_feedback" if element == "feedback_buttons" else f"insitechat_feedback:{vote}"
    data = block_actions(action_id, value=value, user=user, channel=channel, message=message, response_url=response_url)
    label = {"type": "plain_text", "text": "👍" if vote == "up" else "👎"}
    data["actions"][0].update(type=element, block_id="insitechat_feedback", text=label)
    data["actions"][0].pop("style", None)
    return data


def view_submission(
    view: dict[str, Any], *, user: str = "U0ALICE", reason: str | None = None, view_id: str = "V0REASON"
) -> dict[str, Any]:
    """A view_submission payload for a modal the bot opened (`view` as views.open got it), its text field filled."""
    values: dict[str, Any] = {}
    for block in view.get("blocks", []):
        element = block.get("element") or {}
        if block.get("type") == "input" and element.get("type") == "plain_text_input":
            values[block["block_id"]] = {element["action_id"]: {"type": "plain_text_input", "value": reason}}
    return {
        "type": "view_submission",
        "team": {"id": TEAM, "domain": "acme"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM},
        "api_app_id": "A0TEST",
        "token": "fake-verification-token",
        "trigger_id": "1700000900.1234.abcdef",
        "view": {
            "id": view_id, "team_id": TEAM, "type": "modal", "app_id": "A0TEST", "bot_id": BOT_ID,
            "callback_id": view.get("callback_id", ""), "private_metadata": view.get("private_metadata", ""),
            "title": view.get("title"), "blocks": view.get("blocks", []), "hash": "1700000900.abc",
            "state": {"values": values},
        },
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }


def view_closed(view: dict[str, Any], *, user: str = "U0ALICE") -> dict[str, Any]:
    """A view_closed payload: the person closed a modal opened with notify_on_close (its Cancel button, or x)."""
    body = view_submission(view, user=user)
    body["type"] = "view_closed"
    body["is_cleared"] = False
    del body["trigger_id"], body["response_urls"]
    return body


def interaction_form(body: dict[str, Any]) -> bytes:
    """How Slack POSTs an interaction over HTTP: a form with one `payload` field holding JSON."""
    return urlencode({"payload": json.dumps(body)}).encode()


def sign(body: bytes, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack sends with an HTTP event: v0 HMAC-SHA256 over "v0:{ts}:{body}"."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


@dataclass
class SlackCall:
    """One Web API call the fake received."""

    method: str
    args: dict[str, Any]
    token: str
    status: int
    ok: bool
    time: float  # loop.time() on arrival
    result: dict[str, Any] = field(default_factory=dict)  # the JSON answered


@dataclass
class SharedFile:
    """A file shared by files.completeUploadExternal (the last step of files_upload_v2)."""

    id: str
    title: str
    filename: str
    channel: str
    thread_ts: str
    data: bytes


@dataclass
class SlackFault:
    method: str
    status: int
    error: str
    headers: dict[str, str]
    remaining: int | None  # None = forever
    after: bool = False  # do the work, then answer the error (the answer was "lost")
    drop: bool = False  # do the work, then close the connection without any answer
    skip: int = 0  # calls let through untouched before the fault starts


@dataclass
class SlackHang:
    method: str
    remaining: int | None  # None = forever
    hung: int = 0  # answers being held right now


@dataclass
class Envelope:
    envelope_id: str
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    ack: dict[str, Any] | None = None
    socket: int = -1  # which connection it went to: an index into FakeSlack.connections
    body: dict[str, Any] = field(default_factory=dict)
    retry_attempt: int = 0


class FakeSlack:
    """Slack's Web API for one workspace, the Socket Mode socket, and response URLs, on loopback."""

    def __init__(
        self,
        *,
        bot_token: str = BOT_TOKEN,
        app_token: str = APP_TOKEN,
        scopes: str = ALL_SCOPES,
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.scopes = scopes
        self.calls: list[SlackCall] = []
        self.faults: list[SlackFault] = []
        # conversations.info answers: channel id -> {"name", "is_member", ...}
        self.channels: dict[str, dict[str, Any]] = {}
        self.responses: list[dict[str, Any]] = []  # posts to response_url
        # Every message posted or updated through the API, per channel, in posting order.
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.ephemeral: list[dict[str, Any]] = []  # chat.postEphemeral arguments
        self.views: list[dict[str, Any]] = []  # modals opened with views.open: {"trigger_id", "view"}
        self.refused_blocks: set[str] = set()  # block types chat.postMessage answers invalid_blocks for
        # files_upload_v2: the bytes sent to each upload URL, and each file shared by files.completeUploadExternal.
        self.uploads: dict[str, bytes] = {}
        self._upload_names: dict[str, str] = {}  # file id -> file name, from files.getUploadURLExternal
        self.files: list[SharedFile] = []
        # Reactions the bot has on messages now: (channel, ts) -> names (reactions.add / remove).
        self.reactions: dict[tuple[str, str], set[str]] = {}
        self.hangs: list[SlackHang] = []
        # The assistant surface: (channel, thread_ts) -> what the bot set there.
        self.statuses: dict[tuple[str, str], str] = {}  # shown now; Slack clears it when the bot replies there
        self.titles: dict[tuple[str, str], str] = {}
        self.suggested: dict[tuple[str, str], dict[str, Any]] = {}  # {"title", "prompts"}
        self.silent = False  # the socket neither answers pings nor greets new connections
        self.history_page = 100  # messages per conversations.history/replies page at most
        self.sockets: list[web.WebSocketResponse] = []  # open Socket Mode connections
        self.connections: list[web.WebSocketResponse] = []  # every one ever opened, in order
        # Several connections (replicas): False sends every envelope to the newest one; True
        # spreads them round-robin, each to one connection, as Slack does.
        self.round_robin = False
        self._turn = 0
        self.envelopes: dict[str, Envelope] = {}
        self.url = ""
        self._last_ts = 0.0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()
        self._stopping = False
        self._release = asyncio.Event()  # set: every hung answer goes out (stop(), release())

    # --- test controls -----------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def response_url(self, name: str = "1") -> str:
        return f"{self.url}/response/{name}"

    def fail(
        self,
        method: str,
        *,
        status: int = 200,
        error: str = "fatal_error",
        retry_after: int | None = None,
        count: int | None = 1,
        after: bool = False,
        drop: bool = False,
        skip: int = 0,
    ) -> SlackFault:
        """Make the next `count` calls of `method` fail: 429 (+Retry-After), 500, or 200 with ok=false.

        `skip`: the first `skip` calls of `method` are answered normally (part 3 of 3 fails).

        `after=True`: the call takes effect first and only its answer is the error, like a
        post whose response was lost on the way back.
        `drop=True`: the call takes effect, then the connection closes with no answer at all
        (the client sees ServerDisconnectedError); `status` and `error` are not used.
        """
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        if status == 429:
            error = "ratelimited"
        fault = SlackFault(method, status, error, headers, count, after, drop, skip)
        self.faults.append(fault)
        return fault

    def heal(self, method: str | None = None) -> None:
        """Drop the faults of `method` (of every method when None)."""
        self.faults = [f for f in self.faults if method is not None and f.method != method]

    def user_message(
        self, channel: str, ts: str, text: str = "a question", *, user: str = "U0ALICE", thread_ts: str = ""
    ) -> dict[str, Any]:
        """Store a person's message (events alone do not): the root a thread search needs to exist."""
        message: dict[str, Any] = {"type": "message", "text": text, "user": user, "ts": ts}
        if thread_ts:
            message["thread_ts"] = thread_ts
        self.messages.setdefault(channel, []).append(message)
        return message

    def message(self, channel: str, ts: str) -> dict[str, Any] | None:
        """The stored message (as last updated), or None."""
        return next((m for m in self.messages.get(channel, []) if m["ts"] == ts), None)

    def calls_to(self, method: str) -> list[SlackCall]:
        return [c for c in self.calls if c.method == method]

    @property
    def posts(self) -> list[dict[str, Any]]:
        """Arguments of every chat.postMessage that succeeded, in order."""
        return [c.args for c in self.calls if c.method == "chat.postMessage" and c.ok]

    def hang_after(self, method: str, *, count: int | None = 1) -> SlackHang:
        """The next `count` calls of `method` take effect, then their answer is held back.

        Like a post Slack made whose response never reached the bridge before it died: the
        call is recorded (and the message stored) at once; the answer goes out only on
        release() or stop(), by which time the caller is usually gone.
        """
        hang = SlackHang(method, count)
        self.hangs.append(hang)
        if not self._stopping:
            self._release.clear()
        return hang

    def release(self) -> None:
        """Send every held answer now, and hold no more."""
        self.hangs.clear()
        self._release.set()

    def assistant_thread(self, channel: str = "D0ALICE", thread_ts: str = "1700000500.000500") -> dict[str, Any]:
        """A person opens the assistant view: the thread's root (Slack's own post) and the event Slack sends."""
        self.messages.setdefault(channel, []).append(
            {"type": "message", "subtype": "assistant_app_thread", "user": "U0ALICE", "text": "New chat",
             "ts": thread_ts, "thread_ts": thread_ts}
        )
        body = payload("assistant_thread_started")
        body["event"]["assistant_thread"].update(channel_id=channel, thread_ts=thread_ts)
        return body

    def reactions_on(self, channel: str, ts: str) -> set[str]:
        """The bot's reactions on a message right now."""
        return set(self.reactions.get((channel, ts), set()))

    async def wait_for(self, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Poll until condition() is truthy (re-checked on every call the fake receives)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = condition()
            if result:
                return result
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; calls so far: {[c.method for c in self.calls]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))

    async def send_envelope(
        self,
        body: dict[str, Any],
        *,
        kind: str = "events_api",
        retry_attempt: int = 0,
        retry_reason: str = "",
        avoid: web.WebSocketResponse | None = None,
    ) -> Envelope:
        """Push one Socket Mode envelope to one connected client; returns it (wait on .acked).

        With `round_robin`, connections take turns; `avoid` skips that connection when
        another is open (a retry goes elsewhere, as Slack's may).
        """
        await self.wait_for(lambda: self.sockets, timeout=5)
        envelope = Envelope(str(uuid.uuid4()), body=body, retry_attempt=retry_attempt)
        self.envelopes[envelope.envelope_id] = envelope
        message: dict[str, Any] = {
            "envelope_id": envelope.envelope_id,
            "type": kind,
            "payload": body,
            "accepts_response_payload": kind != "events_api",
        }
        if kind == "events_api":
            message["retry_attempt"] = retry_attempt
            message["retry_reason"] = retry_reason
        ws = self._pick_socket(avoid)
        envelope.socket = self.connections.index(ws)
        await ws.send_str(json.dumps(message))
        return envelope

    async def retry_envelope(self, envelope: Envelope, *, reason: str = "timeout") -> Envelope:
        """Slack's retry of an envelope that was not acked in time: a new envelope, the same
        payload, `retry_attempt` one higher, to another connection when there is one."""
        avoid = self.connections[envelope.socket] if envelope.socket >= 0 else None
        return await self.send_envelope(
            envelope.body, retry_attempt=envelope.retry_attempt + 1, retry_reason=reason, avoid=avoid
        )

    def _pick_socket(self, avoid: web.WebSocketResponse | None) -> web.WebSocketResponse:
        open_sockets = [ws for ws in self.sockets if not ws.closed] or list(self.sockets)
        if not self.round_robin:
            candidates = [ws for ws in open_sockets if ws is not avoid] or open_sockets
            return candidates[-1]
        candidates = [ws for ws in open_sockets if ws is not avoid] or open_sockets
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    # --- server ------------------------------------------------------------------------------

    async def click(self, body: dict[str, Any]) -> Envelope:
        """A button click over Socket Mode: an `interactive` envelope."""
        return await self.send_envelope(body, kind="interactive")

    async def close_sockets(self) -> None:
        """Slack drops every Socket Mode connection (as when it rotates them, or a token is revoked)."""
        for ws in list(self.sockets):
            await ws.close()

    async def start(self, port: int = 0) -> str:
        """Listen on `port` (0: any free one).

        A given port lets a test start Slack "coming back" where the bridge looks.
        """
        app = web.Application(middlewares=[self._hold_answers])
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/link", self._socket)
        app.router.add_post("/response/{name}", self._response)
        app.router.add_post("/upload/{file_id}", self._upload)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        # A client that never closed its socket reconnects at once: refuse it from here on.
        self._stopping = True
        self._release.set()
        for ws in list(self.sockets):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ws.close(), 1)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _hold_answers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        hang = next(
            (
                h
                for h in self.hangs
                if h.method == request.match_info.get("method") and (h.remaining is None or h.remaining > 0)
            ),
            None,
        )
        if hang is not None and hang.remaining is not None:
            hang.remaining -= 1
        response = await handler(request)  # the call takes effect (and is recorded) first
        if hang is not None and not self._release.is_set():
            hang.hung += 1
            self._notify()
            try:
                await self._release.wait()
            finally:
                hang.hung -= 1
        return response

    def _new_ts(self) -> str:
        """A message ts like Slack's: the posting time, unique and increasing within the workspace."""
        self._last_ts = max(time.time(), self._last_ts + 0.000001)
        return f"{self._last_ts:.6f}"

    def _notify(self) -> None:
        self._changed.set()

    async def _args(self, request: web.Request) -> dict[str, Any]:
        args: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            body = await request.json()
            args.update(body if isinstance(body, dict) else {})
        elif request.can_read_body:
            args.update(await request.post())
        return args

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._args(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or str(args.pop("token", ""))
        status, data, headers, drop = self._answer(method, args, token)
        self.calls.append(
            SlackCall(method, args, token, status, bool(data.get("ok")), asyncio.get_running_loop().time(), data)
        )
        self._notify()
        if drop and request.transport is not None:
            # Closed before a byte of the answer: the client cannot tell whether the call worked.
            request.transport.close()
        return web.json_response(data, status=status or 200, headers=headers)  # after a drop, never sent

    def _answer(
        self, method: str, args: dict[str, Any], token: str
    ) -> tuple[int, dict[str, Any], dict[str, str], bool]:
        """(status, JSON, headers, drop the connection instead of answering)."""
        fault = next((f for f in self.faults if f.method == method and (f.remaining is None or f.remaining > 0)), None)
        if fault is not None and fault.skip:
            fault.skip -= 1
            fault = None
        if fault is not None:
            if fault.remaining is not None:
                fault.remaining -= 1
            if fault.drop:
                _, data, headers = self._answer_normally(method, args, token)
                return 0, data, headers, True  # status 0 in the record: no answer was sent
            if fault.after:
                self._answer_normally(method, args, token)
            return fault.status, {"ok": False, "error": fault.error}, fault.headers, False
        return (*self._answer_normally(method, args, token), False)

    def _answer_normally(
        self, method: str, args: dict[str, Any], token: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if self._stopping:
            return 503, {"ok": False, "error": "service_unavailable"}, {}
        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        if token != expected:
            return 200, {"ok": False, "error": "invalid_auth"}, {}
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return 200, {"ok": False, "error": "unknown_method"}, {}
        data, headers = handler(args)
        return 200, data, headers

    # --- methods -----------------------------------------------------------------------------

    def _m_auth_test(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        data = {"ok": True, "url": "https://acme.slack.com/", "team": "Acme", "user": "insitechat",
                "team_id": TEAM, "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False}
        return data, {"x-oauth-scopes": self.scopes}

    def _m_apps_connections_open(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        return {"ok": True, "url": self.url.replace("http://", "ws://") + "/link"}, {}

    def _m_chat_postMessage(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        channel = str(args.get("channel") or "")
        if self.channels.get(channel, {}).get("is_member") is False:
            return {"ok": False, "error": "not_in_channel"}, {}
        sent_blocks = _json_arg(args.get("blocks")) or []
        if any(isinstance(b, dict) and b.get("type") in self.refused_blocks for b in sent_blocks):
            return {"ok": False, "error": "invalid_blocks"}, {}
        ts = self._new_ts()
        message: dict[str, Any] = {
            "type": "message",
            "text": args.get("text"),
            "user": BOT_USER,
            "bot_id": BOT_ID,
            "ts": ts,
        }
        blocks = _json_arg(args.get("blocks"))
        if blocks:
            message["blocks"] = blocks
        metadata = _json_arg(args.get("metadata"))
        if metadata:
            message["metadata"] = metadata
        thread = str(args.get("thread_ts") or "")
        if thread:
            message["thread_ts"] = thread
            self.statuses.pop((channel, thread), None)  # Slack clears the status when the app replies
            if _truthy(args.get("reply_broadcast")):
                message["subtype"] = "thread_broadcast"
        self.messages.setdefault(channel, []).append(message)
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "message": {k: v for k, v in message.items() if k != "metadata"},
        }, {}

    def _m_chat_update(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        channel, ts = str(args.get("channel") or ""), str(args.get("ts") or "")
        message = self.message(channel, ts)
        if message is None:
            return {"ok": False, "error": "message_not_found"}, {}
        message["text"] = args.get("text", message.get("text"))
        blocks = _json_arg(args.get("blocks"))
        if blocks is not None:
            message["blocks"] = blocks
        message["edited"] = {"user": BOT_USER, "ts": f"{time.time():.6f}"}
        return {"ok": True, "channel": channel, "ts": ts, "text": message["text"]}, {}

    def _m_chat_postEphemeral(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        self.ephemeral.append(dict(args))
        return {"ok": True, "message_ts": self._new_ts()}, {}

    def _m_views_open(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        view = _json_arg(args.get("view"))
        if not str(args.get("trigger_id") or "") or not isinstance(view, dict):
            return {"ok": False, "error": "invalid_arguments"}, {}
        self.views.append({"trigger_id": str(args["trigger_id"]), "view": view})
        return {"ok": True, "view": {"id": f"V{len(self.views):04d}", **view}}, {}

    def _m_chat_getPermalink(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        channel, ts = str(args.get("channel") or ""), str(args.get("message_ts") or "")
        if not channel or not ts:
            return {"ok": False, "error": "invalid_arguments"}, {}
        link = f"https://acme.slack.com/archives/{channel}/p{ts.replace('.', '')}"
        return {"ok": True, "channel": channel, "permalink": link}, {}

    def _m_conversations_history(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        channel = str(args.get("channel") or "")
        if self.channels.get(channel, {}).get("is_member") is False:
            return {"ok": False, "error": "not_in_channel"}, {}
        # The channel's own timeline, newest first: top-level posts and thread broadcasts.
        found = [
            m for m in self.messages.get(channel, [])
            if not m.get("thread_ts") or m.get("subtype") == "thread_broadcast"
        ]
        return self._page(list(reversed(found)), args), {}

    def _m_conversations_replies(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        channel, root = str(args.get("channel") or ""), str(args.get("ts") or "")
        messages = self.messages.get(channel, [])
        parent = [m for m in messages if m["ts"] == root]
        if not parent:
            return {"ok": False, "error": "thread_not_found"}, {}
        return self._page(parent + [m for m in messages if m.get("thread_ts") == root and m["ts"] != root], args), {}

    def _page(self, messages: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
        oldest = float(args.get("oldest") or 0)
        chosen = [m for m in messages if float(m["ts"]) > oldest]
        start = int(args.get("cursor") or 0)
        size = min(int(args.get("limit") or 100), self.history_page)
        page = chosen[start : start + size]
        if not _truthy(args.get("include_all_metadata")):
            page = [{k: v for k, v in m.items() if k != "metadata"} for m in page]
        more = start + size < len(chosen)
        return {
            "ok": True,
            "messages": page,
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + size) if more else ""},
        }

    def _m_reactions_add(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        names = self.reactions.setdefault((str(args.get("channel") or ""), str(args.get("timestamp") or "")), set())
        name = str(args.get("name") or "")
        if name in names:
            return {"ok": False, "error": "already_reacted"}, {}
        names.add(name)
        return {"ok": True}, {}

    def _m_reactions_remove(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        names = self.reactions.get((str(args.get("channel") or ""), str(args.get("timestamp") or "")), set())
        name = str(args.get("name") or "")
        if name not in names:
            return {"ok": False, "error": "no_reaction"}, {}
        names.discard(name)
        return {"ok": True}, {}

    def _scope_refusal(self, *allowed: str) -> dict[str, Any] | None:
        """Slack's answer to a token with none of the `allowed` scopes, or None when it has one."""
        granted = {s.strip() for s in self.scopes.split(",")}
        if granted & set(allowed):
            return None
        return {"ok": False, "error": "missing_scope", "needed": ",".join(allowed), "provided": self.scopes}

    def _assistant_place(self, args: dict[str, Any]) -> tuple[tuple[str, str], dict[str, Any] | None]:
        channel, thread = str(args.get("channel_id") or ""), str(args.get("thread_ts") or "")
        if not channel:
            return (channel, thread), {"ok": False, "error": "channel_not_found"}
        if not thread:
            return (channel, thread), {"ok": False, "error": "invalid_thread_ts"}
        return (channel, thread), None

    def _m_assistant_threads_setStatus(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        # Either scope, for now (Slack's changelog of 2026-03-05): chat:write lets channel apps show it too.
        refusal = self._scope_refusal("chat:write", "assistant:write")
        place, problem = self._assistant_place(args)
        if refusal or problem:
            return refusal or problem or {}, {}
        messages = _json_arg(args.get("loading_messages")) or []
        if len(messages) > 10:
            return {"ok": False, "error": "invalid_arguments"}, {}
        status = str(args.get("status") or "")
        if status:
            self.statuses[place] = status
        else:
            self.statuses.pop(place, None)  # an empty status clears it
        return {"ok": True}, {}

    def _m_assistant_threads_setSuggestedPrompts(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        refusal = self._scope_refusal("assistant:write")
        place, problem = self._assistant_place(args)
        if refusal or problem:
            return refusal or problem or {}, {}
        prompts = _json_arg(args.get("prompts")) or []
        if not prompts or len(prompts) > 4 or any(not p.get("title") or not p.get("message") for p in prompts):
            return {"ok": False, "error": "invalid_arguments"}, {}
        self.suggested[place] = {"title": args.get("title"), "prompts": prompts}
        return {"ok": True}, {}

    def _m_assistant_threads_setTitle(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        refusal = self._scope_refusal("assistant:write")
        place, problem = self._assistant_place(args)
        if refusal or problem:
            return refusal or problem or {}, {}
        title = str(args.get("title") or "")
        if not title:
            return {"ok": False, "error": "invalid_arguments"}, {}
        self.titles[place] = title
        return {"ok": True}, {}

    def _m_conversations_info(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        channel = str(args.get("channel") or "")
        if channel not in self.channels:
            return {"ok": False, "error": "channel_not_found"}, {}
        info = {"id": channel, "is_channel": True, "is_archived": False, **self.channels[channel]}
        return {"ok": True, "channel": info}, {}

    # --- socket mode and response URLs ------------------------------------------------------

    def _m_files_getUploadURLExternal(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        if not args.get("filename") or not str(args.get("length") or "").isdigit():
            return {"ok": False, "error": "invalid_arguments"}, {}
        file_id = "F" + uuid.uuid4().hex[:10].upper()
        self._upload_names[file_id] = str(args["filename"])
        return {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}, {}

    def _m_files_completeUploadExternal(self, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        files = _json_arg(args.get("files")) or []
        if any(f.get("id") not in self.uploads for f in files):
            return {"ok": False, "error": "file_not_found"}, {}  # never uploaded to its URL
        channel, thread = str(args.get("channel_id") or ""), str(args.get("thread_ts") or "")
        for f in files:
            name, data = self._upload_names[f["id"]], self.uploads[f["id"]]
            self.files.append(SharedFile(f["id"], str(f.get("title") or ""), name, channel, thread, data))
        return {"ok": True, "files": [{"id": f["id"], "title": f.get("title", "")} for f in files]}, {}

    async def _upload(self, request: web.Request) -> web.Response:
        """An upload URL from files.getUploadURLExternal: takes the raw file (Slack answers 200 "OK - <length>")."""
        file_id = request.match_info["file_id"]
        if file_id not in self._upload_names:
            return web.Response(status=404, text="unknown upload")
        self.uploads[file_id] = await request.read()
        self._notify()
        return web.Response(text=f"OK - {len(self.uploads[file_id])}")

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        if self._stopping:
            return web.Response(status=503)
        # Pings are answered here, not by aiohttp, so that a test can make the socket go silent.
        ws = web.WebSocketResponse(timeout=1, autoping=False)
        await ws.prepare(request)
        self.sockets.append(ws)
        self.connections.append(ws)
        if not self.silent:
            await ws.send_str(
                json.dumps({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0TEST"}})
            )
        self._notify()
        try:
            async for message in ws:
                if message.type == WSMsgType.PING:
                    if not self.silent:
                        await ws.pong(message.data)
                    continue
                if message.type != WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                envelope = self.envelopes.get(str(data.get("envelope_id")))
                if envelope is not None:
                    envelope.ack = data
                    envelope.acked.set()
                    self._notify()
        finally:
            self.sockets.remove(ws)
            self._notify()
        return ws

    async def _response(self, request: web.Request) -> web.Response:
        self.responses.append({"name": request.match_info["name"], **(await request.json())})
        self._notify()
        return web.Response(text="ok")


def _json_arg(value: Any) -> Any:
    """A structured argument as sent: JSON bodies keep lists and dicts, form bodies carry JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true")
