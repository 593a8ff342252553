"""Slack posting pieces: the metadata mark on each part, which refusals are final, and calls that may fail quietly."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError

from adapters.slack.setup import NETWORK_ERRORS, SlackError, error_code
from bridge.ports import PermanentSendError

log = logging.getLogger(__name__)

DELIVERY_EVENT_TYPE = "insitechat_delivery"  # message metadata event_type of every part the outbox posts

# chat.postMessage (and conversations.*) refusals that the same call will meet again, however
# long the outbox waits: the channel is gone or archived, the bot was removed or its token
# revoked, or the content itself is refused. Everything else (ratelimited, internal_error,
# fatal_error, 5xx, network errors, missing_scope, which an admin fixes without a restart)
# is worth trying again.
PERMANENT_CODES = frozenset({
    "channel_not_found",
    "is_archived",
    "not_in_channel",
    "account_inactive",
    "invalid_auth",
    "not_authed",
    "token_revoked",
    "token_expired",
    "team_access_not_granted",
    "messages_tab_disabled",  # a DM with the bot, after its Messages tab was switched off
    "cannot_reply_to_message",
    "msg_too_long",  # the same text is too long on every try
    "no_text",
    "invalid_blocks",
    "invalid_blocks_format",
    "invalid_metadata_format",
    "invalid_metadata_schema",
    "metadata_too_large",
})
PERMANENT_PREFIXES = ("restricted_action",)  # restricted_action, _read_only_channel, _thread_locked ...


class SlackPostRefused(SlackError, PermanentSendError):
    """Slack refused a post (or the search before it) for good, see PERMANENT_CODES; plain words, never a token."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code  # Slack's error code: what the asker is told


def refusal_notice(code: str, bot_name: str) -> str:
    """What the asker reads (only they) when their answer could not be posted, by Slack's reason."""
    if code.startswith("restricted_action"):
        reason = "only some members may post in this channel"
    elif code in ("not_in_channel", "channel_not_found"):
        reason = f"I'm not a member of this channel: invite me with /invite @{bot_name or 'InsiteChat'}"
    elif code == "is_archived":
        reason = "this channel is archived"
    else:
        reason = f"Slack refused it ({code or 'unknown reason'})"
    return f"I couldn't post my answer here: {reason}. You can ask me in a direct message instead."


def is_permanent(exc: BaseException) -> bool:
    """True when Slack's answer means the call can never succeed as it is."""
    if not isinstance(exc, SlackApiError):
        return False  # network errors and timeouts: Slack may be back in a minute
    try:
        status = int(exc.response.status_code)
    except (AttributeError, TypeError, ValueError):
        status = 0
    if status == 429 or status >= 500:
        return False
    code = error_code(exc)
    return code in PERMANENT_CODES or code.startswith(PERMANENT_PREFIXES)


def send_error(message: str, exc: Exception) -> SlackError:
    """The error a send raises for `exc`: SlackPostRefused when final, else a SlackError to retry later."""
    return SlackPostRefused(message, error_code(exc)) if is_permanent(exc) else SlackError(message)


# --- the mark on each posted part -----------------------------------------------------------


@dataclass(frozen=True)
class PartMark:
    """What a posted part says about itself: which delivery, which part of how many."""

    key: str
    part: int  # 1-based
    parts: int


def marked_payload(message: Mapping[str, Any], event_type: str) -> Mapping[str, Any] | None:
    """The metadata event_payload of a message, when its event_type is `event_type`."""
    metadata = message.get("metadata")
    if not isinstance(metadata, Mapping) or metadata.get("event_type") != event_type:
        return None
    payload = metadata.get("event_payload")
    return payload if isinstance(payload, Mapping) else None


def part_metadata(key: str, part: int, parts: int) -> dict[str, Any]:
    """chat.postMessage `metadata` for part `part` of `parts` of the delivery `key`."""
    return {"event_type": DELIVERY_EVENT_TYPE, "event_payload": {"key": key, "part": part, "parts": parts}}


def part_mark(message: Mapping[str, Any]) -> PartMark | None:
    """The mark part_metadata left on a message, or None when it has none (or a damaged one)."""
    payload = marked_payload(message, DELIVERY_EVENT_TYPE)
    if payload is None:
        return None
    key, part, parts = payload.get("key"), payload.get("part"), payload.get("parts")
    if not isinstance(key, str) or type(part) is not int or type(parts) is not int:
        return None
    return PartMark(key, part, parts)


async def quietly(method: str, call: Awaitable[Any], harmless: tuple[str, ...] = ()) -> None:
    """Await a courtesy call (a reaction, a status, a button taken away): its failures are logged, never raised."""
    try:
        await call
    except SlackApiError as exc:
        code = error_code(exc)
        if code in harmless:
            log.debug("%s: %s", method, code)
        else:
            log.warning("%s failed: %s", method, code)
    except NETWORK_ERRORS as exc:
        log.warning("%s failed: %s", method, error_code(exc))
