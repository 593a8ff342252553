"""YAML configuration: ${ENV} interpolation, validation with a path for every problem, frozen settings."""

from __future__ import annotations

import enum
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

# ${VAR} or ${VAR:-default}; $${...} is a literal "${...}".
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-)?\}$")  # an empty default means "optional"

# Where a secret may appear in the YAML (as a ${VAR} reference only). "*" matches a list index or map key.
SECRET_PATHS: tuple[tuple[str, ...], ...] = (
    ("insitechat", "api_key"),
    ("insitechat", "keys", "*"),
    ("chatbots", "*", "webhook_secret"),
    ("slack", "bot_token"),
    ("slack", "app_token"),
    ("slack", "signing_secret"),
    ("discord", "token"),
    ("state", "redis_url"),  # may carry the Redis password
)

PLATFORMS = ("slack", "discord", "console")
WEBHOOK_EVENTS = ("conversation.escalated", "lead.captured", "conversation.started", "message.received")
# What alert rules may route: InsiteChat's webhook events, and the ones the bridge raises itself.
ALERT_EVENTS = (*WEBHOOK_EVENTS, "answer.unanswered", "answer.flagged")
DEFAULT_KEY = "default"
# Slack's limits for the assistant view (assistant.threads.setSuggestedPrompts / setStatus).
SUGGESTED_PROMPTS_MAX = 4
SLACK_LOADING_MESSAGES_MAX = 10


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists each one as 'path: reason'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class ReplyMode(str, enum.Enum):
    MENTION = "mention"  # answer when mentioned (always in DMs), then follow that thread
    ALL = "all"  # answer every top-level message of the channel
    OFF = "off"  # never answer here


class _Model(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them with their path.
    model_config = ConfigDict(extra="forbid", frozen=True)


class InsiteChatSettings(_Model):
    base_url: str = "https://backend.insitechat.ai/api"
    api_key: str | None = None
    keys: dict[str, str] = Field(default_factory=dict)
    # InsiteChat allows 60 per 60 s per key today; more only if your plan says so.
    rate_limit: int = Field(55, ge=1, le=100_000, description="requests per key in any rolling window")
    rate_window: float = Field(60.0, gt=0)
    timeout: float = Field(60.0, gt=0)
    deadline: float = Field(120.0, gt=0, description="overall time budget for one answer, retries included")
    dashboard_url: str = "https://app.insitechat.ai"

    @field_validator("base_url", "dashboard_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_key_at_least(self) -> InsiteChatSettings:
        if self.api_key is None and not self.keys:
            raise ValueError("set api_key (one account) or keys (several accounts)")
        if self.api_key is not None and DEFAULT_KEY in self.keys:
            raise ValueError(f"api_key and keys.{DEFAULT_KEY} name the same key; keep one")
        return self

    @property
    def all_keys(self) -> dict[str, str]:
        """Key name -> API key; `api_key` is the key named "default"."""
        merged = dict(self.keys)
        if self.api_key is not None:
            merged[DEFAULT_KEY] = self.api_key
        return merged


class SuggestedPrompt(_Model):
    """One suggested prompt of the Slack assistant view: the button's title and the message it sends."""

    title: str = Field(min_length=1)
    message: str = Field(min_length=1)


class ChatbotSettings(_Model):
    id: str
    name: str = ""
    key: str = DEFAULT_KEY
    webhook_secret: str | None = None
    # Offered when someone opens the Slack assistant view (slack.assistant) and this chatbot answers DMs.
    suggested_prompts: tuple[SuggestedPrompt, ...] = ()

    @field_validator("suggested_prompts")
    @classmethod
    def _at_most_four(cls, value: tuple[SuggestedPrompt, ...]) -> tuple[SuggestedPrompt, ...]:
        if len(value) > SUGGESTED_PROMPTS_MAX:
            raise ValueError(
                f"at most {SUGGESTED_PROMPTS_MAX} suggested prompts (Slack shows no more); {len(value)} given"
            )
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("id")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return _check_uuid(value)


class StateSettings(_Model):
    sqlite: str = "./bridge-state.db"
    # Redis instead of the SQLite file: the state several replicas share.
    redis_url: str | None = None
    redis_prefix: str = Field(
        default="icb:", min_length=1, description="keys under this prefix: one Redis, several bridges"
    )
    # Questions, answers and the exchanges quoted on "Talk to a human" cards are kept this
    # long after delivery; then only ids and states remain.
    keep_text_hours: float = Field(default=24.0, gt=0, le=24 * 90)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None  # ${REDIS_URL:-} unset: the SQLite file
        if not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _one_backend(self) -> StateSettings:
        if self.redis_url is not None and "sqlite" in self.model_fields_set:
            raise ValueError("set sqlite or redis_url, not both")
        return self


class ChatSettings(_Model):
    # A question whose InsiteChat call was out when the bridge died: ask again (the call may
    # have been received: one more call), or tell the person to ask again.
    after_restart: Literal["ask-again", "notice"] = "ask-again"


class ServerSettings(_Model):
    listen: str = "0.0.0.0:8080"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError('must be "host:port", e.g. "0.0.0.0:8080"')
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class SlackAssistantSettings(_Model):
    """Slack's AI-app surface (the split-view assistant); off unless this section is given."""

    enabled: bool = True  # an `assistant:` section means on; `assistant: false` or `enabled: false` is off
    greeting: str = Field(default="Hi! Ask me anything, or pick one of the suggestions below.", min_length=1)
    prompts_title: str = "Try asking"  # above the suggested prompts
    description: str = Field(default="Your InsiteChat chatbot, answering from your knowledge base.", min_length=1)
    status: str = Field(default="is thinking…", min_length=1)  # Slack shows "<app name> is thinking…"
    loading_messages: tuple[str, ...] = ()  # Slack rotates through them while the status shows
    # The status instead of the reaction in channel threads too (Slack allows it with chat:write).
    channel_status: bool = True

    @field_validator("loading_messages")
    @classmethod
    def _loading_messages(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > SLACK_LOADING_MESSAGES_MAX:
            raise ValueError(
                f"at most {SLACK_LOADING_MESSAGES_MAX} loading messages (Slack's limit); {len(value)} given"
            )
        if any(not item.strip() for item in value):
            raise ValueError("every loading message needs some text")
        return value


class SlackSettings(_Model):
    bot_token: str
    app_token: str | None = None
    signing_secret: str | None = None
    mode: Literal["socket", "http"] | None = None
    api_url: str = "https://slack.com/api/"
    command: str = "/ask"
    reaction: str = "eyes"
    # While the bot works on an answer: Slack's loading status ("<app> is thinking…", one call,
    # cleared by Slack when the answer is posted in the thread; Slack allows it with chat:write
    # since 2026-03) where the answer goes in a thread, and the reaction (added, then removed)
    # where it does not (a top-level DM) or where Slack refuses the status. `reaction`: always
    # the reaction, outside the assistant view (which always shows its status).
    working_signal: Literal["status", "reaction"] = "status"
    assistant: SlackAssistantSettings = SlackAssistantSettings(enabled=False)

    @field_validator("assistant", mode="before")
    @classmethod
    def _assistant_switch(cls, value: object) -> object:
        # `assistant: true` / `assistant: false` as a short form of `enabled:`.
        if isinstance(value, bool):
            return {"enabled": value}
        return value

    # How 👍 / 👎 look under answers: Slack's own feedback buttons (a context_actions block), or
    # plain buttons for clients and surfaces that do not show that block. Both vote the same way.
    feedback_style: Literal["feedback_buttons", "buttons"] = "feedback_buttons"

    @field_validator("command")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not re.fullmatch(r"/[a-z0-9_-]{1,31}", value):
            raise ValueError('must look like "/ask": a slash and up to 31 lowercase letters, digits, - or _')
        return value

    @field_validator("api_url")
    @classmethod
    def _trailing_slash(cls, value: str) -> str:
        if not re.match(r"^https?://", value):
            raise ValueError("must be an http(s) URL")
        # slack_sdk joins method names with urljoin: without the slash the last segment is lost.
        return value if value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _transport_secret(self) -> SlackSettings:
        if self.mode is None and not self.app_token and not self.signing_secret:
            raise ValueError("set app_token (Socket Mode) or signing_secret (HTTP mode)")
        if self.transport == "socket" and not self.app_token:
            raise ValueError("Socket Mode needs app_token (an xapp- token); or set mode: http and signing_secret")
        if self.transport == "http" and not self.signing_secret:
            raise ValueError("HTTP mode needs signing_secret to verify Slack's requests")
        return self

    @property
    def transport(self) -> str:
        """socket when an app token is set (works behind a firewall), else http."""
        return self.mode or ("socket" if self.app_token else "http")


class DiscordSettings(_Model):
    token: str
    message_content_intent: bool = False
    threads: bool = True
    ask_command: str = "ask"
    reset_command: str = "reset"

    @field_validator("ask_command", "reset_command")
    @classmethod
    def _command_name(cls, value: str) -> str:
        # Discord's rule for slash command names; checked here so start-up never fails on it.
        if not re.fullmatch(r"[-_a-z0-9]{1,32}", value):
            raise ValueError("must be 1-32 lowercase letters, digits, - or _ (no slash)")
        return value


class ConsoleSettings(_Model):
    enabled: bool = True


class RouteSettings(_Model):
    platform: Literal["slack", "discord", "console", "*"] = "*"
    workspace: str = "*"  # Slack team id or Discord guild id
    channel: str = "*"  # a channel id, "dm" for direct messages, or "*" for every channel and DM
    chatbot: str
    reply: ReplyMode = ReplyMode.MENTION
    threads: bool | None = None  # Discord: answer in a new thread (default from discord.threads)
    human_button: bool = True  # a "Talk to a human" button under answers (when escalations are routed)
    feedback: bool = True  # 👍 / 👎 under answers: votes counted in /metrics, a 👎 raises answer.flagged

    @field_validator("reply", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false; it means the reply mode here.
        return "off" if value is False else value

    @field_validator("chatbot")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return _check_uuid(value)

    def matches(self, platform: str, workspace: str, channel: str, is_dm: bool) -> bool:
        if self.platform not in ("*", platform):
            return False
        if self.workspace not in ("*", workspace):
            return False
        if self.channel == "dm":
            return is_dm
        return self.channel in ("*", channel)

    @property
    def specificity(self) -> tuple[int, int, int]:
        """Higher wins: an exact channel beats "dm" beats "*"; then workspace; then platform."""
        channel_rank = {"*": 0, "dm": 1}.get(self.channel, 2)
        return (channel_rank, int(self.workspace != "*"), int(self.platform != "*"))


_DESTINATION = re.compile(r"^(slack|discord|console):([A-Za-z0-9_-]+)$")


def _checked_destinations(value: tuple[str, ...], pattern: re.Pattern[str], forms: str) -> tuple[str, ...]:
    """A rule's `to`: at least one destination, each of the forms `pattern` accepts (named in `forms`)."""
    if not value:
        raise ValueError("needs at least one destination")
    for item in value:
        if not pattern.match(item):
            raise ValueError(f"{item!r} is not {forms}")
    return value


class AlertRule(_Model):
    chatbot: str
    events: tuple[str, ...] = ("conversation.escalated", "lead.captured")
    to: tuple[str, ...]
    mention: tuple[str, ...] = ()

    @field_validator("chatbot")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return _check_uuid(value)

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [e for e in value if e not in ALERT_EVENTS]
        if unknown:
            raise ValueError(f"unknown event {unknown[0]!r}; known: {', '.join(ALERT_EVENTS)}")
        return value

    @field_validator("to")
    @classmethod
    def _destinations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _checked_destinations(
            value, _DESTINATION, '"slack:<channel id>", "discord:<channel id>" or "console:<name>"'
        )

    @field_validator("mention")
    @classmethod
    def _explicit_mentions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Only explicit user/group/role ids: never a crowd ping.
        pattern = re.compile(r"^(<@[UW][A-Z0-9]+>|<!subteam\^[A-Z0-9]+>|<@!?\d+>|<@&\d+>)$")
        for item in value:
            if not pattern.match(item):
                raise ValueError(
                    f"{item!r} is not an explicit mention: use <@U123> or <!subteam^S123> (Slack), "
                    "<@123> or <@&123> (Discord); crowd pings are never sent"
                )
        return value


class WebhookSettings(_Model):
    verify_signatures: bool = True
    max_age_minutes: float = Field(default=60.0, gt=0)


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DIGEST_DESTINATION = re.compile(r"^(slack|discord):([A-Za-z0-9_-]+)$")


class DigestSettings(_Model):
    """The weekly digest: the report of the 7 days before weekday/hour, posted once into alert channels."""

    to: tuple[str, ...]
    weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] = "monday"
    hour: int = Field(9, ge=0, le=23)
    charts: bool = True  # attach PNG charts when the `charts` extra (matplotlib) is installed

    @field_validator("weekday", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("to")
    @classmethod
    def _destinations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        checked = _checked_destinations(value, _DIGEST_DESTINATION, '"slack:<channel id>" or "discord:<channel id>"')
        return tuple(dict.fromkeys(checked))


class ReportSettings(_Model):
    timezone: str = "UTC"  # an IANA name (Europe/Berlin): the report's days and the digest's weekday and hour
    digest: DigestSettings | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value.upper() == "UTC":
            return "UTC"
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone name like UTC or Europe/Berlin") from None
        return value


class LoggingSettings(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(_Model):
    insitechat: InsiteChatSettings
    chatbots: tuple[ChatbotSettings, ...] = ()
    state: StateSettings = StateSettings()
    chat: ChatSettings = ChatSettings()
    server: ServerSettings = ServerSettings()
    slack: SlackSettings | None = None
    discord: DiscordSettings | None = None
    console: ConsoleSettings | None = None
    routes: tuple[RouteSettings, ...] = ()
    alerts: tuple[AlertRule, ...] = ()
    webhooks: WebhookSettings = WebhookSettings()
    logging: LoggingSettings = LoggingSettings()
    report: ReportSettings = ReportSettings()

    def cross_problems(self) -> Iterator[str]:
        """Problems that span sections (a route to an unconfigured platform, an unknown key...)."""
        keys = self.insitechat.all_keys
        seen: set[str] = set()
        for i, bot in enumerate(self.chatbots):
            if bot.id in seen:
                yield f"chatbots[{i}].id: {bot.id} is listed twice"
            seen.add(bot.id)
            if bot.key not in keys:
                yield f"chatbots[{i}].key: no key named {bot.key!r} in insitechat.keys"
        if not self.routes:
            yield "routes: at least one route is needed, or the bot answers nowhere"
        for i, route in enumerate(self.routes):
            if route.platform != "*" and self._platform(route.platform) is None:
                yield f"routes[{i}].platform: {route.platform} is routed but has no {route.platform} section"
            if self.chatbot_key(route.chatbot) not in keys:
                yield f"routes[{i}].chatbot: no insitechat key for it; add it under chatbots with a key"
        if self.slack is not None and self.slack.assistant.enabled and not self._routes_slack_dms():
            yield (
                "slack.assistant: the assistant view is a DM with the bot, but no route answers Slack DMs; "
                'add a route with channel: dm (or "*"), or turn the assistant off'
            )
        for i, rule in enumerate(self.alerts):
            rule_bot = self.chatbot_settings(rule.chatbot)
            if self.webhooks.verify_signatures and not (rule_bot and rule_bot.webhook_secret):
                yield (
                    f"alerts[{i}].chatbot: {rule.chatbot} has no webhook_secret under chatbots: "
                    "its webhooks cannot be verified (or set webhooks.verify_signatures: false)"
                )
            for j, dest in enumerate(rule.to):
                platform = dest.split(":", 1)[0]
                if self._platform(platform) is None:
                    yield f"alerts[{i}].to[{j}]: {platform} has no section configured"
        digest = self.report.digest
        for j, dest in enumerate(digest.to if digest is not None else ()):
            platform = dest.split(":", 1)[0]
            if self._platform(platform) is None:
                yield f"report.digest.to[{j}]: {platform} has no section configured"

    def _routes_slack_dms(self) -> bool:
        return any(
            r.platform in ("slack", "*") and r.channel in ("dm", "*") and r.reply is not ReplyMode.OFF
            for r in self.routes
        )

    def assistant_prompts(self, workspace: str, channel: str) -> tuple[SuggestedPrompt, ...] | None:
        """The suggested prompts for a Slack assistant thread in the DM `channel`; None when no route answers there.

        The assistant view is a DM with the bot, so the DM route's chatbot answers in it.
        """
        route = self.route_for("slack", workspace, channel, True)
        if route is None or route.reply is ReplyMode.OFF:
            return None
        bot = self.chatbot_settings(route.chatbot)
        return bot.suggested_prompts if bot is not None else ()

    def _platform(self, name: str) -> object | None:
        return {"slack": self.slack, "discord": self.discord, "console": self.console}.get(name)

    def chatbot_key(self, chatbot_id: str) -> str:
        """The name of the API key that reaches this chatbot."""
        for bot in self.chatbots:
            if bot.id == chatbot_id:
                return bot.key
        return DEFAULT_KEY

    def chatbot_settings(self, chatbot_id: str) -> ChatbotSettings | None:
        return next((bot for bot in self.chatbots if bot.id == chatbot_id), None)

    def route_for(self, platform: str, workspace: str, channel: str, is_dm: bool) -> RouteSettings | None:
        """The most specific route for a place; on a tie the one listed first wins."""
        candidates = [r for r in self.routes if r.matches(platform, workspace, channel, is_dm)]
        if not candidates:
            return None
        best = max(r.specificity for r in candidates)
        return next(r for r in candidates if r.specificity == best)

    def route_name(self, platform: str, workspace: str, channel: str, is_dm: bool) -> str:
        """The config path of the route that decides in a place ("routes[2]"), for logs; "" when none does."""
        route = self.route_for(platform, workspace, channel, is_dm)
        return next((f"routes[{i}]" for i, r in enumerate(self.routes) if r is route), "")

    def discord_threads(self, workspace: str, channel: str) -> bool:
        """Discord: whether an answer to a channel message goes in a new thread.

        The route's choice, else discord.threads.
        """
        route = self.route_for("discord", workspace, channel, False)
        if route is not None and route.threads is not None:
            return route.threads
        return self.discord.threads if self.discord is not None else True

    def answers_everything(self, platform: str) -> bool:
        """Whether some route answers every message on `platform` (reply: all), not only mentions."""
        return any(r.platform in (platform, "*") and r.reply is ReplyMode.ALL for r in self.routes)

    @property
    def platforms(self) -> list[str]:
        return [name for name in PLATFORMS if self._platform(name) is not None]


def _check_uuid(value: str) -> str:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ValueError("not a UUID (the chatbot id from the InsiteChat dashboard)") from None
    return value


# --- loading ---------------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *, env_needed_by: tuple[str, ...] | None = None
) -> Settings:
    """Read, interpolate and validate a config file; raise ConfigError listing every problem (see `loads`)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    return loads(text, source=source, env=os.environ if env is None else env, env_needed_by=env_needed_by)


UNSET = "<unset>"  # stands in for a variable a command does not need (see env_needed_by)


def loads(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    env_needed_by: tuple[str, ...] | None = None,
) -> Settings:
    """Parse, interpolate and validate; `env_needed_by`: only these top-level sections need their
    ${VARS} set (others get UNSET), for commands that run before every secret exists; None: all do."""
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(
            source, [f"{where}not valid YAML ({getattr(exc, 'problem', None) or 'syntax error'})"]
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must be a mapping of sections (insitechat:, routes:, ...)"])
    problems: list[str] = []
    problems += _literal_secrets(raw)
    secrets: list[str] = []
    data = _interpolate(raw, (), env, problems, secrets, env_needed_by)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, problems + _describe(exc, secrets)) from None
    problems += settings.cross_problems()
    if problems:
        raise ConfigError(source, problems)
    return settings


def _literal_secrets(raw: Any) -> list[str]:
    """Secrets written into the file itself are refused: they belong in the environment."""
    problems = []
    for path, value in _walk(raw, ()):
        secret = any(_path_matches(path, pattern) for pattern in SECRET_PATHS)
        if secret and isinstance(value, str) and not _SECRET_REF.match(value.strip()):
            problems.append(f"{_dotted(path)}: secrets come from the environment; write ${{SOME_VAR}} here")
    return problems


def _walk(node: Any, path: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, index))


def _path_matches(path: tuple[str | int, ...], pattern: tuple[str, ...]) -> bool:
    return len(path) == len(pattern) and all(p == "*" or p == str(q) for p, q in zip(pattern, path, strict=True))


def _interpolate(
    node: Any,
    path: tuple[str | int, ...],
    env: Mapping[str, str],
    problems: list[str],
    secrets: list[str],
    needed_by: tuple[str, ...] | None = None,
) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, (*path, str(k)), env, problems, secrets, needed_by) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*path, i), env, problems, secrets, needed_by) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                if needed_by is not None and str(path[0]) not in needed_by:
                    return UNSET
                problems.append(f"{_dotted(path)}: environment variable {name} is not set")
                return ""
            value = default
        return value

    result = _ENV_REF.sub(replace, node)
    if any(_path_matches(path, pattern) for pattern in SECRET_PATHS) and result and result != UNSET:
        secrets.append(result)
    return result


def _describe(exc: ValidationError, secrets: list[str]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(part for part in error["loc"] if not _is_union_tag(part))
        problems.append(f"{_dotted(loc)}: {_plain(error)}")
    return [_redact(p, secrets) for p in problems]


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the chosen union member ("SlackSettings", "str") into the location.
    return isinstance(part, str) and (part[:1].isupper() or part in {"str", "int", "float", "bool", "none"})


def _plain(error: ErrorDetails) -> str:
    kind, message = error["type"], error["msg"]
    plain = {
        "missing": "required but missing",
        "extra_forbidden": "unknown option (a typo?)",
        "model_type": "must be a mapping",
        "dict_type": "must be a mapping",
        "tuple_type": "must be a list",
    }.get(kind)
    if plain:
        return plain
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _redact(text: str, secrets: list[str]) -> str:
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
