"""Table-driven tests for Markdown -> Slack / Discord / plain conversion, splitting and mention safety."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.discord.formatting import DISCORD_LIMIT, neutralise_discord, to_discord
from adapters.slack.formatting import SLACK_LIMIT, neutralise_slack, to_slack
from bridge.formatting import ZWSP, split_text, to_plain

UNLIMITED = 10**9
Convert = Callable[..., list[str]]

# ---------------------------------------------------------------------------------------
# Conversion, one rule per row: (input Markdown, expected output).

SLACK_CASES = [
    ("bold-stars", "**bold**", "*bold*"),
    ("bold-underscores", "__bold__", "*bold*"),
    ("italic-star", "an *italic* word", "an _italic_ word"),
    ("italic-underscore", "an _italic_ word", "an _italic_ word"),
    ("bold-italic", "***both***", "*_both_*"),
    ("nested-emphasis", "**a *b* c**", "*a _b_ c*"),
    ("strike", "~~gone~~", "~gone~"),
    ("snake-case-kept", "call snake_case_name now", "call snake_case_name now"),
    ("arithmetic-kept", "2 * 3 * 4", "2 * 3 * 4"),
    ("unclosed-bold-kept", "**not closed", "**not closed"),
    ("link", "[docs](https://x.io/a?b=1&c=2)", "<https://x.io/a?b=1&amp;c=2|docs>"),
    ("link-parens", "[wiki](https://w.org/Foo_(bar))", "<https://w.org/Foo_(bar)|wiki>"),
    ("link-bold-label", "[**docs**](https://x.io)", "<https://x.io|*docs*>"),
    ("link-pipe-in-url", "[a](https://x.io/?q=a|b)", "<https://x.io/?q=a%7Cb|a>"),
    ("link-label-is-url", "[https://x.io](https://x.io)", "<https://x.io>"),
    ("link-title-dropped", '[a](https://x.io "Title")', "<https://x.io|a>"),
    ("link-angle-destination", "[a](<https://x.io/b c>)", "<https://x.io/b c|a>"),
    ("link-relative-as-text", "[guide](/docs/guide)", "guide (/docs/guide)"),
    ("bare-url-kept", "see https://x.io/a_b_c.", "see https://x.io/a_b_c."),
    ("bare-url-escaped", "https://x.io/?a=1&b=2", "https://x.io/?a=1&amp;b=2"),
    ("autolink", "<https://x.io>", "<https://x.io>"),
    ("image", "![logo](https://x.io/l.png)", "<https://x.io/l.png|logo>"),
    ("image-no-alt", "![](https://x.io/l.png)", "<https://x.io/l.png>"),
    ("heading", "# Title", "*Title*"),
    ("heading-bold-inside", "### **Bold** title ###", "*Bold title*"),
    ("bullets", "- a\n* b\n+ c", "• a\n• b\n• c"),
    ("nested-bullets", "- a\n  - b\n    - c\n- d", "• a\n    • b\n        • c\n• d"),
    ("numbered", "1. one\n2. **two**", "1. one\n2. *two*"),
    ("nested-numbered", "1. one\n   - sub", "1. one\n    • sub"),
    ("quote", "> a **b**", "> a *b*"),
    ("quote-nested-flattened", "> a\n> > b", "> a\n> b"),
    ("escape-control-chars", "a < b && c > d", "a &lt; b &amp;&amp; c &gt; d"),
    ("inline-code-verbatim", "`**x** <y>`", "`**x** &lt;y&gt;`"),
    ("inline-code-double-ticks", "``a ` b``", "``a ` b``"),
    ("code-block-verbatim-no-language", "```python\nx = '**a**' < 1\n```", "```\nx = '**a**' &lt; 1\n```"),
    ("code-block-unclosed", "```\nx = 1", "```\nx = 1\n```"),
    ("code-block-indented-in-list", "1. step\n   ```bash\n   ls *.txt\n   ```", "1. step\n```\nls *.txt\n```"),
    ("code-block-tilde", "~~~\n~~x~~\n~~~", "```\n~~x~~\n```"),
    (
        "table",
        "| a | b |\n|---|--:|\n| x | 10 |\n| long | 2 |",
        "```\na    |  b\n-----+---\nx    | 10\nlong |  2\n```",
    ),
    (
        "table-cells-plain-and-escaped",
        "| Who | Where |\n|---|---|\n| **Al** & co | [site](https://a.io) |",
        "```\nWho     | Where\n--------+--------------------\nAl &amp; co | site (https://a.io)\n```",
    ),
    ("rule", "a\n\n---\n\nb", "a\n\n──────────\n\nb"),
    ("backslash-escape", "1\\. not a list, \\<b\\>", "1. not a list, &lt;b&gt;"),
    ("blank-runs-collapsed", "a\n\n\n\nb", "a\n\nb"),
    ("crlf", "a\r\nb", "a\nb"),
    ("crowd-word", "hi @channel", f"hi @{ZWSP}channel"),
]

DISCORD_CASES = [
    ("bold-native", "**b**", "**b**"),
    ("italic-native", "*i* and _j_", "*i* and _j_"),
    ("bold-italic-native", "***bi***", "***bi***"),
    ("strike-native", "~~s~~", "~~s~~"),
    ("underscore-bold-not-underline", "__b__", "**b**"),
    ("masked-link-kept", "[docs](https://x.io)", "[docs](https://x.io)"),
    ("link-empty-label", "[](https://x.io)", "<https://x.io>"),
    ("bare-url-wrapped", "see https://x.io.", "see <https://x.io>."),
    ("bare-url-parens", "https://w.org/Foo_(bar)", "<https://w.org/Foo_(bar)>"),
    ("autolink-kept", "<https://x.io>", "<https://x.io>"),
    ("image-as-link", "![logo](https://x.io/l.png)", "[logo](https://x.io/l.png)"),
    ("heading-1", "# T", "# T"),
    ("heading-2", "## T", "## T"),
    ("heading-3", "### T ###", "### T"),
    ("heading-4-bold", "#### T", "**T**"),
    ("heading-6-bold-stripped", "###### **T**", "**T**"),
    ("lists-native", "- a\n  - b\n1. c", "- a\n  - b\n1. c"),
    ("quote-native", "> **q**", "> **q**"),
    ("code-keeps-language", "```python\nx = '__a__' < 1\n```", "```python\nx = '__a__' < 1\n```"),
    ("tilde-fence-normalised", "~~~js\nx\n~~~", "```js\nx\n```"),
    ("inline-code-verbatim", "`__x__ https://x.io`", "`__x__ https://x.io`"),
    ("no-html-escaping", "a < b & c", "a < b & c"),
    ("backslash-escape-kept", "\\*x\\*", "\\*x\\*"),
    ("table", "| a | b |\n|---|---|\n| 1 | 2 |", "```\na | b\n--+--\n1 | 2\n```"),
    (
        "table-wide-chars",
        "| 名 | n |\n|---|---|\n| 李 | 1 |\n| ab | 2 |",
        "```\n名 | n\n---+--\n李 | 1\nab | 2\n```",
    ),
    ("rule", "---", "──────────"),
]

PLAIN_CASES = [
    ("emphasis-removed", "**b**, *i*, __u__, ~~s~~", "b, i, u, s"),
    ("link", "[docs](https://x.io)", "docs (https://x.io)"),
    ("bare-url", "https://x.io", "https://x.io"),
    ("heading", "## Title", "Title"),
    ("bullets", "- a\n  - b", "• a\n    • b"),
    ("inline-code-kept", "`x*y*`", "`x*y*`"),
    ("code-block-kept", "```sh\nls\n```", "```sh\nls\n```"),
    ("table-unfenced", "| a | b |\n|---|---|\n| 1 | 2 |", "a | b\n--+--\n1 | 2"),
    ("mentions-inert", "@here <@U1>", f"@{ZWSP}here <{ZWSP}@U1>"),
]


@pytest.mark.parametrize(("markdown", "expected"), [c[1:] for c in SLACK_CASES], ids=[c[0] for c in SLACK_CASES])
def test_to_slack_converts(markdown: str, expected: str) -> None:
    assert to_slack(markdown, UNLIMITED) == [expected]


@pytest.mark.parametrize(("markdown", "expected"), [c[1:] for c in DISCORD_CASES], ids=[c[0] for c in DISCORD_CASES])
def test_to_discord_converts(markdown: str, expected: str) -> None:
    assert to_discord(markdown, UNLIMITED) == [expected]


@pytest.mark.parametrize(("markdown", "expected"), [c[1:] for c in PLAIN_CASES], ids=[c[0] for c in PLAIN_CASES])
def test_to_plain_converts(markdown: str, expected: str) -> None:
    assert to_plain(markdown) == [expected]


@pytest.mark.parametrize("convert", [to_slack, to_discord, to_plain])
@pytest.mark.parametrize("markdown", ["", "   ", "\n\n \t\n"])
def test_empty_answer_gives_no_parts(convert: Convert, markdown: str) -> None:
    # The relay turns [] into a kind "no answer" notice.
    assert convert(markdown) == []


def test_default_limits() -> None:
    assert (SLACK_LIMIT, DISCORD_LIMIT) == (3900, 2000)
    assert all(len(p) <= SLACK_LIMIT for p in to_slack("word " * 3000))
    assert all(len(p) <= DISCORD_LIMIT for p in to_discord("word " * 3000))


def test_to_plain_splits_only_when_asked() -> None:
    text = "word " * 100
    assert len(to_plain(text)) == 1
    assert len(to_plain(text, limit=100)) > 1


# ---------------------------------------------------------------------------------------
# Hostile AI text: nothing may ping.

HOSTILE = [
    "@everyone look",
    "@here now",
    "@channel now",
    "@EVERYONE shouting",
    "<!channel>",
    "<!here|here>",
    "<!everyone>",
    "<!subteam^S123>",
    "<!subteam^S123|@oncall>",
    "<@U012ABC>",
    "<#C012ABC>",
    "<@123456789>",
    "<@!123456789>",
    "<@&123456789>",
    "`@everyone <!channel> <@&1>`",
    "```\n@here <!here> <@!2>\n```",
    "# @everyone heading",
    "- @here in a list",
    "> <!channel> quoted",
    "**@everyone** bold",
    "[@everyone](https://x.io)",
    "[click](!channel)",
    "[click](<@U012ABC>)",
    "<mailto:a@b.c> and <!here>",
    "| @here | <@&5> |\n|---|---|\n| <!channel> | @everyone |",
    "unclosed <!channel",
]

_SLACK_PING = [
    re.compile(r"<[!@#]"),  # special mentions, user and channel links
    re.compile(r"@(?:channel|here|everyone)\b", re.IGNORECASE),
]
_DISCORD_PING = [
    re.compile(r"@(?:everyone|here)\b", re.IGNORECASE),
    re.compile(r"<@[!&]?\d"),
]


@pytest.mark.parametrize("markdown", HOSTILE)
def test_hostile_text_never_pings_on_slack(markdown: str) -> None:
    out = "\n".join(to_slack(markdown))
    assert out.strip()
    for ping in _SLACK_PING:
        assert not ping.search(out), out


@pytest.mark.parametrize("markdown", HOSTILE)
def test_hostile_text_never_pings_on_discord(markdown: str) -> None:
    out = "\n".join(to_discord(markdown))
    assert out.strip()
    for ping in _DISCORD_PING:
        assert not ping.search(out), out


@pytest.mark.parametrize("markdown", HOSTILE)
def test_hostile_text_never_pings_on_console(markdown: str) -> None:
    out = "\n".join(to_plain(markdown))
    for ping in (*_SLACK_PING, *_DISCORD_PING):
        assert not ping.search(out), out


NEUTRALISE_SLACK_CASES = [
    ("<!channel>", "&lt;!channel&gt;"),
    ("<!subteam^S123>", "&lt;!subteam^S123&gt;"),
    ("<@U1> <#C1>", "&lt;@U1&gt; &lt;#C1&gt;"),
    ("@here and @Everyone", f"@{ZWSP}here and @{ZWSP}Everyone"),
    ("<https://x.io|docs>", "<https://x.io|docs>"),  # our own links stay links
    ("mail@hereford.com", "mail@hereford.com"),
]

NEUTRALISE_DISCORD_CASES = [
    ("<@123>", f"@{ZWSP}user"),  # an id means nothing to a reader: not a literal "<@!123>"
    ("<@!123>", f"@{ZWSP}user"),
    ("<@&123>", f"@{ZWSP}role"),
    ("cut short: <@123", f"cut short: <@{ZWSP}123"),
    ("@everyone @here", f"@{ZWSP}everyone @{ZWSP}here"),
    ("<#123> <:emoji:456>", "<#123> <:emoji:456>"),  # channel links and emoji never ping
]


@pytest.mark.parametrize(("text", "expected"), NEUTRALISE_SLACK_CASES)
def test_neutralise_slack(text: str, expected: str) -> None:
    assert neutralise_slack(text) == expected
    assert neutralise_slack(expected) == expected  # idempotent


@pytest.mark.parametrize(("text", "expected"), NEUTRALISE_DISCORD_CASES)
def test_neutralise_discord(text: str, expected: str) -> None:
    assert neutralise_discord(text) == expected
    assert neutralise_discord(expected) == expected  # idempotent


# ---------------------------------------------------------------------------------------
# Splitting.

SPLIT_CASES = [
    ("fits", "short", 10, ["short"]),
    ("empty", "", 10, []),
    ("whitespace-only", " \n\t\n", 10, []),
    ("paragraph-break-first", "aaa\n\nbbb\nccc", 8, ["aaa", "bbb\nccc"]),
    ("line-break-next", "aaa bbb\nccc", 8, ["aaa bbb", "ccc"]),
    ("space-next", "aaa bbb ccc", 8, ["aaa bbb", "ccc"]),
    ("hard-split-long-token", "abcdefghij", 4, ["abcd", "efgh", "ij"]),
    ("link-kept-whole", "see <https://x.io/a|the label> now", 28, ["see", "<https://x.io/a|the label>", "now"]),
    ("markdown-link-kept-whole", "go [a b c](https://x.io) now", 21, ["go", "[a b c](https://x.io)", "now"]),
    ("entity-kept-whole", "abc &amp;", 7, ["abc", "&amp;"]),
    (
        "fence-closed-and-reopened",
        "```py\na = 1\nb = 2\nc = 3\n```",
        21,
        ["```py\na = 1\nb = 2\n```", "```py\nc = 3\n```"],
    ),
    (
        "fence-not-split-when-before-it-fits",
        "intro\n\n```\nx\n```",
        12,
        ["intro", "```\nx\n```"],
    ),
]


@pytest.mark.parametrize(
    ("text", "limit", "expected"), [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES]
)
def test_split_text(text: str, limit: int, expected: list[str]) -> None:
    assert split_text(text, limit) == expected


_FENCED_DOC = (
    "Intro line.\n\n```sh\n" + "\n".join(f"echo {i:02d} > out" for i in range(30)) + "\n```\n\n\n\nOutro words here."
)


@pytest.mark.parametrize("limit", range(16, 120))
def test_split_text_every_limit_on_a_fenced_document(limit: int) -> None:
    # Sweeping every small limit puts a cut on every possible boundary, so an added
    # closing fence not counted against the limit shows up here.
    parts = split_text(_FENCED_DOC, limit)
    assert all(len(part) <= limit for part in parts), [p for p in parts if len(p) > limit]
    assert all(_fences_balanced(part) for part in parts)
    assert all(part == part.strip("\n") for part in parts)  # no blank lines left at a cut
    assert _code_and_text(parts) == _code_and_text([_FENCED_DOC])


def test_split_text_rejects_non_positive_limit() -> None:
    with pytest.raises(ValueError):
        split_text("x", 0)


def _is_fence(line: str) -> bool:
    return line.lstrip().startswith(("```", "~~~"))


def _fences_balanced(part: str) -> bool:
    return sum(1 for line in part.split("\n") if _is_fence(line)) % 2 == 0


def _lines_with_code_flag(parts: list[str]) -> list[tuple[bool, str]]:
    """Non-blank, non-fence lines in order, each with whether it sits inside a code block."""
    out: list[tuple[bool, str]] = []
    for part in parts:
        in_code = False
        for line in part.split("\n"):
            if _is_fence(line):
                in_code = not in_code
            elif line.strip():
                out.append((in_code, line.rstrip()))
    return out


def _big_answer(lines: int) -> str:
    """A long, varied answer: prose, lists, links, mentions and several code fences."""
    out: list[str] = []
    i = 0
    while len(out) < lines:
        out += [
            f"## Section {i}",
            f"Paragraph {i} has **bold**, _italic_, a [link {i}](https://x.io/{i}?a=1&b=2) and @here.",
            f"- item {i} with `code <{i}>`",
            "  - nested item",
            "",
        ]
        if i % 5 == 0:
            out += ["```python", *(f"    value_{i}_{j} = compute({j}) < {j} & True" for j in range(60)), "```", ""]
        i += 1
    return "\n".join(out[:lines]) + "\n```\n"


@pytest.mark.parametrize(("convert", "limit"), [(to_slack, SLACK_LIMIT), (to_discord, DISCORD_LIMIT)])
def test_long_answer_splits_within_limit_with_balanced_fences(convert: Convert, limit: int) -> None:
    markdown = _big_answer(5000)
    whole = convert(markdown, UNLIMITED)
    parts = convert(markdown, limit)
    assert len(whole) == 1 and len(parts) > 10
    assert all(0 < len(part) <= limit for part in parts)
    assert all(_fences_balanced(part) for part in parts)
    # Same lines, same order, and code still inside code, once the added fences are gone.
    assert _lines_with_code_flag(parts) == _lines_with_code_flag(whole)


@pytest.mark.parametrize("convert", [to_slack, to_discord])
def test_long_answer_formats_fast(convert: Convert) -> None:
    markdown = _big_answer(5000)
    started = time.perf_counter()
    convert(markdown)
    assert time.perf_counter() - started < 1.0


def test_discord_code_answer_reopens_fence_with_language() -> None:
    code = "\n".join(f"print('line {i:03d} of a long listing')  # padding" for i in range(150))
    markdown = f"Here is the script:\n\n```python\n{code}\n```\n\nRun it with `python x.py`."
    assert 6500 < len(markdown) < 7500
    parts = to_discord(markdown)
    assert len(parts) >= 4
    assert all(len(part) <= DISCORD_LIMIT for part in parts)
    assert all(_fences_balanced(part) for part in parts)
    for part in parts[1:-1]:
        assert part.startswith("```python\n") and part.endswith("\n```")
    assert _lines_with_code_flag(parts) == _lines_with_code_flag(to_discord(markdown, UNLIMITED))


@pytest.mark.parametrize(
    ("convert", "link"),
    [
        (to_slack, "<https://example.com/some/long/path?query=1|a label with several spaces>"),
        (to_discord, "[a label with several spaces](https://example.com/some/long/path?query=1)"),
    ],
)
def test_link_is_never_split(convert: Convert, link: str) -> None:
    markdown = "[a label with several spaces](https://example.com/some/long/path?query=1)"
    for padding in range(0, 120, 7):  # slide the link across the cut point
        parts = convert("word " * padding + markdown + " end", 100)
        assert sum(part.count(link) for part in parts) == 1, parts
        assert all(len(part) <= 100 for part in parts)


# ---------------------------------------------------------------------------------------
# Properties of split_text over generated texts.

_LINKS = ["<https://x.io/p|a link>", "[b c](https://y.io)", "&amp;"]
_WORDS = st.sampled_from(["a", "word", "longerword", "x" * 25, *_LINKS])
_GAPS = st.sampled_from([" ", " ", "\n", "\n\n"])
_PROSE = st.lists(st.tuples(_WORDS, _GAPS), min_size=1, max_size=40).map(lambda xs: "".join(w + g for w, g in xs))
_CODE_LINE = st.lists(st.sampled_from(["x", "= 1", "    indent", "y" * 30, "#c"]), min_size=1, max_size=4).map(" ".join)
_CODE = st.tuples(st.sampled_from(["```", "```python"]), st.lists(_CODE_LINE, min_size=1, max_size=15)).map(
    lambda t: t[0] + "\n" + "\n".join(t[1]) + "\n```"
)
_DOCUMENT = st.lists(st.one_of(_PROSE, _CODE), min_size=1, max_size=8).map("\n\n".join)


def _no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _code_and_text(parts: list[str]) -> tuple[str, str]:
    """All code characters and all prose characters, whitespace and fences removed."""
    code, text = [], []
    for part in parts:
        in_code = False
        for line in part.split("\n"):
            if _is_fence(line):
                in_code = not in_code
            else:
                (code if in_code else text).append(_no_space(line))
    return "".join(code), "".join(text)


@settings(max_examples=300, deadline=None)
@given(text=_DOCUMENT, limit=st.integers(min_value=16, max_value=400))
def test_split_text_properties(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    assert parts
    assert all(len(part) <= limit for part in parts)
    assert all(part.strip() and part == part.strip("\n") for part in parts)
    assert all(_fences_balanced(part) for part in parts)
    # No content lost or reordered, and code stays code, text stays text.
    assert _code_and_text(parts) == _code_and_text([text])


@settings(max_examples=200, deadline=None)
@given(text=_DOCUMENT, limit=st.integers(min_value=40, max_value=400))
def test_split_text_keeps_links_whole(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    for link in _LINKS:
        assert sum(part.count(link) for part in parts) == text.count(link)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=600), limit=st.integers(min_value=1, max_value=300))
def test_split_text_any_text_within_limit_and_nothing_lost(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    assert all(0 < len(part) <= limit for part in parts)
    if limit >= 16 and "`" not in text and "~" not in text:  # no fences, so nothing is added
        assert _no_space("".join(parts)) == _no_space(text)


NESTED_FENCES = [
    "````markdown\n```python\nprint(1)\n```\n````",  # a longer fence around a ``` block
    "~~~\n```\ninside a tilde fence\n```\n~~~",
    "```text\nan inline ``` in the middle\n```",
]


@pytest.mark.parametrize("convert", [to_slack, to_discord])
@pytest.mark.parametrize("markdown", NESTED_FENCES)
def test_backticks_inside_a_code_block_cannot_end_it(convert: Convert, markdown: str) -> None:
    """Slack and Discord toggle code at every ```: only the block's own two fences may contain one."""
    [text] = convert(markdown, UNLIMITED)
    lines = text.split("\n")
    assert [line for line in lines if "```" in line] == [lines[0], lines[-1]]
    assert lines[-1] == "```" and lines[0].startswith("```")
    inner = [line.replace(ZWSP, "") for line in lines[1:-1]]
    original = markdown.split("\n")[1:-1]
    assert inner == original  # what the reader sees is the code as written


@pytest.mark.parametrize("crowd", ["@everyone123", "@here_now", "_@here_", "(@everyone)", "@HERE!", "@everyone's"])
def test_a_crowd_mention_glued_to_other_text_is_neutralised_too(crowd: str) -> None:
    """No word boundary needed: "@here_now" must not even look like a ping."""
    for neutralise in (neutralise_discord, neutralise_slack):
        out = neutralise(crowd)
        assert "@" + ZWSP in out and out.replace(ZWSP, "") == crowd.replace("<", "&lt;").replace(">", "&gt;")
    for convert in (to_discord, to_slack):
        assert re.search(r"@(?:everyone|here)", "\n".join(convert(crowd)), re.IGNORECASE) is None
