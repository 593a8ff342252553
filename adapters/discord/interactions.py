"""Discord interactions: the /ask and /reset slash commands, buttons (Claim / Resolve, "Talk to a human", 👍 / 👎)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import discord
from discord import app_commands

from adapters.discord.alerts import ALERT_EXPIRED, ALERT_FAILED, parse_human_id
from adapters.discord.feedback import parse_reason, parse_vote_id, reason_modal, without_human_button
from adapters.discord.places import Memory, place_of_channel
from adapters.discord.posting import INTERACTION_LIFETIME, NO_MENTIONS, DiscordPoster
from adapters.discord.setup import REST_ERRORS, DiscordStartError
from adapters.discord.translate import (
    Place,
    PlaceKind,
    click_conversation,
    translate_command,
)
from bridge.cards import parse_action_id
from bridge.clock import Clock
from bridge.config import DiscordSettings
from bridge.desk import AlertDesk
from bridge.feedback import Feedback, Vote, VoteResult, thanks_for
from bridge.handover import HandOver, HandOverResult, HandOvers
from bridge.messages import Conversation, Inbound, Outbound, OutboundKind
from bridge.relay import NOTICES
from bridge.store import StoreError

log = logging.getLogger(__name__)

RESET_IN_CHANNEL = (
    "To start a new conversation here, reply `reset` in the thread you want to restart "
    "(mention me if I'm not following it). In a DM with me, /{command} works too."
)


class DiscordInteractions:
    """The slash commands and button clicks: each acknowledges first, as Discord drops what waits over 3 s.

    Decisions are the core's: what a click on "Talk to a human" does (`handovers`), Claim
    and Resolve (`desk`); questions go to the relay through `accept`, which stores them.
    """

    def __init__(
        self,
        config: DiscordSettings,
        memory: Memory,
        poster: DiscordPoster,
        accept: Callable[[Inbound], Awaitable[object]],
        *,
        clock: Clock,
        handovers: HandOvers | None = None,
        desk: AlertDesk | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        self._config = config
        self._feedback = feedback
        self._memory = memory
        self._poster = poster
        self._accept = accept
        self._clock = clock
        self._handovers = handovers
        self._desk = desk

    def add_commands(self, tree: app_commands.CommandTree[Any]) -> None:
        """Register /ask and /reset (their configured names) on a client's command tree."""
        handlers = self

        async def ask(interaction: discord.Interaction, question: str) -> None:
            await handlers._on_command(interaction, question)

        async def reset(interaction: discord.Interaction) -> None:
            await handlers._on_command(interaction, "reset")

        try:
            ask_command: app_commands.Command[Any, [str], None] = app_commands.Command(
                name=self._config.ask_command, description="Ask the chatbot a question", callback=ask
            )
            app_commands.describe(question="Your question for the chatbot")(ask_command)
            reset_command: app_commands.Command[Any, [], None] = app_commands.Command(
                name=self._config.reset_command,
                description="Start a new conversation with the chatbot here",
                callback=reset,
            )
        except (ValueError, TypeError) as exc:
            raise DiscordStartError(
                f"discord.ask_command / discord.reset_command: {exc} (lowercase letters, digits, - or _, up to 32)"
            ) from None
        tree.add_command(ask_command)
        tree.add_command(reset_command)

    async def _on_command(self, interaction: discord.Interaction, text: str) -> None:
        place = place_of_channel(interaction.channel)
        if text == "reset" and place is not None and place.kind is PlaceKind.TEXT:
            # Outside a thread or DM there is no conversation to reset (a slash command there is
            # its own): say where reset works, at once and only to them, as Slack does.
            try:
                await interaction.response.send_message(
                    RESET_IN_CHANNEL.format(command=self._config.reset_command), ephemeral=True
                )
            except REST_ERRORS as exc:
                log.warning("discord: could not answer /%s in time: %s", self._config.reset_command, exc)
            return
        try:
            # First thing: Discord drops an interaction not acknowledged within 3 seconds.
            await interaction.response.defer(thinking=True)
        except REST_ERRORS as exc:
            log.warning("discord: could not acknowledge a slash command in time: %s", exc)
            return
        now = self._clock.monotonic()
        memory = self._memory
        memory.interactions = {k: v for k, v in memory.interactions.items() if now - v[0] < INTERACTION_LIFETIME}
        memory.interactions[str(interaction.id)] = (now, interaction)
        if place is None:
            place = Place(
                str(interaction.channel_id or ""), PlaceKind.DM if interaction.guild_id is None else PlaceKind.OTHER
            )
        user = interaction.user
        inbound = translate_command(
            interaction_id=str(interaction.id),
            guild_id=str(interaction.guild_id or ""),
            place=place,
            author_id=str(user.id),
            author_name=user.display_name,
            author_is_bot=user.bot,
            text=text,
        )
        # Deferred first (Discord's 3 s); Discord never sends the command again, so a job that
        # cannot be stored is said in place of the "thinking" reply, not only in the log.
        try:
            await self._accept(inbound)
        except StoreError as exc:
            log.error("discord: the slash command %s could not be stored: %s", inbound.dedupe_key, exc)
            try:
                await interaction.followup.send(NOTICES["not_stored"], allowed_mentions=NO_MENTIONS)
            except REST_ERRORS as send_error:
                log.warning("discord: could not say so either: %s", send_error)

    # --- buttons -----------------------------------------------------------------------------

    async def on_component(self, interaction: discord.Interaction) -> None:
        """A button click: Claim / Resolve on an alert card, or "Talk to a human" under an answer."""
        data: Mapping[str, object] = interaction.data or {}
        custom_id = str(data.get("custom_id", ""))
        action = parse_action_id(custom_id)
        chatbot_id = parse_human_id(custom_id)
        vote = parse_vote_id(custom_id)
        if vote is not None:
            await self._on_vote(interaction, *vote)
            return
        if action is None and chatbot_id is None:
            return  # not ours
        try:
            # First thing: Discord shows "interaction failed" unless acknowledged within 3 seconds.
            await interaction.response.defer()  # DEFERRED_UPDATE_MESSAGE: no visible reply yet
        except REST_ERRORS as exc:
            log.warning("discord: could not acknowledge a button click in time: %s", exc)
            return
        if action is not None:
            await self._on_alert_button(interaction, *action)
        elif chatbot_id is not None:
            await self._on_human_button(interaction, chatbot_id)

    async def _on_alert_button(self, interaction: discord.Interaction, action: str, alert_id: str) -> None:
        if self._desk is None:
            await self._tell(interaction, ALERT_FAILED)
            return
        # Footers do not render mentions, so the card names the person as people see them.
        who = interaction.user.display_name
        try:
            alert = await self._desk.act(alert_id, action, who)
        except Exception:
            log.exception("discord: recording %s on alert %s failed", action, alert_id)
            await self._tell(interaction, ALERT_FAILED)
            return
        if alert is None:
            log.info("discord: %s on unknown alert %s", action, alert_id)
            await self._tell(interaction, ALERT_EXPIRED)
            return
        log.info("discord: %s on alert %s by user %s", action, alert_id, interaction.user.id)
        taken = AlertDesk.taken_by_someone_else(alert, action, who)
        if taken:
            await self._tell(interaction, taken)

    async def _on_human_button(self, interaction: discord.Interaction, chatbot_id: str) -> None:
        """"Talk to a human" under an answer: the core raises the hand-over; the person reads its result."""
        conversation = self._conversation_of_click(interaction)
        is_dm = not conversation.workspace
        if self._handovers is None:
            outcome = HandOver(HandOverResult.UNAVAILABLE)
        else:
            outcome = await self._handovers.request(
                chatbot_id, conversation, interaction.user.display_name, is_dm=is_dm
            )
        text = outcome.text(is_dm=is_dm)
        if outcome.result is not HandOverResult.RAISED:
            await self._tell(interaction, text)
            return
        try:
            # The button has done its job: take it off the answer so it is not pressed again (👍 / 👎 stay).
            await interaction.edit_original_response(view=without_human_button(interaction.message))
        except REST_ERRORS as exc:
            log.info("discord: could not remove the talk-to-a-human button: %s", exc)
        try:
            await self._poster.send(Outbound(conversation, (text,), OutboundKind.NOTICE))
        except (*REST_ERRORS, RuntimeError) as exc:
            log.warning("discord: the talk-to-a-human confirmation in %s failed: %s", conversation.key, exc)
            await self._tell(interaction, text)

    # --- 👍 / 👎 ------------------------------------------------------------------------------------

    async def _on_vote(self, interaction: discord.Interaction, vote: Vote, job_id: str) -> None:
        """👍 / 👎 under an answer: the core records the vote (a 👎 raises the flagged card); the voter is thanked.

        A 👎 answers the click with the reason modal (a modal must be the first response); a 👍
        is acknowledged first and thanked with a reply only the voter sees.
        """
        modal_open = False
        try:
            if vote is Vote.DOWN:
                await interaction.response.send_modal(reason_modal(job_id))
                modal_open = True
            else:
                await interaction.response.defer()
        except REST_ERRORS as exc:
            log.warning("discord: could not answer a vote click in time: %s", exc)
        if self._feedback is None:
            return
        outcome = await self._feedback.vote(
            job_id, str(interaction.user.id), vote, platform="discord", who=interaction.user.display_name
        )
        if not modal_open:
            await self._tell(interaction, outcome.text)
        elif outcome.result in (VoteResult.STALE, VoteResult.FAILED):
            log.warning("discord: a 👎 on %s came to %s; the modal is open, so the voter is not told", job_id,
                        outcome.result.value)

    async def on_modal_submit(self, interaction: discord.Interaction) -> None:
        """The 👎 modal submitted (its field is optional): the reason joins the vote and the answer's card."""
        parsed = parse_reason(interaction.data or {})
        if parsed is None or self._feedback is None:
            return  # not ours
        job_id, text = parsed
        outcome = await self._feedback.reason(
            job_id, str(interaction.user.id), text, platform="discord", who=interaction.user.display_name
        )
        said = outcome.text if outcome.result in (VoteResult.STALE, VoteResult.FAILED) else thanks_for(text)
        try:
            await interaction.response.send_message(said, ephemeral=True, allowed_mentions=NO_MENTIONS)
        except REST_ERRORS as exc:
            log.info("discord: could not thank for a reason: %s", exc)

    def _conversation_of_click(self, interaction: discord.Interaction) -> Conversation:
        place = place_of_channel(interaction.channel)
        if place is None:
            place = Place(
                str(interaction.channel_id or ""), PlaceKind.DM if interaction.guild_id is None else PlaceKind.OTHER
            )
        message = interaction.message
        reference = message.reference if message is not None else None
        metadata = message.interaction_metadata if message is not None else None
        return click_conversation(
            guild_id=str(interaction.guild_id or ""),
            place=place,
            message_id=str(message.id) if message is not None else "",
            replied_id=str(reference.message_id) if reference is not None and reference.message_id else "",
            interaction_id=str(metadata.id) if metadata is not None else "",
            roots=self._memory.roots.as_mapping(),
        )

    async def _tell(self, interaction: discord.Interaction, text: str) -> None:
        """A reply only the clicking person sees."""
        try:
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
        except REST_ERRORS as exc:
            log.info("discord: could not answer a button click: %s", exc)
