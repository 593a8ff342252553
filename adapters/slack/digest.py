"""The weekly report digest in Slack: Block Kit fields per chatbot, charts uploaded into its thread."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.delivery import marked_payload, send_error
from adapters.slack.formatting import neutralise_slack, slack_escape
from adapters.slack.setup import NETWORK_ERRORS, SlackError, error_code
from bridge.charts import Chart
from bridge.report import Report, figure_lines, window_text

log = logging.getLogger(__name__)

DIGEST_EVENT_TYPE = "insitechat_digest"  # message metadata event_type of every digest
TITLE = "Weekly InsiteChat report"
MAX_CHATBOTS = 15  # three blocks each: 2 + 45 + 1 within Block Kit's 50 per message


def digest_metadata(key: str) -> dict[str, Any]:
    """chat.postMessage `metadata`: the outbox delivery key, so the digest is found after a crash."""
    return {"event_type": DIGEST_EVENT_TYPE, "event_payload": {"key": key}}


def digest_key(message: Mapping[str, Any]) -> str | None:
    payload = marked_payload(message, DIGEST_EVENT_TYPE)
    key = payload.get("key") if payload is not None else None
    return key if isinstance(key, str) else None


def _plain(text: str) -> str:
    """Config text (a chatbot's name) as inert mrkdwn: no control characters, no pings."""
    return neutralise_slack(slack_escape(text))


def digest_message(report: Report) -> tuple[str, list[dict[str, Any]]]:
    """(the notification text, the blocks): a header, the window, then each chatbot's figures as section fields."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"📊 {TITLE}"}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _plain(window_text(report))}]},
    ]
    if not report.chatbots:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": "Nothing happened this week: no answers or alerts."}}
        )
    for bot in report.chatbots[:MAX_CHATBOTS]:
        fields = [{"type": "mrkdwn", "text": f"*{label}*\n{_plain(value)}"} for label, value in figure_lines(bot)]
        blocks += [
            {"type": "divider"},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_plain(bot.label)}*"[:3000]}},
            {"type": "section", "fields": fields[:10]},  # Block Kit: at most 10 fields
        ]
    hidden = len(report.chatbots) - MAX_CHATBOTS
    if hidden > 0:
        more = f"…and {hidden} more chatbot(s): run `insitechat-bridge report` for all of them."
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    total = sum(bot.questions for bot in report.chatbots)
    text = f"{TITLE}: {total} question(s) answered, {window_text(report)}"
    return text, blocks


class SlackDigests:
    """Posts the digest through the adapter's Web API client."""

    def __init__(self, client: AsyncWebClient) -> None:
        self._client = client

    async def post(self, channel: str, report: Report, charts: Sequence[Chart], *, key: str) -> str:
        """chat.postMessage with the delivery key in the metadata, then the charts in its thread; returns its ts.

        The charts are an extra: a failed upload (no files:write scope, Slack down) is logged and
        not retried, since the digest itself is out and a retry would post it twice.
        """
        text, blocks = digest_message(report)
        try:
            response = await self._client.chat_postMessage(
                channel=channel, text=text, blocks=blocks, metadata=digest_metadata(key),
                unfurl_links=False, unfurl_media=False,
            )
        except (SlackApiError, *NETWORK_ERRORS) as exc:
            raise send_error(f"posting the report digest to {channel} failed ({error_code(exc)})", exc) from None
        ts = str(response.get("ts") or "")
        if not ts:
            raise SlackError(f"posting the report digest to {channel}: Slack answered without a message ts")
        if charts:
            await self._attach(channel, ts, charts)
        return ts

    async def _attach(self, channel: str, ts: str, charts: Sequence[Chart]) -> None:
        uploads = [{"file": c.png, "filename": c.filename, "title": c.title, "alt_txt": c.title} for c in charts]
        try:
            await self._client.files_upload_v2(file_uploads=uploads, channel=channel, thread_ts=ts)
        except (SlackClientError, *NETWORK_ERRORS) as exc:
            code = error_code(exc)
            hint = " (the bot needs the files:write scope)" if code == "missing_scope" else ""
            log.warning("slack: the digest in %s went out without its charts: %s%s", channel, code, hint)
