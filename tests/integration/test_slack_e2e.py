"""The bridge as an operator runs it, with Slack: `run` in a subprocess over Socket Mode, SIGTERM; `check`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator
from tests.conftest import free_port
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack, payload

ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "IC_KEY": SANDBOX_KEY,
    "SLACK_BOT_TOKEN": BOT_TOKEN,
    "SLACK_APP_TOKEN": APP_TOKEN,
}



@pytest.fixture
def slack(slack: FakeSlack) -> FakeSlack:
    """The shared fake Slack, with the routed channel the bot is a member of."""
    slack.channels["C0GENERAL"] = {"name": "general", "is_member": True}
    return slack


def write_config(
    tmp_path: Path, emulator: Emulator, slack: FakeSlack, channel: str = "C0GENERAL", listen: str = "127.0.0.1:0"
) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        f"""
insitechat: {{base_url: "{emulator.base_url}", api_key: "${{IC_KEY}}"}}
state: {{sqlite: "{tmp_path / 'state.db'}"}}
server: {{listen: "{listen}"}}
slack: {{bot_token: "${{SLACK_BOT_TOKEN}}", app_token: "${{SLACK_APP_TOKEN}}", api_url: "{slack.api_url}"}}
routes:
  - {{platform: slack, channel: {channel}, chatbot: {SANDBOX_CHATBOT_ID}}}
  - {{platform: slack, channel: dm, chatbot: {SANDBOX_CHATBOT_ID}}}
"""
    )
    return path


async def test_run_answers_over_socket_mode_and_exits_cleanly_on_sigterm(
    emulator: Emulator, slack: FakeSlack, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, emulator, slack, listen=f"127.0.0.1:{port}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "--config", str(config), env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        await slack.wait_for(lambda: slack.sockets, timeout=20)
        envelope = await slack.send_envelope(payload("app_mention"))
        await asyncio.wait_for(envelope.acked.wait(), 10)
        await slack.wait_for(lambda: slack.posts, timeout=10)
        # The bridge's own count of how the message ended, as an operator's Prometheus reads it.
        answered = 'insitechat_bridge_messages_total{outcome="answered",platform="slack"} 1.0'
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):  # counted once the delivery is done, a moment after the post
                metrics = (await http.get("/metrics")).text
                if answered in metrics.splitlines():
                    break
                await asyncio.sleep(0.05)
        assert answered in metrics.splitlines()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    [post] = slack.posts
    assert post["thread_ts"] == "1700000100.000100" and "refund policy" in post["text"]
    await slack.wait_for(lambda: not slack.sockets, timeout=5)  # the socket was closed, not dropped
    # What stays on stderr is the log's own promise: no traceback, no secret, no message text.
    assert "Traceback" not in stderr
    for secret in (BOT_TOKEN, APP_TOKEN, SANDBOX_KEY):
        assert secret not in stderr and secret not in out.decode()
    assert "refund policy" not in stderr.lower()  # no message bodies in INFO logs


async def test_check_prints_one_line_per_slack_problem(emulator: Emulator, slack: FakeSlack, tmp_path: Path) -> None:
    config = write_config(tmp_path, emulator, slack, channel="C0ELSEWHERE")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "check", "--live", "--config", str(config), env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, err.decode()
    slack_lines = [line for line in out.decode().splitlines() if "slack:" in line]
    assert len(slack_lines) == 1, out.decode()
    assert slack_lines[0].endswith(
        "routes[0].channel: channel C0ELSEWHERE not found (a private channel the bot is not in looks the same)"
    )
    assert BOT_TOKEN not in out.decode() + err.decode()
