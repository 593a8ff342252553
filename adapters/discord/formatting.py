"""Discord's rendering of the chatbot's Markdown: safe, split Discord Markdown that can never ping anyone."""

from __future__ import annotations

import re

from bridge.formatting import NO_MARKS, ZWSP, MarkdownRenderer, Markers, split_text, unwrap

DISCORD_LIMIT = 2000  # Discord rejects longer content (400, code 50035)

# Discord pings on "@everyone"/"@here" and on <@id>, <@!id> (user) and <@&id> (role).
# No word boundary after: "@here_now" and "_@here_" must not even look like a ping; an address before stays.
_DISCORD_CROWD = re.compile(r"(?<![A-Za-z0-9])@(?=everyone|here)", re.IGNORECASE)  # mail@here.com stays
_DISCORD_MENTION = re.compile(r"<@(?=[!&]?\d)")  # what is left: one cut short, e.g. "<@123" at a part's end
# A whole user or role mention reads as what it is: the id means nothing to a reader, and the
# chatbot's text (its sources) cannot know who it would be in this server.
_DISCORD_USER = re.compile(r"<@!?\d+>")
_DISCORD_ROLE = re.compile(r"<@&\d+>")


def neutralise_discord(text: str) -> str:
    """Makes @everyone, @here and raw <@id>/<@!id>/<@&id> in text inert (defence in depth): "@user", "@role"."""
    text = _DISCORD_USER.sub("@" + ZWSP + "user", text)
    text = _DISCORD_ROLE.sub("@" + ZWSP + "role", text)
    text = _DISCORD_MENTION.sub("<@" + ZWSP, text)
    return _DISCORD_CROWD.sub("@" + ZWSP, text)


# Discord is native except "__x__", which Discord shows underlined, not bold as Markdown means.
DISCORD_MARKS: Markers = {
    "bi": ("***", "***"), "b": ("**", "**"), "bu": ("**", "**"),
    "s": ("~~", "~~"), "i": ("*", "*"), "iu": ("_", "_"),
}


class DiscordRenderer(MarkdownRenderer):
    marks = DISCORD_MARKS

    def escaped(self, char: str) -> str:
        return "\\" + char  # Discord honours backslash escapes itself

    def link(self, label: str, destination: str) -> str:
        if not label.strip():
            return self.autolink(unwrap(destination))
        return f"[{self.inline(label, self.marks)}]({destination})"  # masked links render natively

    def image(self, alt: str, url: str) -> str:
        return self.link(alt, url)  # Discord shows no inline images; a masked link keeps the alt

    def autolink(self, url: str) -> str:
        return f"<{url}>"

    def bare_url(self, url: str) -> str:
        return f"<{url}>"  # angle brackets stop Discord from unfurling an embed per URL

    def heading(self, level: int, text: str) -> str:
        if not text.strip():
            return ""
        if level <= 3:  # Discord renders #, ## and ### natively
            return "#" * level + " " + self.inline(text, self.marks)
        shown = self.inline(text, NO_MARKS)
        return f"**{shown}**" if shown.strip() else ""

    def list_item(self, level: int, indent: str, marker: str, text: str) -> str:
        return f"{indent}{marker} {self.inline(text, self.marks)}"  # Discord nests lists natively


_DISCORD = DiscordRenderer()


def to_discord(markdown: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Discord Markdown parts for a Markdown answer; [] when it is empty."""
    return split_text(neutralise_discord(_DISCORD.render(markdown)), limit)
