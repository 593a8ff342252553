"""Slack's assistant view (slack.assistant): greeting, prompts, thread titles, and the status as working signal."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.delivery import quietly
from adapters.slack.formatting import to_slack
from adapters.slack.setup import NETWORK_ERRORS, error_code
from bridge.config import SlackSettings, SuggestedPrompt
from bridge.messages import Inbound
from bridge.store import DAY, Records, StoreError

log = logging.getLogger(__name__)

# The suggested prompts for the assistant thread opened in a DM channel: (workspace, channel) -> prompts,
# or None when no route answers Slack DMs there (Settings.assistant_prompts).
PromptsFor = Callable[[str, str], "tuple[SuggestedPrompt, ...] | None"]

NOT_SERVED = (
    "I'm not set up to answer in direct messages yet. An admin can add a route with `channel: dm` "
    "to the bridge's config."
)
TITLE_LIMIT = 60  # characters of the first question that name the thread in the assistant's history
# Store kind: "channel:thread ts" -> True while an assistant thread opened and awaits its first
# question, False once a replica took it to name the thread. Shared, because Slack sends a
# thread's opening and its first question to any of the app's connections (several replicas).
UNTITLED = "assistant-untitled"
UNTITLED_TTL = DAY
REMEMBERED = 4096  # threads awaiting their title, and places where the status was refused, kept at most

# Refusals of assistant.threads.setStatus that hold for every place: the app cannot show a status at all
# (a missing scope, a token or workspace without the feature). Slack's other refusals concern one place.
APP_REFUSALS = frozenset({
    "missing_scope",
    "not_allowed_token_type",
    "no_permission",
    "access_denied",
    "method_deprecated",
    "unknown_method",
    "feature_not_enabled",
    "team_not_enabled",
    "not_authed",
    "invalid_auth",
    "account_inactive",
    "token_revoked",
    "token_expired",
})
# Answers that say nothing about the place: the next answer tries the status again.
PASSING_ERRORS = frozenset({"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"})


def _untitled_key(place: tuple[str, str]) -> str:
    """The UNTITLED record's key of a thread: "channel:thread ts"."""
    return f"{place[0]}:{place[1]}"


def thread_title(question: str, limit: int = TITLE_LIMIT) -> str:
    """A short title from a question: its first line, spaces collapsed, cut at a word with "…"."""
    line = next((part for part in question.splitlines() if part.strip()), "")
    line = " ".join(line.split())
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.;:-") + "…"


class Shown(enum.Enum):
    """Which working signal went up for one answer."""

    STATUS = "status"
    REACTION = "reaction"


@dataclass(eq=False)  # each answer's own: compared (and hashed) by identity
class StatusWatch:
    """One answer's status: whether the bridge has posted in its thread since it was up (Slack then cleared it)."""

    place: tuple[str, str]  # (channel, thread ts)
    up: bool = False  # Slack acknowledged the status
    replied: bool = False  # a post sent after that went through: Slack cleared the status with it


@dataclass
class _Bounded:
    """A set that forgets its oldest members past `size`: memory stays flat however long the bridge runs."""

    size: int = REMEMBERED
    items: OrderedDict[Any, None] = field(default_factory=OrderedDict)

    def add(self, item: Any) -> None:
        self.items[item] = None
        self.items.move_to_end(item)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def __contains__(self, item: Any) -> bool:
        return item in self.items

    def take(self, item: Any) -> bool:
        """Remove `item`; True when it was there."""
        if item not in self.items:
            return False
        del self.items[item]
        return True


class SlackAssistant:
    """The assistant view and the status signal for the Slack adapter; everything here is a courtesy.

    Questions asked in an assistant thread are plain DM messages to the adapter: they take the
    one durable path (stored before the ack, answered by the relay). This class only greets a
    new thread, names it after its first question, and shows "is thinking…" where Slack allows
    it, the reaction elsewhere.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        config: SlackSettings,
        prompts_for: PromptsFor | None,
        records: Records | None = None,
    ) -> None:
        """`records`: the state store, which every replica shares; without it, only the replica that saw a
        thread open can name it."""
        self._client = client
        self._slack = config
        self._settings = config.assistant
        self._prompts_for = prompts_for
        self._records = records
        self._untitled = _Bounded()  # (channel, thread) opened here, not yet named by a first question
        self._looked_up = _Bounded()  # (channel, thread) whose UNTITLED record this replica has read
        self._status_off = ""  # Slack's refusal code once it refused the status for the whole app
        self._refused = _Bounded()  # DM threads (channel, thread) and channels where Slack refused it
        self._watches: dict[tuple[str, str], set[StatusWatch]] = {}

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    def register(self, app: AsyncApp) -> None:
        """Bolt listeners for the assistant events (plain listeners, not Bolt's AsyncAssistant: see the README)."""
        app.event("assistant_thread_started")(self._on_thread_started)
        # Acknowledged and ignored: InsiteChat answers from its own knowledge, not the channel in view.
        app.event("assistant_thread_context_changed")(self._ignore)

    # --- greeting and title --------------------------------------------------------------------

    async def _ignore(self) -> None:
        return None  # Bolt acknowledges events itself

    async def _on_thread_started(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        thread = event.get("assistant_thread") or {}
        channel, ts = str(thread.get("channel_id") or ""), str(thread.get("thread_ts") or "")
        if not channel or not ts:
            return
        workspace = str(body.get("team_id") or (thread.get("context") or {}).get("team_id") or "")
        prompts = self._prompts_for(workspace, channel) if self._prompts_for is not None else ()
        if prompts is None:
            text = NOT_SERVED
        else:
            text = "\n".join(to_slack(self._settings.greeting))
            await self._opened_untitled((channel, ts))  # before the greeting: a quick first question still names it
        await quietly(
            "chat.postMessage (assistant greeting)",
            self._client.chat_postMessage(channel=channel, thread_ts=ts, text=text, unfurl_links=False),
        )
        if prompts:
            await quietly(
                "assistant.threads.setSuggestedPrompts",
                self._client.assistant_threads_setSuggestedPrompts(
                    channel_id=channel,
                    thread_ts=ts,
                    title=self._settings.prompts_title or None,
                    prompts=[{"title": p.title, "message": p.message} for p in prompts],
                ),
            )

    async def name_thread(self, inbound: Inbound) -> None:
        """Title an assistant thread after its first question; at most once per thread.

        Only threads whose `assistant_thread_started` reached the bridge are named (this replica
        or another: the store says so), and only by their first question: a later question can
        never rename a thread.
        """
        if not inbound.is_dm or not inbound.in_thread or inbound.author_is_bot or inbound.author_is_self:
            return  # the echo of the bot's own greeting is not the first question
        title = thread_title(inbound.text)
        if not title or not await self._take_untitled((inbound.channel, inbound.thread)):
            return
        await quietly(
            "assistant.threads.setTitle",
            self._client.assistant_threads_setTitle(channel_id=inbound.channel, thread_ts=inbound.thread, title=title),
        )

    async def _opened_untitled(self, place: tuple[str, str]) -> None:
        self._untitled.add(place)
        if self._records is None:
            return
        try:
            await self._records.put(UNTITLED, _untitled_key(place), True, ttl=UNTITLED_TTL)
        except StoreError as exc:  # a courtesy: this replica can still name it
            log.info("slack: assistant thread %s:%s: its title is left to this replica (%s)", *place, exc)

    async def _take_untitled(self, place: tuple[str, str]) -> bool:
        """Whether this question names its thread: the first one after the thread opened, on any replica."""
        opened_here = self._untitled.take(place)
        if self._records is None:
            return opened_here
        if place in self._looked_up:
            return False  # a later question in a thread this replica has looked at already
        self._looked_up.add(place)
        key = _untitled_key(place)
        try:
            found = await self._records.get_versioned(UNTITLED, key)
            if found is None or found.value is not True:
                return False
            # Taken once: a question that reached another replica at the same time does not rename it.
            return await self._records.put_if(UNTITLED, key, False, revision=found.revision, ttl=UNTITLED_TTL)
        except StoreError as exc:
            log.info("slack: assistant thread %s: title not looked up (%s)", key, exc)
            return opened_here

    # --- the status as the working signal ------------------------------------------------------

    def status_place(self, inbound: Inbound) -> tuple[str, str] | None:
        """Where "is thinking…" replaces the reaction for this question: (channel, thread ts), or None.

        The thread the answer is posted in, for Slack clears the status when the app replies
        there: an assistant (or any DM) thread, and channel threads (allowed with chat:write),
        with slack.working_signal: status (the default) or in the assistant view. Not a
        top-level DM message, whose answer is not in a thread; not where Slack refused it.
        """
        if self._status_off:
            return None
        in_threads = self._slack.working_signal == "status"
        if inbound.is_dm:
            if not inbound.in_thread or not (in_threads or self._settings.enabled):
                return None
            place = (inbound.channel, inbound.thread)
            refused_key: Any = place
        else:
            if not in_threads or (self._settings.enabled and not self._settings.channel_status):
                return None
            place = (inbound.channel, inbound.conversation.thread)
            refused_key = inbound.channel
        if not place[1] or refused_key in self._refused:
            return None
        return place

    def watch(self, place: tuple[str, str]) -> StatusWatch:
        watch = StatusWatch(place)
        self._watches.setdefault(place, set()).add(watch)
        return watch

    def unwatch(self, watch: StatusWatch) -> None:
        watches = self._watches.get(watch.place)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.place]

    def statuses_up(self, channel: str, thread: str) -> tuple[StatusWatch, ...]:
        """The statuses up in a thread as the bridge is about to post there; posted() once the post went through.

        Only these are cleared by that post: a status Slack takes after the post stays (for two
        minutes), so its answer clears it itself.
        """
        return tuple(watch for watch in self._watches.get((channel, thread), ()) if watch.up)

    @staticmethod
    def posted(watches: tuple[StatusWatch, ...]) -> None:
        for watch in watches:
            watch.replied = True

    async def show(self, inbound: Inbound, watch: StatusWatch) -> Shown:
        """assistant.threads.setStatus, or the reaction when Slack refuses it (remembered, so not asked again)."""
        place = watch.place
        channel, thread = place
        try:
            await self._client.assistant_threads_setStatus(
                channel_id=channel,
                thread_ts=thread,
                status=self._settings.status,
                loading_messages=list(self._settings.loading_messages) or None,
            )
            watch.up = True
            return Shown.STATUS
        except SlackApiError as exc:
            self._refusal(inbound, place, error_code(exc))
        except NETWORK_ERRORS as exc:
            log.info("assistant.threads.setStatus failed (%s); the reaction shows instead", error_code(exc))
        await quietly(
            "reactions.add",
            self._client.reactions_add(
                channel=inbound.channel, timestamp=inbound.message_id, name=self._slack.reaction
            ),
            harmless=("already_reacted",),
        )
        return Shown.REACTION

    def _refusal(self, inbound: Inbound, place: tuple[str, str], code: str) -> None:
        if code in PASSING_ERRORS or code.startswith("HTTP 5"):
            log.info("assistant.threads.setStatus failed (%s); the reaction shows instead", code)
        elif code in APP_REFUSALS:
            self._status_off = code
            log.warning(
                "Slack refused the assistant status (%s): the working signal is the reaction from now on "
                "(give the app chat:write, or turn slack.assistant off)",
                code,
            )
        else:
            self._refused.add(place if inbound.is_dm else inbound.channel)
            log.info(
                "Slack refused the assistant status in %s (%s): the reaction shows there from now on",
                inbound.channel,
                code,
            )

    async def clear(self, place: tuple[str, str]) -> None:
        """An empty status: the answer never reached the thread (a failure, a retry later), or came too early."""
        channel, thread = place
        await quietly(
            "assistant.threads.setStatus",
            self._client.assistant_threads_setStatus(channel_id=channel, thread_ts=thread, status=""),
        )


async def settled(task: asyncio.Task[Shown]) -> Shown | None:
    """The signal a show() task put up, once it ended; None when it failed or was cancelled."""
    await asyncio.wait({task})
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()
