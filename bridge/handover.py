"""Handing a conversation over to a person: when "Talk to a human" is offered, and what a click does."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from bridge.config import ReplyMode, Settings
from bridge.desk import AlertDesk
from bridge.messages import Conversation

log = logging.getLogger(__name__)


class HandOverResult(enum.Enum):
    """What a click on "Talk to a human" came to; each has one text that the person who clicked reads."""

    RAISED = "raised"  # an alert went to the team; the bot is quiet in the conversation until "resume"
    ALREADY_RAISED = "already-raised"  # a double click, or a second person: the open request stands
    UNAVAILABLE = "unavailable"  # no escalation route for the chatbot (or no alert desk): nobody to hand to
    STALE = "stale"  # not a button for this place (moved, or the config no longer routes it here)
    FAILED = "failed"  # the request could not be recorded; clicking again may work


# What the person reads, the same on every platform; `resume` is a command word of the relay.
TEXTS = {
    HandOverResult.RAISED: "I've asked the team: someone will reply here. "
    "I'll stay quiet in this thread until then; say `resume` to bring me back.",
    HandOverResult.ALREADY_RAISED: "The team has already been asked and will reply here. "
    "Say `resume` to bring me back.",
    HandOverResult.UNAVAILABLE: "Handing over to a person isn't set up for this chatbot. "
    "An admin can route escalations in the bridge's config.",
    HandOverResult.STALE: "This button no longer works. Mention me and ask again.",
    HandOverResult.FAILED: "Something went wrong while recording that. Please try again.",
}
# In a DM nobody from the team can write in the conversation itself: they get in touch instead.
RAISED_IN_DM = (
    "I've asked the team: someone will get back to you. I'll stay quiet here until then; say `resume` to bring me back."
)


@dataclass(frozen=True)
class HandOver:
    """A click's result; `alert_id` is the alert raised (or already open) for it."""

    result: HandOverResult
    alert_id: str = ""

    def text(self, *, is_dm: bool) -> str:
        """What the person who clicked reads."""
        if self.result is HandOverResult.RAISED and is_dm:
            return RAISED_IN_DM
        return TEXTS[self.result]


class HandOvers:
    """The one place that decides about "Talk to a human", for every platform.

    The relay asks `offered` before it stores an answer; an adapter turns a click into
    `request` and shows the result's text. Adapters never look at routes themselves.
    """

    def __init__(self, settings: Settings, desk: AlertDesk | None) -> None:
        self._settings = settings
        self._desk = desk

    def offered(self, conversation: Conversation, chatbot: str, *, is_dm: bool) -> bool:
        """Whether an answer in this conversation carries the button: the route wants it and escalations have a place.

        Offered in DMs too: the alert names who asked, so the team can get back to them.
        """
        route = self._settings.route_for(conversation.platform, conversation.workspace, conversation.channel, is_dm)
        return (
            self._desk is not None
            and route is not None
            and route.human_button
            and route.chatbot == chatbot
            and self._desk.has_human_route(chatbot)
        )

    async def request(self, chatbot: str, conversation: Conversation, who: str, *, is_dm: bool) -> HandOver:
        """A click on the button under an answer in `conversation`, naming `chatbot`, by `who`."""
        route = self._settings.route_for(conversation.platform, conversation.workspace, conversation.channel, is_dm)
        if route is None or route.reply is ReplyMode.OFF or route.chatbot != chatbot:
            # The route moved on (another chatbot, switched off): the button speaks for something gone.
            return HandOver(HandOverResult.STALE)
        desk = self._desk
        if desk is None or not route.human_button or not desk.has_human_route(chatbot):
            return HandOver(HandOverResult.UNAVAILABLE)
        try:
            if await desk.paused(conversation):
                return HandOver(HandOverResult.ALREADY_RAISED)
            alert = await desk.request_human(chatbot, conversation, who)
        except Exception:
            log.exception("talk-to-a-human in %s could not be recorded", conversation.key)
            return HandOver(HandOverResult.FAILED)
        if alert is None:
            return HandOver(HandOverResult.FAILED)
        log.info("talk-to-a-human in %s raised alert %s", conversation.key, alert.id)
        return HandOver(HandOverResult.RAISED, alert.id)
