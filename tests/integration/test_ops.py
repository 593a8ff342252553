"""Operations: health and readiness that tell the truth, metrics, and logs that keep secrets and PII out."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, Emulator
from bridge.messages import Inbound
from bridge.relay import Outcome

KEY = "ic_sentinel_key_1234"  # sentinel values: none may appear in any log line
WEBHOOK_SECRET = "whsec-sentinel-5678"
EMAIL, PHONE = "sentinel.person@example.com", "+1 555 0100 999"
QUESTION = "my secret question about sentinel-topic-42"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator()
    account = emu.add_account("Ops")
    emu.add_key(account, KEY)
    emu.add_chatbot(account, "Ops Bot", chatbot_id=SANDBOX_CHATBOT_ID)
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def app(emulator: Emulator, tmp_path: Path) -> AsyncIterator[BridgeApp]:
    settings = config.loads(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{KEY}}", deadline: 2}}
state: {{sqlite: "{tmp_path / 'state.db'}"}}
server: {{listen: "127.0.0.1:0"}}
console: {{enabled: true}}
chatbots: [{{id: {SANDBOX_CHATBOT_ID}, webhook_secret: "${{WH}}"}}]
routes: [{{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}]
alerts: [{{chatbot: {SANDBOX_CHATBOT_ID}, to: ["discord:1"]}}]
discord: {{token: "${{KEY}}"}}
""",
        env={"KEY": KEY, "WH": WEBHOOK_SECRET},
    )
    # Only the core is under test here: no Discord connection is made.
    bridge = BridgeApp(
        settings.model_copy(update={"discord": None}), console_in=io.StringIO(""), console_out=io.StringIO()
    )
    await bridge.start()
    yield bridge
    await bridge.stop()


def console_message(text: str, message_id: str = "1") -> Inbound:
    return Inbound(
        platform="console",
        workspace="",
        channel="console",
        message_id=message_id,
        author_id="you",
        text=text,
        is_dm=True,
    )


async def test_healthz_and_readyz(app: BridgeApp, emulator: Emulator) -> None:
    async with httpx.AsyncClient(base_url=app.server_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert ready.json()["parts"] == {"state": "ok", "insitechat:default": "ok"}
        # InsiteChat failing: after a few failed answers the circuit opens and readiness says so.
        emulator.inject(status=500, count=None, path_contains="/chat")
        for n in range(6):  # one request per answer: a chat call is not re-sent after a 500
            assert await app.relay.handle(console_message("hello?", message_id=f"m{n}")) is Outcome.NOTICE
            if app.clients["default"].circuit_open:
                break
        degraded = await http.get("/readyz")  # degraded, not unready: webhooks must keep coming
        assert degraded.status_code == 200 and degraded.json()["degraded"] == ["insitechat:default"]
        assert "circuit open" in degraded.json()["parts"]["insitechat:default"]
        assert (await http.get("/healthz")).status_code == 200  # alive all the same


async def test_readyz_reports_a_dead_store(app: BridgeApp) -> None:
    app.store._db.close()  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=app.server_url) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["parts"]["state"] == "the state store does not answer"


async def test_metrics_count_messages_latency_and_webhooks(app: BridgeApp) -> None:
    assert await app.relay.handle(console_message("count me")) is Outcome.ANSWERED
    assert await app.relay.handle(console_message("count me")) is Outcome.DUPLICATE
    async with httpx.AsyncClient(base_url=app.server_url) as http:
        await http.post(f"/webhooks/insitechat/{SANDBOX_CHATBOT_ID}", content=b"{}")  # unsigned: refused
        text = (await http.get("/metrics")).text
    assert 'insitechat_bridge_messages_total{outcome="answered",platform="console"}' in text
    assert 'insitechat_bridge_dedupe_hits_total{source="chat"}' in text
    assert 'insitechat_bridge_insitechat_request_seconds_count{endpoint="chat"}' in text
    assert 'insitechat_bridge_insitechat_responses_total{endpoint="chat",status="200"}' in text
    assert 'insitechat_bridge_webhooks_total{result="refused-401"}' in text
    assert "insitechat_bridge_outbox_depth 0.0" in text
    assert 'insitechat_bridge_limiter_queue_depth{key="default"} 0.0' in text


async def test_no_secret_or_pii_in_logs(app: BridgeApp, emulator: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await app.relay.handle(console_message(f"{QUESTION} {EMAIL} {PHONE}"))
    emulator.inject(status=401, count=1, path_contains="/chat")
    await app.relay.handle(console_message(QUESTION, message_id="2"))
    body = json.dumps({
        "event": "lead.captured", "chatbot_id": SANDBOX_CHATBOT_ID,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {"lead_id": "L1", "name": "Sentinel Name", "email": EMAIL, "phone": PHONE},
    }).encode()
    signature = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with httpx.AsyncClient(base_url=app.server_url) as http:
        url = f"/webhooks/insitechat/{SANDBOX_CHATBOT_ID}"
        assert (await http.post(url, content=body, headers={"X-InsiteChat-Signature": signature})).status_code == 200
        assert (await http.post(url, content=body, headers={"X-InsiteChat-Signature": "bad"})).status_code == 401
    await app.outbox.deliver_due()  # Discord is not connected: the failure is logged
    logged = caplog.text
    for sentinel in (KEY, WEBHOOK_SECRET, EMAIL, PHONE, "sentinel-topic-42", "Sentinel Name"):
        assert sentinel not in logged, sentinel
    assert "outcome=answered" in logged  # the logs are there, just clean


async def _raw_request(url: str, data: bytes, *, then_wait: float = 0.0) -> bytes:
    """Bytes written straight to the server's socket (what no HTTP client would send); its answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), 5 + then_wait)
    finally:
        writer.close()


async def test_malformed_requests_are_one_quiet_line_not_a_traceback_each(
    app: BridgeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """The log line is the product here: a 10,000-request fuzz filled the log with aiohttp tracebacks."""
    junk = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        answers = [await _raw_request(app.server_url, junk) for _ in range(20)]
    assert all(answer.split(b" ", 2)[1] == b"400" for answer in answers)
    server = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.WARNING]
    assert len(server) == 1 and server[0].exc_info is None and server[0].levelno == logging.WARNING
    assert "malformed request" in server[0].getMessage()
    async with httpx.AsyncClient() as http:  # and the server still serves
        assert (await http.get(app.server_url + "/healthz")).status_code == 200
