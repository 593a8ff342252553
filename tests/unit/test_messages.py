"""Neutral messages: conversation keys and session ids."""

from __future__ import annotations

import pytest

from bridge.messages import Conversation, Inbound, is_bridge_session


def inbound(**kw: object) -> Inbound:
    base = dict(platform="slack", workspace="T1", channel="C1", message_id="100.1", author_id="U1", text="hi")
    base.update(kw)
    return Inbound(**base)  # type: ignore[arg-type]


def test_channel_message_roots_its_own_thread() -> None:
    assert inbound().conversation == Conversation("slack", "T1", "C1", "100.1")
    assert not inbound().in_thread


def test_thread_reply_belongs_to_the_thread() -> None:
    msg = inbound(message_id="200.2", thread="100.1")
    assert msg.in_thread
    assert msg.conversation == Conversation("slack", "T1", "C1", "100.1")


def test_dm_is_one_conversation() -> None:
    a = inbound(is_dm=True, channel="D1", message_id="1")
    b = inbound(is_dm=True, channel="D1", message_id="2")
    assert a.conversation == b.conversation
    assert a.dedupe_key != b.dedupe_key


def test_session_ids_are_deterministic_short_and_recognisable() -> None:
    conv = Conversation("slack", "T1", "C1", "100.1")
    assert conv.session_id() == conv.session_id(0)
    assert conv.session_id(0) != conv.session_id(1)
    assert is_bridge_session(conv.session_id())
    long_conv = Conversation("discord", "1" * 60, "2" * 60, "3" * 60)
    sid = long_conv.session_id()
    assert len(sid) <= 100 and sid.isascii() and is_bridge_session(sid)
    assert sid != Conversation("discord", "1" * 60, "2" * 60, "4" * 60).session_id()
    assert not is_bridge_session("visitor-session-1")


def test_conversation_key_round_trips_and_rejects_other_text() -> None:
    for conv in (
        Conversation("slack", "T1", "C1", "100.1"),
        Conversation("discord", "", "D7", ""),
        Conversation("console", "", "console"),
    ):
        assert Conversation.from_key(conv.key) == conv
    for bad in ("", "slack:T1:C1", "slack:T1::1", ":T1:C1:1", "a:b:c:d:e"):
        with pytest.raises(ValueError):
            Conversation.from_key(bad)
