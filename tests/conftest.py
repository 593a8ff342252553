"""Shared fixtures: the InsiteChat emulator and the fake Slack on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
