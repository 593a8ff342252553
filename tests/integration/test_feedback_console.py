"""👍 / 👎 in the sandbox as a user runs it: /up and /down [reason] on the last answer, and the knowledge-gap card."""

from __future__ import annotations

from bridge.emulator import Emulator
from bridge.feedback import REASON_THANKS, TEXTS, Vote, VoteResult
from bridge.sandbox import HELP
from tests.integration.test_cli_e2e import run_cli


def test_the_sandbox_votes_on_the_last_answer_and_shows_the_gap_and_the_flagged_answer() -> None:
    fallback = Emulator.sandbox().chatbots["5a0db0c5-ba5e-4b07-8000-000000000001"].fallback_message
    result = run_cli(
        "run", stdin="/up\nWhat is on the moon?\n/up\n/down It says nothing about craters\n/help\n"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    said = [line.removeprefix("sandbox> ") for line in out.splitlines() if line.startswith("sandbox> ")]
    assert said[:3] == ["no answer to rate yet: ask a question first", TEXTS[(VoteResult.RECORDED, Vote.UP)],
                        REASON_THANKS]
    assert f"bot> {fallback}" in out  # the first question can already be a gap: the fallback was read at start
    assert "alert> ❔ The chatbot had no answer: a gap in what it knows" in out
    assert 'alert>   "What is on the moon?"' in out
    assert "alert> 👎 An answer was flagged as not helpful" in out and "alert>   Flagged by: you" in out
    assert "Reason: you: It says nothing about craters" in out  # on the card, or its update
    assert out.count("alert> 👎") == 1
    assert all(line in said for line in HELP)  # /help says how to vote and which question is a gap
    assert "Traceback" not in result.stderr
