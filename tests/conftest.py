"""Shared fixtures: the InsiteChat emulator on loopback, used by most integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.emulator import Emulator

CHATBOT_ID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"  # a well-formed chatbot id for config-only tests


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """The sandbox emulator (key SANDBOX_KEY, chatbot SANDBOX_CHATBOT_ID), started on 127.0.0.1."""
    emu = Emulator.sandbox()
    await emu.start()
    yield emu
    await emu.stop()
