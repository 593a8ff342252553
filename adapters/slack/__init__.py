"""Slack: slack-bolt's AsyncApp over Socket Mode or HTTP events, translated to and from the bridge's messages."""

from adapters.slack.adapter import SlackAdapter
from adapters.slack.setup import SlackError, SlackRefused, check, manifest

__all__ = ["SlackAdapter", "SlackError", "SlackRefused", "check", "manifest"]
