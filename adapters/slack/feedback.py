"""Pure Slack pieces of 👍 / 👎: the feedback block under an answer, its click values, the reason modal."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.slack.alerts import human_blocks
from bridge.feedback import REASON_LABEL, REASON_LIMIT, REASON_PLACEHOLDER, REASON_TITLE, Vote
from bridge.messages import Conversation

FEEDBACK_ACTION = "insitechat_feedback"  # action_id prefix of the 👍 / 👎 elements
FEEDBACK_BLOCK_ID = "insitechat_feedback"
REASON_CALLBACK = "insitechat_feedback_reason"  # callback_id of the 👎 reason modal
REASON_BLOCK, REASON_INPUT = "reason", "reason_input"

FEEDBACK_BUTTONS = "feedback_buttons"  # slack.feedback_style: Slack's own element, in a context_actions block
PLAIN_BUTTONS = "buttons"  # two plain buttons in an actions block, where that block is not shown


def vote_value(vote: Vote, job_id: str) -> str:
    """A button's value: the vote and the answer's job id, so a click (after a restart too) needs no memory."""
    return f"{vote.value}:{job_id}"


def parse_vote_value(value: str) -> tuple[Vote, str] | None:
    """(vote, job id) from a clicked value; None when it is not one of ours."""
    kind, _, job_id = value.partition(":")
    if kind not in (Vote.UP.value, Vote.DOWN.value) or not job_id.isalnum() or len(job_id) > 64:
        return None
    return Vote(kind), job_id


def feedback_block(job_id: str, style: str = FEEDBACK_BUTTONS) -> dict[str, Any]:
    """👍 / 👎 for one answer: Slack's feedback buttons, or plain buttons with the same values."""
    up, down = vote_value(Vote.UP, job_id), vote_value(Vote.DOWN, job_id)
    if style == PLAIN_BUTTONS:
        return {
            "type": "actions",
            "block_id": FEEDBACK_BLOCK_ID,
            "elements": [
                _button("👍", f"{FEEDBACK_ACTION}:up", up, "This answer helped"),
                _button("👎", f"{FEEDBACK_ACTION}:down", down, "This answer did not help"),
            ],
        }
    return {
        "type": "context_actions",
        "block_id": FEEDBACK_BLOCK_ID,
        "elements": [
            {
                "type": "feedback_buttons",
                "action_id": FEEDBACK_ACTION,
                "positive_button": {
                    "text": {"type": "plain_text", "text": "👍"},
                    "accessibility_label": "This answer helped",
                    "value": up,
                },
                "negative_button": {
                    "text": {"type": "plain_text", "text": "👎"},
                    "accessibility_label": "This answer did not help",
                    "value": down,
                },
            }
        ],
    }


def _button(label: str, action_id: str, value: str, accessibility: str) -> dict[str, Any]:
    return {
        "type": "button",
        "text": {"type": "plain_text", "text": label, "emoji": True},
        "action_id": action_id,
        "value": value,
        "accessibility_label": accessibility,
    }


def answer_blocks(
    text: str, conversation: Conversation, *, chatbot: str, feedback_job: str, style: str
) -> list[dict[str, Any]]:
    """The answer's last part as a section, with "Talk to a human" (for `chatbot`) and 👍 / 👎 under it."""
    if chatbot:
        blocks = human_blocks(text, conversation, chatbot)
    else:
        blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    if feedback_job:
        blocks.append(feedback_block(feedback_job, style))
    return blocks


# --- the 👎 reason modal ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasonTarget:
    """What the modal was opened for (its private_metadata): the answer, and where to thank the voter."""

    job_id: str
    channel: str
    thread: str


def reason_modal(target: ReasonTarget) -> dict[str, Any]:
    """views.open's `view`: one optional text field; submitting it adds the reason to the answer's card."""
    metadata = json.dumps({"job": target.job_id, "channel": target.channel, "thread": target.thread})
    return {
        "type": "modal",
        "callback_id": REASON_CALLBACK,
        "private_metadata": metadata,
        "title": {"type": "plain_text", "text": REASON_TITLE},
        "submit": {"type": "plain_text", "text": "Send"},
        "close": {"type": "plain_text", "text": "Skip"},
        "notify_on_close": True,  # a skipped reason still gets its thanks (view_closed)
        "blocks": [
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "optional": True,
                "label": {"type": "plain_text", "text": REASON_LABEL},
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": REASON_LIMIT,
                    "placeholder": {"type": "plain_text", "text": REASON_PLACEHOLDER},
                },
            }
        ],
    }


def parse_reason(view: Mapping[str, Any]) -> tuple[ReasonTarget, str] | None:
    """(target, reason text) from a view_submission's view; None when it is not our modal's."""
    try:
        metadata = json.loads(str(view.get("private_metadata") or ""))
    except ValueError:
        return None
    if not isinstance(metadata, dict) or parse_vote_value(f"down:{metadata.get('job')}") is None:
        return None
    values = ((view.get("state") or {}).get("values") or {}).get(REASON_BLOCK) or {}
    text = (values.get(REASON_INPUT) or {}).get("value") or ""
    target = ReasonTarget(str(metadata["job"]), str(metadata.get("channel") or ""), str(metadata.get("thread") or ""))
    return target, str(text)
