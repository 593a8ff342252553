"""Pure Discord pieces of 👍 / 👎: the buttons under an answer, their custom ids, the reason modal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import discord

from adapters.discord.alerts import HUMAN_LABEL, HUMAN_PREFIX, human_custom_id, view_of
from bridge.feedback import REASON_LABEL, REASON_LIMIT, REASON_PLACEHOLDER, REASON_TITLE, Vote

VOTE_PREFIX = "insitechat_vote"  # custom_id "insitechat_vote:<up|down>:<job id>" under an answer
REASON_PREFIX = "insitechat_reason"  # the 👎 modal's custom_id "insitechat_reason:<job id>"
REASON_FIELD = "reason"
_ID_LIMIT = 100  # Discord's custom_id length


def vote_custom_id(vote: Vote, job_id: str) -> str:
    return f"{VOTE_PREFIX}:{vote.value}:{job_id}"[:_ID_LIMIT]


def parse_vote_id(custom_id: str) -> tuple[Vote, str] | None:
    """(vote, job id) from a clicked button's custom_id; None for other buttons."""
    prefix, _, rest = custom_id.partition(":")
    kind, _, job_id = rest.partition(":")
    if prefix != VOTE_PREFIX or kind not in (Vote.UP.value, Vote.DOWN.value) or not job_id.isalnum():
        return None
    return Vote(kind), job_id


def answer_view(chatbot: str, feedback_job: str) -> discord.ui.View | None:
    """One row under an answer's last part: "Talk to a human" (for `chatbot`), 👍 and 👎 (for `feedback_job`)."""
    buttons: list[dict[str, Any]] = []
    if chatbot:
        buttons.append({"type": 2, "style": 2, "label": HUMAN_LABEL, "custom_id": human_custom_id(chatbot)})
    if feedback_job:
        buttons += [
            {"type": 2, "style": 2, "label": "👍", "custom_id": vote_custom_id(Vote.UP, feedback_job)},
            {"type": 2, "style": 2, "label": "👎", "custom_id": vote_custom_id(Vote.DOWN, feedback_job)},
        ]
    return view_of([{"type": 1, "components": buttons}]) if buttons else None


def without_human_button(message: discord.Message | None) -> discord.ui.View | None:
    """The answer's buttons once "Talk to a human" was pressed: 👍 / 👎 stay, the hand-over goes."""
    if message is None:
        return None
    rows = [
        {"type": 1, "components": [b.to_dict() for b in row.children if not _is_human(b)]}
        for row in message.components
        if isinstance(row, discord.ActionRow)
    ]
    return view_of(rows)


def _is_human(component: discord.Component) -> bool:
    custom_id = getattr(component, "custom_id", None) or ""
    return str(custom_id).startswith(HUMAN_PREFIX + ":")


def reason_modal(job_id: str) -> discord.ui.Modal:
    """The 👎 reason modal: one optional paragraph. Stopped, so discord.py keeps nothing waiting for it:
    its submission arrives as an interaction and is matched by custom_id, also after a restart."""
    modal = discord.ui.Modal(title=REASON_TITLE, custom_id=f"{REASON_PREFIX}:{job_id}"[:_ID_LIMIT], timeout=None)
    modal.add_item(
        discord.ui.TextInput(
            label=REASON_LABEL,
            style=discord.TextStyle.paragraph,
            custom_id=REASON_FIELD,
            required=False,
            max_length=REASON_LIMIT,
            placeholder=REASON_PLACEHOLDER,
        )
    )
    modal.stop()
    return modal


def parse_reason(data: Mapping[str, Any]) -> tuple[str, str] | None:
    """(job id, reason) from a modal submission's data; None when it is not our modal.

    The text input comes in an action row (type 1) or, in newer clients, a label (type 18).
    """
    prefix, _, job_id = str(data.get("custom_id") or "").partition(":")
    if prefix != REASON_PREFIX or not job_id.isalnum():
        return None
    text = ""
    for row in data.get("components") or []:
        label = row.get("component")
        for item in [*(row.get("components") or []), *([label] if isinstance(label, dict) else [])]:
            if item.get("custom_id") == REASON_FIELD:
                text = str(item.get("value") or "")
    return job_id, text
