"""Slack interactions: the slash command, and button clicks (alert Claim / Resolve, "Talk to a human", 👍 / 👎)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.alerts import (
    ACTION_FAILED,
    ALERT_GONE,
    ALERTS_OFF,
    HUMAN_ACTION,
    Click,
    click_of,
    is_dm_channel,
    parse_human_value,
    without_human_button,
)
from adapters.slack.delivery import quietly
from adapters.slack.feedback import (
    FEEDBACK_ACTION,
    REASON_CALLBACK,
    ReasonTarget,
    parse_reason,
    parse_vote_value,
    reason_modal,
)
from adapters.slack.setup import NETWORK_ERRORS, error_code
from adapters.slack.translate import (
    PLATFORM,
    BotIdentity,
    command_echo,
    command_inbound,
    parse_command,
)
from bridge.cards import ACTION_PREFIX, parse_action_id
from bridge.clock import Clock
from bridge.config import SlackSettings
from bridge.desk import AlertDesk
from bridge.feedback import STALE_TEXT, Feedback, Vote, VoteResult, thanks_for
from bridge.handover import HandOver, HandOverResult, HandOvers
from bridge.messages import Inbound
from bridge.relay import NOTICES
from bridge.store import StoreError

log = logging.getLogger(__name__)

USAGE = "Ask the chatbot a question: `{command} <question>`. `{command} reset` in a DM starts a new conversation."
RESET_IN_CHANNEL = (
    "To start a new conversation here, reply `reset` in the thread you want to restart "
    "(mention me if I'm not following it). In a DM with me, `{command} reset` works too."
)
NO_ROUTE = "I'm not set up to answer here. An admin can add a route for this channel in the bridge's config."
NOT_IN_CHANNEL = "I can't post in this channel yet: invite me with `/invite @{bot}` and ask again."
POST_FAILED = "I couldn't post your question here ({error}). Please try again in a moment."
# Slack wants the ack within 3 s. The question's post and its job come first, so that an ack
# means it is stored (Slack never sends the command again); past this, the ack goes out
# first and the user hears through the response URL if storing it then fails.
BEFORE_ACK = 2.0


# Whether the bot answers in a place: (platform, workspace, channel, is_dm) -> bool (Relay.serves).
Serves = Callable[[str, str, str, bool], bool]


@dataclass
class BotUser:
    """Who the bot is on Slack, known once auth.test answered at start."""

    me: BotIdentity | None = None
    name: str = ""  # the bot user's handle, for "/invite @name" hints


class SlackInteractions:
    """The slash command and button clicks: each acknowledges first, as Slack retries what waits over 3 s.

    Decisions are the core's: whether a place is served (`serves`), what a click on
    "Talk to a human" does (`handovers`), Claim and Resolve (`desk`).
    """

    def __init__(
        self,
        client: AsyncWebClient,
        config: SlackSettings,
        bot: BotUser,
        accept: Callable[[Inbound], Awaitable[object]],
        *,
        clock: Clock,
        serves: Serves | None = None,
        handovers: HandOvers | None = None,
        desk: AlertDesk | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        self._client = client
        self._feedback = feedback
        self._slack = config
        self._bot = bot
        self._accept = accept
        self._clock = clock
        self._serves = serves
        self._handovers = handovers
        self._desk = desk

    def register(self, app: AsyncApp) -> None:
        """Attach the handlers to Bolt's app."""
        app.command(self._slack.command)(self._on_command)
        app.action(re.compile("^" + re.escape(ACTION_PREFIX) + ":"))(self._on_alert_button)
        app.action(HUMAN_ACTION)(self._on_human_button)
        app.action(re.compile("^" + re.escape(FEEDBACK_ACTION) + "(:|$)"))(self._on_vote)
        app.view(REASON_CALLBACK)(self._on_reason)
        app.view_closed(REASON_CALLBACK)(self._on_reason_skipped)

    async def _on_command(
        self, ack: Callable[..., Awaitable[None]], command: dict[str, Any], respond: Callable[..., Awaitable[Any]]
    ) -> None:
        me = self._bot.me
        if me is None:
            await ack(text="Starting up, please try again in a moment.")
            return
        cmd = parse_command(command, me)
        name = self._slack.command
        if cmd.action == "usage":
            await ack(text=USAGE.format(command=name))  # an ack with text is shown to the user only
            return
        if cmd.action == "reset" and not cmd.is_dm:
            await ack(text=RESET_IN_CHANNEL.format(command=name))
            return
        # Asked before the ack: where the bot does not answer, the relay would stay silent,
        # and only the ack can still tell the user why.
        if self._serves is not None and not self._serves(PLATFORM, cmd.workspace, cmd.channel, cmd.is_dm):
            await ack(text=NO_ROUTE)
            return
        acked = False

        async def tell(text: str) -> None:
            # Before the ack, its text is the reply (shown to the user only); after it, the response URL.
            if not acked:
                await ack(text=text)
                return
            with suppress(Exception):
                await respond(text=text, response_type="ephemeral")

        async def ack_at_the_deadline(work: Awaitable[Any]) -> Any:
            nonlocal acked
            step = asyncio.ensure_future(work)
            if not acked:
                remaining = BEFORE_ACK - (self._clock.monotonic() - started)
                done, _ = await asyncio.wait({step}, timeout=max(0.0, remaining))
                if not done:
                    acked = True
                    await ack()
            return await step

        started = self._clock.monotonic()
        if cmd.action == "reset":
            # The relay resets the DM conversation and confirms in the DM.
            trigger = str(command.get("trigger_id") or "") or f"{self._clock.time():.6f}"
            inbound = command_inbound(cmd, f"cmd-{trigger}")
        else:
            try:
                posted = await ack_at_the_deadline(
                    self._client.chat_postMessage(
                        channel=cmd.channel, text=command_echo(cmd), unfurl_links=False, unfurl_media=False
                    )
                )
            except (SlackApiError, *NETWORK_ERRORS) as exc:
                code = error_code(exc)
                log.warning("posting the %s question in %s failed: %s", name, cmd.channel, code)
                await tell(
                    NOT_IN_CHANNEL.format(bot=self._bot.name or "InsiteChat")
                    if code in ("not_in_channel", "channel_not_found")
                    else POST_FAILED.format(error=code)
                )
                return
            # The question's root post is the message answered: the answer lands in its thread.
            inbound = command_inbound(cmd, str(posted["ts"]))
        try:
            await ack_at_the_deadline(self._accept(inbound))
        except StoreError as exc:
            log.error("slack: the %s question %s could not be stored: %s", name, inbound.dedupe_key, exc)
            await tell(NOTICES["not_stored"])
            return
        if not acked:
            await ack()

    # --- buttons -------------------------------------------------------------------------------

    async def _on_alert_button(
        self,
        ack: Callable[..., Awaitable[None]],
        body: dict[str, Any],
        action: dict[str, Any],
        respond: Callable[..., Awaitable[Any]],
    ) -> None:
        """Claim / Resolve on an alert card: the desk records it and queues the card updates."""
        await ack()  # at once: the desk and the card updates take longer than Slack waits
        click = click_of(body)
        parsed = parse_action_id(str(action.get("action_id") or ""))
        if parsed is None or not click.user:
            return
        verb, alert_id = parsed
        if self._desk is None:
            await self._tell(click, respond, ALERTS_OFF)
            return
        who = f"<@{click.user}>"
        try:
            alert = await self._desk.act(alert_id, verb, who)
        except Exception:
            log.exception("recording %s of alert %s failed", verb, alert_id)
            await self._tell(click, respond, ACTION_FAILED)
            return
        if alert is None:
            await self._tell(click, respond, ALERT_GONE)
        elif taken := AlertDesk.taken_by_someone_else(alert, verb, who):
            await self._tell(click, respond, taken)

    async def _on_human_button(
        self,
        ack: Callable[..., Awaitable[None]],
        body: dict[str, Any],
        action: dict[str, Any],
        respond: Callable[..., Awaitable[Any]],
    ) -> None:
        """"Talk to a human" under an answer: the core raises the hand-over; the person reads its result."""
        await ack()
        click = click_of(body)
        target = parse_human_value(str(action.get("value") or ""))
        if not click.user:
            return
        is_dm = is_dm_channel(click.channel)
        if target is None or target[1].channel != click.channel:
            # Only our own buttons, and only for the conversation they sit in.
            await self._tell(click, respond, HandOver(HandOverResult.STALE).text(is_dm=is_dm))
            return
        chatbot, conversation = target
        who = f"<@{click.user}>"
        if self._handovers is None:
            outcome = HandOver(HandOverResult.UNAVAILABLE)
        else:
            outcome = await self._handovers.request(chatbot, conversation, who, is_dm=is_dm)
        text = outcome.text(is_dm=is_dm)
        if outcome.result is not HandOverResult.RAISED:
            await self._tell(click, respond, text)
            return
        thread = conversation.thread or click.thread_ts
        try:
            await self._client.chat_postMessage(
                channel=conversation.channel, text=text, thread_ts=thread or None, unfurl_links=False
            )
        except (SlackApiError, *NETWORK_ERRORS) as exc:
            log.warning(
                "posting the talk-to-a-human confirmation in %s failed: %s", conversation.channel, error_code(exc)
            )
            await self._tell(click, respond, text)
        if click.message_ts:
            # The button gives way to who asked, so nobody clicks it again.
            await quietly(
                "chat.update",
                self._client.chat_update(
                    channel=click.channel,
                    ts=click.message_ts,
                    text=click.message_text or text,
                    blocks=without_human_button(click.message_blocks, who),
                ),
            )

    # --- 👍 / 👎 ------------------------------------------------------------------------------------

    async def _on_vote(
        self,
        ack: Callable[..., Awaitable[None]],
        body: dict[str, Any],
        action: dict[str, Any],
        respond: Callable[..., Awaitable[Any]],
    ) -> None:
        """👍 / 👎 under an answer: the core records the vote (a 👎 raises the flagged card); the voter is thanked.

        A 👎 opens the reason modal first: its trigger_id is good for 3 seconds only.
        """
        await ack()
        click = click_of(body)
        parsed = parse_vote_value(str(action.get("value") or ""))
        if not click.user:
            return
        if parsed is None or self._feedback is None:
            await self._tell(click, respond, STALE_TEXT)
            return
        vote, job_id = parsed
        modal_open = False
        if vote is Vote.DOWN:
            modal_open = await self._open_reason_modal(body, ReasonTarget(job_id, click.channel, click.thread_ts))
        outcome = await self._feedback.vote(job_id, click.user, vote, platform=PLATFORM, who=_name_of(body))
        if vote is Vote.UP or not modal_open or outcome.result in (VoteResult.STALE, VoteResult.FAILED):
            # The modal is the 👎's visible answer; without one (or on a failure) the voter reads it here.
            await self._tell(click, respond, outcome.text)

    async def _open_reason_modal(self, body: dict[str, Any], target: ReasonTarget) -> bool:
        trigger = str(body.get("trigger_id") or "")
        if not trigger:
            return False
        try:
            await self._client.views_open(trigger_id=trigger, view=reason_modal(target))
        except (SlackApiError, *NETWORK_ERRORS) as exc:
            log.warning("opening the reason modal for a 👎 failed: %s", error_code(exc))
            return False
        return True

    async def _on_reason(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any], view: dict[str, Any]) -> None:
        """The 👎 modal submitted (its field is optional): the reason joins the vote and the answer's card."""
        await ack()  # closes the modal
        parsed = parse_reason(view)
        user = str((body.get("user") or {}).get("id") or "")
        if parsed is None or not user or self._feedback is None:
            return
        target, text = parsed
        outcome = await self._feedback.reason(target.job_id, user, text, platform=PLATFORM, who=_name_of(body))
        said = outcome.text if outcome.result in (VoteResult.STALE, VoteResult.FAILED) else thanks_for(text)
        if target.channel:
            click = Click(user, target.channel, "", target.thread, "", [])
            await self._tell(click, None, said)

    async def _on_reason_skipped(
        self, ack: Callable[..., Awaitable[None]], body: dict[str, Any], view: dict[str, Any]
    ) -> None:
        """The 👎 modal closed without a reason: the 👎 stands (recorded at the click); the voter is thanked for it."""
        await ack()
        parsed = parse_reason(view)
        user = str((body.get("user") or {}).get("id") or "")
        if parsed is not None and user and parsed[0].channel:
            target = parsed[0]
            await self._tell(Click(user, target.channel, "", target.thread, "", []), None, thanks_for(""))

    async def _tell(self, click: Click, respond: Callable[..., Awaitable[Any]] | None, text: str) -> None:
        """A message only the clicking user sees: through the response URL, else chat.postEphemeral."""
        try:
            if respond is not None and getattr(respond, "response_url", None):
                await respond(text=text, response_type="ephemeral", replace_original=False)
            else:
                await self._client.chat_postEphemeral(
                    channel=click.channel, user=click.user, text=text, thread_ts=click.thread_ts or None
                )
        except Exception as exc:  # the click is recorded (or not) already; this is a courtesy
            log.warning("telling %s about a button click failed: %s", click.user, error_code(exc))


def _name_of(body: dict[str, Any]) -> str:
    """How a card names the person who clicked: their Slack name, never a mention (a post would ping them)."""
    user = body.get("user") or {}
    return str(user.get("username") or user.get("name") or user.get("id") or "")
