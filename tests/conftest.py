"""Shared fixtures: the InsiteChat emulator and the fake Slack on loopback, and a real Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridge.emulator import Emulator
from tests.fakes.slack_api import FakeSlack

CHATBOT_ID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"  # a well-formed chatbot id for config-only tests


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The sandbox emulator (key SANDBOX_KEY, chatbot SANDBOX_CHATBOT_ID), started on 127.0.0.1."""
    emu = Emulator.sandbox()
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    """The fake Slack Web API and Socket Mode server, started on 127.0.0.1."""
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.stop()


REQUIRE_REDIS = "INSITECHAT_BRIDGE_REQUIRE_REDIS"  # set by .ci/run: no Redis is a failure there, not a skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _no_redis(reason: str) -> None:
    if os.environ.get(REQUIRE_REDIS):
        pytest.fail(f"{reason} ({REQUIRE_REDIS} is set)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: $REDIS_URL when set, else a redis-server of this test session's own (nothing on disk)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = shutil.which("redis-server")
    if server is None:
        _no_redis("no Redis for the Redis store tests: set REDIS_URL, or put redis-server on PATH")
    assert server is not None
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers_ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                _no_redis(f"redis-server on port {port} did not start (exit status {process.poll()})")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"icbtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
