"""Shared fixtures: fake environments, temp state, the InsiteChat emulator on loopback."""

from __future__ import annotations

CHATBOT_ID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
OTHER_CHATBOT_ID = "11111111-2222-4333-8444-555555555555"
