"""Slack's rendering of the chatbot's Markdown: safe, split mrkdwn that can never ping a crowd."""

from __future__ import annotations

import re

from bridge.formatting import NO_MARKS, SAFE_SCHEME, ZWSP, MarkdownRenderer, Markers, split_text, unfence, unwrap

SLACK_LIMIT = 3900  # Slack truncates text past 40k and a markdown/section block takes < 4000

# "<!channel>", "<!here>", "<!subteam^S1>", "<@U1>", "<#C1>": Slack's special syntax.
_SLACK_SPECIAL = re.compile(r"<([!@#][^<>\n]*)>")
_SLACK_SPECIAL_OPEN = re.compile(r"<(?=[!@#])")  # an unclosed one, e.g. cut by the AI
_SLACK_CROWD = re.compile(r"(?<![A-Za-z0-9])@(?=channel|here|everyone)", re.IGNORECASE)  # as on Discord


def neutralise_slack(text: str) -> str:
    """Makes Slack mention syntax in text inert, leaving generated <https://...|label> links alone."""
    text = _SLACK_SPECIAL.sub(r"&lt;\1&gt;", text)
    text = _SLACK_SPECIAL_OPEN.sub("&lt;", text)
    return _SLACK_CROWD.sub("@" + ZWSP, text)


def slack_escape(text: str) -> str:
    """Slack reads &, < and > as control characters everywhere, code included."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


SLACK_MARKS: Markers = {
    "bi": ("*_", "_*"), "b": ("*", "*"), "bu": ("*", "*"),
    "s": ("~", "~"), "i": ("_", "_"), "iu": ("_", "_"),
}


class SlackRenderer(MarkdownRenderer):
    marks = SLACK_MARKS
    keep_fence_language = False  # Slack shows the tag as a first code line instead

    def text(self, text: str) -> str:
        return slack_escape(text)

    def link(self, label: str, destination: str) -> str:
        url = unwrap(destination)
        if not SAFE_SCHEME.match(url):
            # Not a web link: show it as text, so no <!...> or <@...> can be built from it.
            shown_url = slack_escape(url)
            return f"{self.inline(label, self.marks)} ({shown_url})" if label.strip() else shown_url
        target = slack_escape(url).replace("|", "%7C")  # "|" would end the URL early
        if not label.strip() or label == url:
            return f"<{target}>"
        return f"<{target}|{self.inline(label, self.marks)}>"

    def autolink(self, url: str) -> str:
        return self.link("", url) if SAFE_SCHEME.match(url) else slack_escape(f"<{url}>")

    def bare_url(self, url: str) -> str:
        return slack_escape(url)  # Slack links bare URLs itself

    def heading(self, level: int, text: str) -> str:
        shown = self.inline(text, NO_MARKS)  # Slack cannot nest bold inside bold
        return f"*{shown}*" if shown.strip() else ""

    def code_block(self, language: str, body: list[str]) -> list[str]:
        return ["```", *(unfence(slack_escape(line)) for line in body), "```"]


_SLACK = SlackRenderer()


def to_slack(markdown: str, limit: int = SLACK_LIMIT) -> list[str]:
    """Slack mrkdwn parts for a Markdown answer; [] when it is empty."""
    return split_text(neutralise_slack(_SLACK.render(markdown)), limit)
