"""insitechat-bridge: an InsiteChat chatbot in Slack and Discord, and its webhooks as team alerts."""

__version__ = "0.1.0"
