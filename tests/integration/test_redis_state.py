"""The bridge with its state on Redis.

It answers, says when Redis keeps nothing on disk, and a Redis it cannot reach stops the start.
"""

from __future__ import annotations

import io
import logging

import httpx
import pytest

from bridge import config
from bridge.app import BridgeApp
from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from bridge.messages import Inbound
from bridge.relay import Outcome
from bridge.store import StoreError
from bridge.store.redis import RedisStore
from tests.conftest import free_port


def settings_for(emulator: Emulator, redis_url: str, prefix: str) -> config.Settings:
    return config.loads(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{KEY}}", deadline: 2}}
state:
  redis_url: ${{REDIS_URL}}
  redis_prefix: "{prefix}"
server: {{listen: "127.0.0.1:0"}}
console: {{enabled: true}}
routes: [{{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}]
""",
        env={"KEY": SANDBOX_KEY, "REDIS_URL": redis_url},
    )


async def test_the_bridge_runs_on_redis(
    emulator: Emulator, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = BridgeApp(
        settings_for(emulator, redis_url, redis_prefix), console_in=io.StringIO(""), console_out=io.StringIO()
    )
    assert isinstance(app.store, RedisStore)
    with caplog.at_level(logging.WARNING, logger="bridge.app"):
        await app.start()
    try:
        warned = [r.getMessage() for r in caplog.records if "keeps nothing on disk" in r.getMessage()]
        assert len(warned) == 1  # the test server has no AOF and no RDB saves
        question = Inbound("console", "", "console", "1", "you", "hello there", is_dm=True)
        assert await app.relay.handle(question) is Outcome.ANSWERED
        assert await app.relay.handle(question) is Outcome.DUPLICATE
        async with httpx.AsyncClient(base_url=app.server_url) as http:
            assert (await http.get("/readyz")).json()["parts"]["state"] == "ok"
    finally:
        await app.stop()


async def test_a_redis_it_cannot_reach_stops_the_start_without_its_password(emulator: Emulator) -> None:
    url = f"redis://bridge:redis-pw-sentinel@127.0.0.1:{free_port()}/0"
    app = BridgeApp(settings_for(emulator, url, "icb:"), console_in=io.StringIO(""), console_out=io.StringIO())
    with pytest.raises(StoreError) as info:
        await app.start()
    assert "redis-pw-sentinel" not in str(info.value) and "127.0.0.1" in str(info.value)
    await app.stop()
