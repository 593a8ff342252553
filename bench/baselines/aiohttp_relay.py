"""The floor: a minimal aiohttp relay (verify, parse, one chat request out, one chat.postMessage), no framework."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientSession, web

SECRET = os.environ["SLACK_SIGNING_SECRET"].encode()
CHAT_URL = f"{os.environ['INSITECHAT_BASE_URL']}/v1/chatbots/{os.environ['INSITECHAT_CHATBOT_ID']}/chat"
POST_URL = os.environ.get("SLACK_API_URL", "https://slack.com/api/") + "chat.postMessage"
IC_HEADERS = {"Authorization": f"Bearer {os.environ['INSITECHAT_API_KEY']}"}
SLACK_HEADERS = {"Authorization": f"Bearer {os.environ['SLACK_BOT_TOKEN']}"}
HTTP: web.AppKey[ClientSession] = web.AppKey("http", ClientSession)
running: set[asyncio.Task[None]] = set()  # a reference to each answer in flight, so none is collected


def signed(request: web.Request, raw: bytes) -> bool:
    stamp = request.headers.get("X-Slack-Request-Timestamp", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > 300:
        return False
    digest = hmac.new(SECRET, b"v0:" + stamp.encode() + b":" + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest("v0=" + digest, request.headers.get("X-Slack-Signature", ""))


async def answer(http: ClientSession, event: dict[str, Any]) -> None:
    thread = event.get("thread_ts") or event["ts"]
    question = str(event["text"]).split(">", 1)[-1].strip()
    async with http.post(CHAT_URL, json={"message": question, "session_id": thread}, headers=IC_HEADERS) as r:
        reply = (await r.json())["response"]
    post = {"channel": event["channel"], "text": reply, "thread_ts": thread}
    async with http.post(POST_URL, json=post, headers=SLACK_HEADERS) as r:
        await r.read()


async def events(request: web.Request) -> web.Response:
    raw = await request.read()
    if not signed(request, raw):
        return web.Response(status=401)
    event = json.loads(raw).get("event") or {}
    if event.get("type") == "app_mention":  # ack first, answer after: Slack retries what is not acked in 3 s
        task = asyncio.create_task(answer(request.app[HTTP], event))
        running.add(task)
        task.add_done_callback(running.discard)
    return web.Response()


async def session(app: web.Application) -> AsyncIterator[None]:
    app[HTTP] = ClientSession()  # keep-alive connections to both services (aiohttp's default: 100 at most)
    yield
    await app[HTTP].close()


if __name__ == "__main__":
    application = web.Application()
    application.cleanup_ctx.append(session)
    application.router.add_post("/slack/events", events)
    web.run_app(application, host="127.0.0.1", port=int(os.environ.get("PORT", "3000")), access_log=None, print=None)
