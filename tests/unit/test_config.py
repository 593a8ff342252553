"""Config loading: interpolation, routing, and every kind of bad config reported with its path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import config
from bridge.config import ConfigError, ReplyMode

BOT = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
BOT2 = "11111111-2222-4333-8444-555555555555"
ENV = {"IC_KEY": "ic_testkey", "SLACK_BOT": "xoxb-fake", "SLACK_APP": "xapp-fake", "DISCORD": "discord-fake"}
ROOT = Path(__file__).resolve().parents[2]

BASE = f"""
insitechat:
  api_key: ${{IC_KEY}}
slack:
  bot_token: ${{SLACK_BOT}}
  app_token: ${{SLACK_APP}}
discord:
  token: ${{DISCORD}}
routes:
  - platform: slack
    channel: C1
    chatbot: {BOT}
"""


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.loads(text, env=ENV if env is None else env)
    return info.value.problems


def test_example_config_is_valid() -> None:
    env = {
        "INSITECHAT_API_KEY": "ic_x",
        "SLACK_BOT_TOKEN": "xoxb-x",
        "SLACK_APP_TOKEN": "xapp-x",
        "DISCORD_BOT_TOKEN": "d",
        "SUPPORT_BOT_WEBHOOK_SECRET": "whsec",
    }
    settings = config.load(ROOT / "config.example.yaml", env=env)
    assert settings.platforms == ["slack", "discord"]
    assert settings.insitechat.base_url == "https://backend.insitechat.ai/api"
    assert settings.chatbot_settings(BOT).webhook_secret == "whsec"
    assert settings.alerts[0].to == ("slack:C0ALERTS01", "discord:987654321098765432")


def test_interpolation_and_defaults() -> None:
    text = BASE.replace("api_key: ${IC_KEY}", "api_key: ${IC_KEY}\n  base_url: ${BASE:-http://127.0.0.1:9/api/}")
    settings = config.loads(text, env=ENV)
    assert settings.insitechat.all_keys == {"default": "ic_testkey"}
    assert settings.insitechat.base_url == "http://127.0.0.1:9/api"
    assert settings.slack is not None and settings.slack.transport == "socket"
    assert settings.slack.api_url == "https://slack.com/api/"
    settings = config.loads(text, env={**ENV, "BASE": "https://proxy.example/api"})
    assert settings.insitechat.base_url == "https://proxy.example/api"


def test_dollar_dollar_is_a_literal_dollar() -> None:
    text = BASE + "logging: {level: INFO}\nchatbots:\n  - id: " + BOT + "\n    name: Costs $$5\n"
    assert config.loads(text, env=ENV).chatbot_settings(BOT).name == "Costs $5"


ROUTES = f"""
insitechat: {{api_key: "${{IC_KEY}}"}}
slack: {{bot_token: "${{SLACK_BOT}}", app_token: "${{SLACK_APP}}"}}
discord: {{token: "${{DISCORD}}"}}
routes:
  - {{chatbot: {BOT}, reply: mention}}
  - {{platform: slack, channel: dm, chatbot: {BOT2}}}
  - {{platform: slack, workspace: T1, chatbot: {BOT}, reply: all}}
  - {{platform: slack, workspace: T1, channel: C9, chatbot: {BOT2}, reply: off}}
  - {{platform: discord, channel: "42", chatbot: {BOT2}, reply: all, threads: false}}
"""


@pytest.mark.parametrize(
    ("place", "expected"),
    [
        (("slack", "T1", "C9", False), (BOT2, ReplyMode.OFF)),  # exact channel wins
        (("slack", "T1", "C2", False), (BOT, ReplyMode.ALL)),  # workspace beats the default
        (("slack", "T2", "C2", False), (BOT, ReplyMode.MENTION)),  # default route
        (("slack", "T1", "D1", True), (BOT2, ReplyMode.MENTION)),  # "dm" beats workspace "*"
        (("discord", "G1", "42", False), (BOT2, ReplyMode.ALL)),
        (("discord", "G1", "D7", True), (BOT, ReplyMode.MENTION)),  # slack's dm route is not discord's
    ],
)
def test_most_specific_route_wins(place: tuple[str, str, str, bool], expected: tuple[str, ReplyMode]) -> None:
    route = config.loads(ROUTES, env=ENV).route_for(*place)
    assert route is not None
    assert (route.chatbot, route.reply) == expected


def test_no_matching_route() -> None:
    text = BASE
    assert config.loads(text, env=ENV).route_for("discord", "G", "C1", False) is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.replace(f"chatbot: {BOT}", "chatbot: not-a-uuid"), "routes[0].chatbot: not a UUID"),
        (lambda t: t.replace("channel: C1", "channel: C1\n    reply: sometimes"), "routes[0].reply: Input should be"),
        (lambda t: t.replace("channel: C1", "channel: C1\n    colour: red"), "routes[0].colour: unknown option"),
        (lambda t: t.replace("platform: slack", "platform: teams"), "routes[0].platform: Input should be"),
        (
            lambda t: t.replace("api_key: ${IC_KEY}", "api_key: ${MISSING_VAR}"),
            "insitechat.api_key: environment variable MISSING_VAR is not set",
        ),
        (
            lambda t: t.replace("api_key: ${IC_KEY}", "api_key: ic_written_in_the_file"),
            "insitechat.api_key: secrets come from the environment",
        ),
        (lambda t: t.replace("api_key: ${IC_KEY}", "timeout: 5"), "insitechat: set api_key (one account) or keys"),
        (
            lambda t: t.replace("api_key: ${IC_KEY}", "api_key: ${IC_KEY}\n  base_url: ftp://x"),
            "insitechat.base_url: must be an http(s) URL",
        ),
        (
            lambda t: t.replace("api_key: ${IC_KEY}", "api_key: ${IC_KEY}\n  rate_limit: 0"),
            "insitechat.rate_limit: Input should be greater than or equal to 1",
        ),
        (
            lambda t: t.replace("  app_token: ${SLACK_APP}\n", ""),
            "slack: set app_token (Socket Mode) or signing_secret",
        ),
        (lambda t: t.replace("  app_token: ${SLACK_APP}\n", "  mode: http\n"), "slack: HTTP mode needs signing_secret"),
        (lambda t: t.replace("  bot_token: ${SLACK_BOT}\n", ""), "slack.bot_token: required but missing"),
        (
            lambda t: t.replace("discord:\n  token: ${DISCORD}\n", "") + f"  - {{platform: discord, chatbot: {BOT}}}\n",
            "routes[1].platform: discord is routed but has no discord section",
        ),
        (lambda t: t.split("routes:")[0], "routes: at least one route is needed"),
        (lambda t: t + f"chatbots:\n  - {{id: {BOT}, key: other}}\n", "chatbots[0].key: no key named 'other'"),
        (lambda t: t + f"alerts:\n  - {{chatbot: {BOT}, to: ['teams:C1']}}\n", "alerts[0].to: 'teams:C1' is not"),
        (
            lambda t: t + f"alerts:\n  - {{chatbot: {BOT}, to: ['slack:C1']}}\n",
            "alerts[0].chatbot: 0a1b2c3d-4e5f-6789-abcd-ef0123456789 has no webhook_secret",
        ),
        (
            lambda t: t + f"alerts:\n  - {{chatbot: {BOT}, to: ['slack:C1'], mention: ['@everyone']}}\n",
            "alerts[0].mention: '@everyone' is not an explicit mention",
        ),
        (
            lambda t: t + f"alerts:\n  - {{chatbot: {BOT}, to: ['slack:C1'], events: [visitor.waved]}}\n",
            "alerts[0].events: unknown event 'visitor.waved'",
        ),
        (lambda t: t + "server: {listen: nowhere}\n", 'server.listen: must be "host:port"'),
        (
            lambda t: t.replace("token: ${DISCORD}", "token: ${DISCORD}\n  ask_command: /Ask"),
            "discord.ask_command: must be 1-32 lowercase",
        ),
        (lambda t: t + "slack_extra: 1\n", "slack_extra: unknown option"),
        (lambda t: "routes: [", "line 1, column 10: not valid YAML"),
        (lambda t: "- just\n- a list\n", "the file must be a mapping"),
    ],
)
def test_bad_config_names_path_and_reason(change, expected: str) -> None:  # type: ignore[no-untyped-def]
    problems = problems_of(change(BASE))
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_listed_at_once() -> None:
    text = BASE.replace(f"chatbot: {BOT}", "chatbot: nope").replace("api_key: ${IC_KEY}", "api_key: ${NOPE}")
    text += "server: {listen: nowhere}\n"
    problems = problems_of(text)
    assert len(problems) == 3, problems


def test_secret_values_never_appear_in_errors() -> None:
    secret = "xoxb-very-secret-token-value"
    # A secret that fails validation (the API URL check) must not be echoed back.
    text = BASE.replace(
        "slack:\n  bot_token: ${SLACK_BOT}", "slack:\n  bot_token: ${SLACK_BOT}\n  api_url: ${SLACK_BOT}"
    )
    problems = problems_of(text, env={**ENV, "SLACK_BOT": secret})
    assert any(p.startswith("slack.api_url") for p in problems)
    assert all(secret not in p for p in problems)
    literal = problems_of(BASE.replace("bot_token: ${SLACK_BOT}", f"bot_token: {secret}"))
    assert all(secret not in p for p in literal)


def test_empty_optional_secret_means_unset() -> None:
    text = BASE + f"webhooks: {{verify_signatures: false}}\nchatbots:\n  - id: {BOT}\n    webhook_secret: ${{WH:-}}\n"
    text += f"alerts:\n  - {{chatbot: {BOT}, to: ['slack:C1']}}\n"
    assert config.loads(text, env=ENV).chatbot_settings(BOT).webhook_secret is None


def test_several_keys() -> None:
    text = BASE.replace("api_key: ${IC_KEY}", "keys: {default: '${IC_KEY}', other: '${IC_OTHER}'}")
    text += f"chatbots:\n  - {{id: {BOT2}, key: other}}\n"
    settings = config.loads(text, env={**ENV, "IC_OTHER": "ic_other"})
    assert settings.insitechat.all_keys == {"default": "ic_testkey", "other": "ic_other"}
    assert settings.chatbot_key(BOT2) == "other"
    assert settings.chatbot_key(BOT) == "default"


def test_cli_exits_2_with_paths_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        BASE.replace(f"chatbot: {BOT}", "chatbot: nope").replace(
            "bot_token: ${SLACK_BOT}", "bot_token: ${SLACK_BOT}\n  api_url: ${SLACK_BOT}"
        )
    )
    env = {**os.environ, **ENV, "SLACK_BOT": "xoxb-leak-me-not"}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(bad)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 2
    assert "routes[0].chatbot: not a UUID" in result.stderr
    assert "Traceback" not in result.stderr
    assert "xoxb-leak-me-not" not in result.stderr + result.stdout


def test_state_on_redis_takes_the_url_from_the_environment_only() -> None:
    url = "redis://bridge:redis-sentinel-pw@10.0.0.5:6379/2"
    settings = config.loads(
        BASE + "state:\n  redis_url: ${REDIS_URL}\n  redis_prefix: 'support:'\n", env={**ENV, "REDIS_URL": url}
    )
    assert settings.state.redis_url == url and settings.state.redis_prefix == "support:"
    assert config.loads(BASE, env=ENV).state.redis_url is None  # SQLite stays the default
    # Optional, unset:
    assert config.loads(BASE + "state:\n  redis_url: ${REDIS_URL:-}\n", env=ENV).state.redis_url is None
    # Written into the file: refused (it carries the password), and never echoed back.
    literal = problems_of(BASE + f"state: {{redis_url: '{url}'}}\n")
    assert literal == ["state.redis_url: secrets come from the environment; write ${SOME_VAR} here"]
    wrong = problems_of(BASE + "state:\n  redis_url: ${REDIS_URL}\n", env={**ENV, "REDIS_URL": "http://u:redis-sentinel-pw@h/"})
    assert wrong == ["state.redis_url: must be a redis://, rediss:// or unix:// URL"]
    both = problems_of(BASE + "state:\n  sqlite: ./s.db\n  redis_url: '${REDIS_URL}'\n", env={**ENV, "REDIS_URL": url})
    assert both == ["state: set sqlite or redis_url, not both"]


# --- slack.assistant and suggested prompts -------------------------------------------------------

ASSISTANT_BASE = f"""
insitechat:
  api_key: ${{IC_KEY}}
chatbots:
  - id: {BOT}
    suggested_prompts: PROMPTS
slack:
  bot_token: ${{SLACK_BOT}}
  app_token: ${{SLACK_APP}}
  assistant: ASSISTANT
routes:
  - {{platform: slack, channel: dm, chatbot: {BOT}}}
"""


def assistant_config(prompts: str = "[]", assistant: str = "true") -> str:
    return ASSISTANT_BASE.replace("PROMPTS", prompts).replace("ASSISTANT", assistant)


def test_assistant_defaults_and_prompts_of_the_dm_route() -> None:
    settings = config.loads(assistant_config("[{title: Refunds, message: \"What is your refund policy?\"}]"), env=ENV)
    assert settings.slack is not None and settings.slack.assistant.enabled
    assert settings.slack.assistant.status == "is thinking…" and settings.slack.assistant.channel_status
    [prompt] = settings.assistant_prompts("T1", "D1") or ()
    assert (prompt.title, prompt.message) == ("Refunds", "What is your refund policy?")
    off = config.loads(BASE, env=ENV)
    assert off.slack is not None and not off.slack.assistant.enabled
    assert off.assistant_prompts("T1", "D1") is None  # no route answers DMs there


@pytest.mark.parametrize(
    ("prompts", "assistant", "expected"),
    [
        ("[" + ", ".join(["{title: t, message: m}"] * 5) + "]", "true",
         "chatbots[0].suggested_prompts: at most 4 suggested prompts (Slack shows no more); 5 given"),
        ("[{title: t}]", "true", "chatbots[0].suggested_prompts[0].message: required but missing"),
        ("[{title: '', message: m}]", "true", "chatbots[0].suggested_prompts[0].title: String should have at least"),
        ("[]", "{loading_messages: [a, '  ']}", "slack.assistant.loading_messages: every loading message needs"),
        ("[]", "{loading_messages: [" + ", ".join("abcdefghijk") + "]}",
         "slack.assistant.loading_messages: at most 10 loading messages"),
        ("[]", "{greting: hi}", "slack.assistant.greting: unknown option (a typo?)"),
        ("[]", "{status: ''}", "slack.assistant.status: String should have at least 1 character"),
    ],
)
def test_bad_assistant_config_names_its_path(prompts: str, assistant: str, expected: str) -> None:
    problems = problems_of(assistant_config(prompts, assistant))
    assert any(p.startswith(expected) for p in problems), problems


def test_the_assistant_needs_a_route_that_answers_slack_dms() -> None:
    text = assistant_config().replace("channel: dm", "channel: C1")
    assert problems_of(text) == [
        "slack.assistant: the assistant view is a DM with the bot, but no route answers Slack DMs; "
        'add a route with channel: dm (or "*"), or turn the assistant off'
    ]
    assert config.loads(text.replace("assistant: true", "assistant: false"), env=ENV)


def test_the_slack_working_signal_is_the_status_unless_set_and_only_status_or_reaction() -> None:
    assert config.loads(BASE, env=ENV).slack.working_signal == "status"  # type: ignore[union-attr]
    app_token = "  app_token: ${SLACK_APP}\n"
    with_reaction = BASE.replace(app_token, app_token + "  working_signal: reaction\n")
    assert config.loads(with_reaction, env=ENV).slack.working_signal == "reaction"  # type: ignore[union-attr]
    [problem] = problems_of(with_reaction.replace("working_signal: reaction", "working_signal: typing"))
    assert "slack.working_signal" in problem and "status" in problem and "reaction" in problem
