"""The Discord adapter's pure helpers: nonces, thread names, token decoding, permission maths."""

from __future__ import annotations

import discord

from adapters.discord import (
    REQUIRED_PERMISSIONS,
    application_id_from_token,
    channel_permissions,
    make_nonce,
    thread_name,
)
from bridge.messages import Conversation, Outbound, OutboundKind
from tests.fakes.discord_api import make_token

CONV = Conversation("discord", "1", "2", "18446744073709551615")


def outbound(
    parts: tuple[str, ...], kind: OutboundKind = OutboundKind.ANSWER, reply_to: str = "18446744073709551615"
) -> Outbound:
    return Outbound(CONV, parts, kind, reply_to=reply_to)


def test_nonce_is_stable_short_and_distinct_per_part_and_kind() -> None:
    answer = outbound(("a", "b"))
    nonces = [make_nonce(answer, i) for i in range(2)]
    assert nonces == [make_nonce(outbound(("different text", "after a crash")), i) for i in range(2)]
    assert len(set(nonces)) == 2 and all(len(n) <= 25 for n in nonces)
    queued = make_nonce(outbound(("queued",), OutboundKind.NOTICE), 0)
    error = make_nonce(outbound(("error",), OutboundKind.NOTICE), 0)
    assert len({nonces[0], queued, error}) == 3 and max(len(queued), len(error)) <= 25
    assert make_nonce(outbound(("a",), reply_to="1364100000000000001"), 0) != nonces[0]
    assert len(make_nonce(outbound(tuple("x" * 1200)), 1199)) <= 25


def test_thread_name_is_the_question_s_first_line_within_100_characters() -> None:
    assert thread_name("  \nHow do **refunds** work?\nmore", "Chat") == "How do refunds work?"
    assert thread_name("", "Chat with Bot") == "Chat with Bot"
    long = thread_name("word " * 60, "x")
    assert len(long) == 100 and long.endswith("…")


def test_application_id_from_the_token() -> None:
    assert application_id_from_token(make_token(1200000000000000002)) == 1200000000000000002
    assert application_id_from_token("not a token") is None
    assert application_id_from_token("") is None


def test_required_permissions_are_exactly_what_the_bot_uses() -> None:
    names = {name for name, on in REQUIRED_PERMISSIONS if on}  # discord.py calls View Channel read_messages
    assert names == {
        "read_messages", "send_messages", "send_messages_in_threads", "create_public_threads",
        "read_message_history", "embed_links",
    }


GUILD = {
    "id": "10", "owner_id": "99",
    "roles": [
        {"id": "10", "permissions": str(discord.Permissions(view_channel=True, send_messages=True).value)},
        {"id": "11", "permissions": str(discord.Permissions(embed_links=True).value)},
        {"id": "12", "permissions": str(discord.Permissions(administrator=True).value)},
    ],
}


def test_permissions_from_roles_and_overwrites() -> None:
    member = {"roles": ["11"]}
    base = channel_permissions(guild=GUILD, member=member, user_id="5", overwrites=[])
    assert base.view_channel and base.send_messages and base.embed_links and not base.create_public_threads
    deny_role = [{"id": "11", "type": 0, "allow": "0", "deny": str(discord.Permissions(send_messages=True).value)}]
    assert not channel_permissions(guild=GUILD, member=member, user_id="5", overwrites=deny_role).send_messages
    allow_member = [
        *deny_role,
        {"id": "5", "type": 1, "allow": str(discord.Permissions(send_messages=True).value), "deny": "0"},
    ]
    assert channel_permissions(guild=GUILD, member=member, user_id="5", overwrites=allow_member).send_messages
    hide_everyone = [{"id": "10", "type": 0, "allow": "0", "deny": str(discord.Permissions(view_channel=True).value)}]
    assert not channel_permissions(guild=GUILD, member=member, user_id="5", overwrites=hide_everyone).view_channel


def test_administrators_and_owners_may_do_everything() -> None:
    hide = [{"id": "10", "type": 0, "allow": "0", "deny": str(discord.Permissions(view_channel=True).value)}]
    assert channel_permissions(guild=GUILD, member={"roles": ["12"]}, user_id="5", overwrites=hide).view_channel
    assert channel_permissions(guild=GUILD, member={"roles": []}, user_id="99", overwrites=hide).view_channel


def test_start_failures_say_whether_another_try_can_help() -> None:
    from types import SimpleNamespace

    from adapters.discord.setup import DiscordRefused, DiscordStartError, describe_failure
    from bridge.ports import PlatformRefused

    def closed(code: int) -> discord.ConnectionClosed:
        return discord.ConnectionClosed(SimpleNamespace(close_code=code), shard_id=None)  # type: ignore[arg-type]

    refused = [discord.LoginFailure("Improper token has been passed."), closed(4004), closed(4014),
               discord.PrivilegedIntentsRequired(None)]
    for exc in refused:
        assert isinstance(describe_failure(exc, 60), DiscordRefused), exc
        assert isinstance(describe_failure(exc, 60), PlatformRefused)
    transient = [None, closed(4011), closed(1006), OSError("Connect call failed"), ValueError("bad frame")]
    for exc in transient:
        failure = describe_failure(exc, 60)
        assert isinstance(failure, DiscordStartError) and not isinstance(failure, PlatformRefused), exc
    assert str(describe_failure(closed(4011), 60)) == "Discord closed the gateway connection (code 4011)"
