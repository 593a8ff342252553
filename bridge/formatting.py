"""The Markdown engine every platform renders with: a block walker to subclass, splitting, and plain text."""

from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass

# Inserted after "@" (or "<@") so a platform no longer reads a mention; invisible when shown.
ZWSP = "\u200b"

# Stand-ins for protected inline tokens while emphasis rules run. Private-use characters
# mean nothing in text, so they are removed from the input first and cannot collide.
_TOKEN_OPEN, _TOKEN_CLOSE = "\ue000", "\ue001"
_TOKEN_REF = re.compile(_TOKEN_OPEN + r"(\d+)" + _TOKEN_CLOSE)

# Slack would turn <scheme:...> into a live link; only these may become one, so that
# "[x](!channel)" can never produce "<!channel|x>".
SAFE_SCHEME = re.compile(r"^(?:https?|mailto|ftp|tel):", re.IGNORECASE)

_RULE = "──────────"  # neither Slack nor Discord renders a Markdown horizontal rule


# ---------------------------------------------------------------------------------------
# Mention neutralising: pure string rewrites, idempotent, safe to run twice.

# An opening "<!", "<@" or "<#" (Slack's special syntax) and "@channel"/"@here"/"@everyone".
_SPECIAL_OPEN = re.compile(r"<(?=[!@#])")
_CROWD = re.compile(r"(?<![A-Za-z0-9])@(?=channel|here|everyone)", re.IGNORECASE)


def neutralise_plain(text: str) -> str:
    """Console text keeps its characters readable but must not ping when pasted anywhere."""
    text = _SPECIAL_OPEN.sub("<" + ZWSP, text)
    return _CROWD.sub("@" + ZWSP, text)


# ---------------------------------------------------------------------------------------
# Inline Markdown.

# Protected inline tokens, leftmost first; emphasis rules never look inside them.
_URL_DEST = r"(?:<[^<>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"  # allows one level of (parens)
_LINK_LABEL = r"(?:[^\[\]\n]|\[[^\[\]\n]*\])*"  # allows one level of [brackets], e.g. "[see [1]]"
_LINK_TITLE = r"""(?:\s+(?:"[^"\n]*"|'[^'\n]*'))?"""
_INLINE_TOKEN = re.compile(
    rf"""
    (?P<code>(?<!`)(?P<ticks>`+)(?P<code_body>.+?)(?<!`)(?P=ticks)(?!`))  # same-length run closes it
  | (?P<escape>\\(?P<escaped>[!-/:-@\[-`{{-~]))                   # backslash before ASCII punctuation
  | (?P<image>!\[(?P<alt>{_LINK_LABEL})\]\((?P<img_url>{_URL_DEST}){_LINK_TITLE}\s*\))
  | (?P<link>\[(?P<label>{_LINK_LABEL})\]\((?P<url>{_URL_DEST}){_LINK_TITLE}\s*\))
  | (?P<autolink><(?P<auto_url>[A-Za-z][A-Za-z0-9+.-]{{1,31}}:[^\s<>]*)>)
    # a bare URL: balanced (parens) allowed, trailing punctuation left to the sentence
  | (?P<bare>https?://(?:[^\s<>()]|\([^\s<>()]*\))*(?:[^\s<>().,:;!?'"*_~\]]|\([^\s<>()]*\)))
    """,
    re.VERBOSE,
)

# Emphasis, one alternative per kind; the text between markers must not start or end with
# a space ("2 * 3 * 4" is arithmetic), and "_" or single "*" must not touch a word
# character, so snake_case and a*b stay as written.
_EMPHASIS = re.compile(
    r"""
    \*\*\*(?=\S)(?P<bi>.+?)(?<=\S)\*\*\*
  | \*\*(?=\S)(?P<b>.+?)(?<=\S)\*\*
  | (?<!\w)__(?=\S)(?P<bu>.+?)(?<=\S)__(?!\w)
  | ~~(?=\S)(?P<s>.+?)(?<=\S)~~
  | (?<![\w*])\*(?=[^\s*])(?P<i>.+?)(?<=[^\s*])\*(?![\w*])
  | (?<!\w)_(?=[^\s_])(?P<iu>.+?)(?<=[^\s_])_(?!\w)
    """,
    re.VERBOSE,
)

Markers = dict[str, tuple[str, str]]
NO_MARKS: Markers = {kind: ("", "") for kind in ("bi", "b", "bu", "s", "i", "iu")}  # the _EMPHASIS groups


def _emphasis(text: str, marks: Markers) -> str:
    """Rewrites emphasis markers, recursing so "**a *b* c**" converts both levels."""

    def replace(match: re.Match[str]) -> str:
        kind = match.lastgroup or ""
        opening, closing = marks[kind]
        return opening + _emphasis(match.group(kind), marks) + closing

    return _EMPHASIS.sub(replace, text)


def _display_width(text: str) -> int:
    """Columns a monospace font gives text: wide East Asian characters take two."""
    width = 0
    for char in text:
        if unicodedata.combining(char) or char == ZWSP:
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


# ---------------------------------------------------------------------------------------
# Block Markdown, walked line by line.

# Fences are recognised at any indentation: inside list items they are often indented.
_FENCE_OPEN = re.compile(r"^(?P<indent> *)(?P<chars>`{3,}|~{3,})[ \t]*(?P<info>.*?)[ \t]*$")
_HEADING = re.compile(r"^ {0,3}(?P<hashes>#{1,6})(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
_HR = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")  # "---", "* * *", "___"
_LIST_ITEM = re.compile(r"^(?P<indent>[ \t]*)(?P<marker>[-*+]|\d{1,9}[.)])[ \t]+(?P<text>.*)$")
_QUOTE = re.compile(r"^ {0,3}> ?")
# A GFM table's delimiter row: cells of dashes with optional ":" for alignment.
_TABLE_DELIMITER = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")


def _fence_closes(line: str, chars: str) -> bool:
    """A closing fence repeats the opening character at least as often, and nothing else."""
    stripped = line.strip()
    return len(stripped) >= len(chars) and set(stripped) == {chars[0]}


def _open_fence(line: str) -> re.Match[str] | None:
    """An opening code fence; a backtick fence's info string may hold no backtick (CommonMark)."""
    match = _FENCE_OPEN.match(line)
    if not match:
        return None
    if match["chars"][0] == "`" and "`" in match["info"]:
        return None  # "```code```" on one line is inline code, not a fence
    return match


def _table_cells(line: str) -> list[str]:
    """Splits a table row on "|", except an escaped "\\|" or one inside `code`."""
    row = line.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    cells, current, in_code, i = [], [], False, 0
    while i < len(row):
        char = row[i]
        if char == "\\" and row[i + 1 : i + 2] == "|":
            current.append("|")
            i += 2
            continue
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(char)
        i += 1
    cells.append("".join(current).strip())
    return cells


def _is_table_start(lines: list[str], i: int) -> bool:
    """A header row followed by a delimiter row of as many cells starts a table.

    Both rows must hold a "|" (GFM allows a pipe-less delimiter; requiring one keeps
    "text" over "---" a paragraph and a rule).
    """
    if i + 1 >= len(lines) or "|" not in lines[i] or "|" not in lines[i + 1]:
        return False
    delimiter = lines[i + 1]
    return bool(_TABLE_DELIMITER.match(delimiter)) and len(_table_cells(delimiter)) == len(_table_cells(lines[i]))


def _alignment(delimiter_cell: str) -> str:
    """"left", "right" or "center" from a delimiter cell such as ":---:"."""
    if delimiter_cell.startswith(":") and delimiter_cell.endswith(":"):
        return "center"
    return "right" if delimiter_cell.endswith(":") else "left"


def _pad(text: str, width: int, align: str) -> str:
    """Pads by display width, so CJK cells line up too."""
    gap = width - _display_width(text)
    if align == "right":
        return " " * gap + text
    if align == "center":
        return " " * (gap // 2) + text + " " * (gap - gap // 2)
    return text + " " * gap


def _layout_table(rows: list[list[str]], aligns: list[str]) -> list[str]:
    """Aligned monospace lines: header, a dash rule, body rows."""
    columns = max(len(row) for row in rows)
    rows = [row + [""] * (columns - len(row)) for row in rows]  # short rows padded, none cut
    aligns = aligns + ["left"] * (columns - len(aligns))
    widths = [max(_display_width(row[c]) for row in rows) for c in range(columns)]
    lines = [" | ".join(_pad(row[c], widths[c], aligns[c]) for c in range(columns)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * max(width, 1) for width in widths))
    return lines


def _indent_width(indent: str) -> int:
    return len(indent.expandtabs(4))


class MarkdownRenderer:
    """Walks Markdown blocks line by line; subclasses say how each construct looks."""

    marks: Markers = NO_MARKS
    keep_fence_language = True

    def render(self, markdown: str) -> str:
        """The whole answer converted, blank-line runs collapsed, ends trimmed."""
        text = markdown.replace("\r\n", "\n").replace("\r", "\n")
        text = text.replace(_TOKEN_OPEN, "").replace(_TOKEN_CLOSE, "")
        return "\n".join(self._blocks(text.split("\n"))).strip("\n")

    def _blocks(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        list_indents: list[int] = []  # indentation of each open list level, for nesting
        i = 0
        while i < len(lines):
            line = lines[i]
            if fence := _open_fence(line):
                i = self._take_code(lines, i, fence, out)
            elif _is_table_start(lines, i):
                list_indents.clear()
                i = self._take_table(lines, i, out)
            elif _QUOTE.match(line):
                end = i
                while end < len(lines) and _QUOTE.match(lines[end]):
                    end += 1
                inner = [_QUOTE.sub("", quoted, count=1) for quoted in lines[i:end]]
                out.extend(self.quote(self._blocks(inner)))
                i = end
            else:
                rendered = self._line(line, list_indents)
                if rendered or (out and out[-1]):  # one blank line is enough between blocks
                    out.append(rendered)
                i += 1
        return out

    def _take_code(self, lines: list[str], i: int, fence: re.Match[str], out: list[str]) -> int:
        """Copies a fenced block verbatim; an unclosed fence runs to the end, as in CommonMark."""
        indent, chars = len(fence["indent"]), fence["chars"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not _fence_closes(lines[j], chars):
            line = lines[j]
            # CommonMark strips the opener's indentation from content lines, no more.
            strip = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[strip:])
            j += 1
        if any(line.strip() for line in body):  # an empty block would show bare fences
            language = fence["info"].split()[0] if fence["info"] else ""
            out.extend(self.code_block(language, body))
        return j + 1

    def _take_table(self, lines: list[str], i: int, out: list[str]) -> int:
        aligns = [_alignment(cell) for cell in _table_cells(lines[i + 1])]
        rows = [_table_cells(lines[i])]
        j = i + 2
        while j < len(lines) and "|" in lines[j] and lines[j].strip():
            rows.append(_table_cells(lines[j]))
            j += 1
        # Cells become plain text: no formatting renders inside a monospace block.
        cells = [[_PLAIN.inline(cell, NO_MARKS, cell_text=True) for cell in row] for row in rows]
        out.extend(self.table(_layout_table(cells, aligns)))
        return j

    def _line(self, line: str, list_indents: list[int]) -> str:
        if not line.strip():
            return ""
        if _HR.match(line):
            list_indents.clear()
            return _RULE
        if heading := _HEADING.match(line):
            list_indents.clear()
            return self.heading(len(heading["hashes"]), heading["text"] or "")
        if item := _LIST_ITEM.match(line):
            level = _list_level(list_indents, _indent_width(item["indent"]))
            return self.list_item(level, item["indent"], item["marker"], item["text"])
        if not line[0].isspace():
            list_indents.clear()  # a paragraph at the margin ends any list
        stripped = line.strip()  # trailing spaces are Markdown hard breaks; the newline stays
        return line[: len(line) - len(line.lstrip())] + self.inline(stripped, self.marks)

    def inline(self, text: str, marks: Markers, cell_text: bool = False) -> str:
        """Converts one line: protected tokens out, emphasis and escaping, tokens back in."""
        tokens: list[str] = []
        pieces: list[str] = []
        pos = 0
        for match in _INLINE_TOKEN.finditer(text):
            pieces.append(text[pos : match.start()])
            tokens.append(self._token(match, cell_text))
            pieces.append(f"{_TOKEN_OPEN}{len(tokens) - 1}{_TOKEN_CLOSE}")
            pos = match.end()
        pieces.append(text[pos:])
        converted = self.text(_emphasis("".join(pieces), marks))
        return _TOKEN_REF.sub(lambda ref: tokens[int(ref.group(1))], converted)

    def _token(self, match: re.Match[str], cell_text: bool) -> str:
        if match["code"]:
            return self.text(match["code_body"]) if cell_text else self.code_span(match["ticks"], match["code_body"])
        if match["escape"]:
            return self.escaped(match["escaped"])
        if match["image"]:
            return self.image(match["alt"], unwrap(match["img_url"]))
        if match["link"]:
            return self.link(match["label"], match["url"])
        if match["autolink"]:
            return self.autolink(match["auto_url"])
        return self.bare_url(match["bare"])

    # Platform hooks; the defaults give readable plain text.
    def text(self, text: str) -> str:
        return text

    def escaped(self, char: str) -> str:
        return self.text(char)

    def code_span(self, ticks: str, body: str) -> str:
        return ticks + self.text(body) + ticks

    def link(self, label: str, destination: str) -> str:
        url = unwrap(destination)
        shown = self.inline(label, self.marks)
        return f"{shown} ({url})" if label.strip() and label != url else url

    def image(self, alt: str, url: str) -> str:
        return self.link(alt, url)

    def autolink(self, url: str) -> str:
        return url

    def bare_url(self, url: str) -> str:
        return url

    def heading(self, level: int, text: str) -> str:
        return self.inline(text, NO_MARKS)

    def list_item(self, level: int, indent: str, marker: str, text: str) -> str:
        bullet = "•" if marker in "-*+" else marker
        return "    " * level + bullet + " " + self.inline(text, self.marks)

    def quote(self, lines: list[str]) -> list[str]:
        # Blank quote lines are dropped: a lone ">" shows literally on Discord.
        return [line if line.startswith(">") else "> " + line for line in lines if line.strip()]

    def code_block(self, language: str, body: list[str]) -> list[str]:
        opener = "```" + (language if self.keep_fence_language else "")
        return [opener, *(unfence(line) for line in body), "```"]

    def table(self, lines: list[str]) -> list[str]:
        return self.code_block("", lines)


_BACKTICK_RUN = re.compile(r"`{3,}")


def unfence(line: str) -> str:
    """A code line that cannot end its block: Slack and Discord toggle code at every ```, even
    inside a longer or ~~~ fence, so each run of 3+ backticks gets invisible breaks."""
    return _BACKTICK_RUN.sub(lambda run: ZWSP.join(run.group()), line)


def unwrap(destination: str) -> str:
    """A link destination written as <url> means url."""
    return destination[1:-1] if destination.startswith("<") and destination.endswith(">") else destination


def _list_level(indents: list[int], width: int) -> int:
    """Nesting level of a list item from its indentation, relative to the items above it."""
    while indents and indents[-1] > width:
        indents.pop()
    if not indents or indents[-1] < width:
        indents.append(width)
    return len(indents) - 1


class _PlainRenderer(MarkdownRenderer):
    """Console text: Markdown markers removed where they only add noise."""

    def table(self, lines: list[str]) -> list[str]:
        return lines  # aligned columns read fine on a console without fences


_PLAIN = _PlainRenderer()


# ---------------------------------------------------------------------------------------
# Splitting.

# Spans a cut must not fall inside: a Slack/Discord <...> link, a Markdown link, inline
# code, an HTML entity Slack needs whole, a bare URL.
_KEEP_WHOLE = re.compile(
    rf"""
    <[^<>\n]*>
  | !?\[{_LINK_LABEL}\]\([^()\s]*(?:\([^()\s]*\)[^()\s]*)*\)
  | `[^`\n]+`
  | &[A-Za-z]+;
  | https?://[^\s<>]+
    """,
    re.VERBOSE,
)
_SEPARATORS = ("\n\n", "\n", " ")  # best first: paragraph, line, word


@dataclass(frozen=True)
class _Fence:
    """A fenced code block in the text being split, by offsets."""

    chars: str  # "```" or "~~~~" ...: what a closing fence repeats
    reopen: str  # the line that reopens it in the next part ("```python")
    start: int  # offset of the opening line
    body: int  # offset of the first content character
    end: int  # offset of the closing line, len(text) if never closed

    @property
    def close(self) -> str:
        return "\n" + self.chars


class _Splitter:
    """Cuts one text into parts <= limit; see split_text for the rules."""

    def __init__(self, text: str, limit: int) -> None:
        self.text = text
        self.limit = limit
        self.forbidden = bytearray(len(text) + 1)  # 1 where a cut would break a span
        for match in _KEEP_WHOLE.finditer(text):
            self._protect(match.start(), match.end())
        self.fences = self._find_fences()
        self.fence_starts = [fence.start for fence in self.fences]

    def _protect(self, start: int, end: int) -> None:
        if end - start > 1:
            self.forbidden[start + 1 : end] = b"\x01" * (end - start - 1)

    def _find_fences(self) -> list[_Fence]:
        fences: list[_Fence | None] = []  # None: a block too small to reopen, split like text
        offset, opened = 0, None
        for line in self.text.split("\n"):
            if opened is None:
                if match := _open_fence(line):
                    opened = (match["chars"], line.strip(), offset, offset + len(line) + 1)
                    self._protect(offset, offset + len(line))
            elif _fence_closes(line, opened[0]):
                fences.append(self._fence(*opened, end=offset))
                self._protect(offset, offset + len(line))
                opened = None
            offset += len(line) + 1
        if opened is not None:
            fences.append(self._fence(*opened, end=len(self.text)))
        return [fence for fence in fences if fence is not None]

    def _fence(self, chars: str, opener: str, start: int, body: int, end: int) -> _Fence | None:
        # A long info string is dropped on reopening so the added lines stay small;
        # if even bare fences do not fit comfortably, the block is split like text.
        reopen = opener if len(opener) <= self.limit // 4 else chars
        if len(reopen) + 1 + len(chars) + 1 > self.limit // 2:
            return None
        return _Fence(chars, reopen, start, min(body, len(self.text)), end)

    def _open_at(self, cut: int) -> _Fence | None:
        """The fence a part ending at cut leaves open (its opener inside, its closer not)."""
        index = bisect.bisect_left(self.fence_starts, cut) - 1
        if index >= 0 and self.fences[index].start < cut <= self.fences[index].end:
            return self.fences[index]
        return None

    def _next_start(self, cut: int, gap: int) -> int:
        start = cut + gap
        while start < len(self.text) and self.text[start] == "\n":
            start += 1
        return start

    def _acceptable(self, start: int, cut: int, gap: int, budget: int) -> bool:
        if cut <= start or self.forbidden[cut]:
            return False
        fence = self._open_at(cut)
        if fence is None:
            return cut - start <= budget
        # Inside a code block: room for the closing fence, some code on each side of the cut.
        return (
            cut - start <= budget - len(fence.close)
            and bool(self.text[max(start, fence.body) : cut].strip())
            and self._next_start(cut, gap) < fence.end
        )

    def _last_acceptable(self, separator: str, low: int, start: int, budget: int) -> int | None:
        high = start + budget + len(separator)
        while (cut := self.text.rfind(separator, low, high)) >= 0:
            if self._acceptable(start, cut, len(separator), budget):
                return cut
            high = cut + len(separator) - 1
        return None

    def _choose_cut(self, start: int, budget: int) -> tuple[int, int]:
        """(cut, separator length): the last break of the best kind that fits, else a hard cut."""
        for separator in _SEPARATORS:
            cut = self._last_acceptable(separator, start + 1, start, budget)
            if cut is not None:
                return cut, len(separator)
        # No break anywhere: cut before the span that crosses the edge rather than through it.
        for cut in range(start + budget, start, -1):
            if not self.forbidden[cut]:
                fence = self._open_at(cut)
                if fence is None or cut - start <= budget - len(fence.close):
                    return cut, 0
        # One span fills the room (a giant URL): cut through it, leaving room to close a fence.
        cut = start + budget
        if (fence := self._open_at(cut)) is not None:
            cut -= len(fence.close)
        return cut, 0

    def parts(self) -> list[str]:
        parts: list[str] = []
        start, prefix = self._next_start(0, 0), ""
        while start < len(self.text):
            budget = self.limit - len(prefix)
            if len(self.text) - start <= budget:
                parts.append(prefix + self.text[start:])
                break
            cut, gap = self._choose_cut(start, budget)
            fence = self._open_at(cut)
            body = self.text[start:cut].rstrip()
            if body.strip():
                parts.append(prefix + body + (fence.close if fence else ""))
            prefix = fence.reopen + "\n" if fence else ""
            start = self._next_start(cut, gap)
        return [part for part in parts if part.strip()]


def split_text(text: str, limit: int) -> list[str]:
    """Splits text into ordered parts of at most limit characters each.

    Cuts at the last paragraph break that fits, else the last line break, else the last
    space, and hard-cuts only a token longer than the room left. Never cuts inside a
    link, inline code, entity or URL unless that span alone exceeds the limit.
    A code block cut in two is closed at the end of the part and reopened, with its
    language tag, at the start of the next; those added lines count within the limit.
    The whitespace at a cut is dropped. Empty or whitespace-only text gives [].
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    text = text.rstrip()
    if not text.strip():
        return []
    return _Splitter(text, limit).parts()


# ---------------------------------------------------------------------------------------
# Public conversions.


def to_plain(markdown: str, limit: int = 0) -> list[str]:
    """Readable console text for a Markdown answer; limit 0 keeps it whole; [] when empty."""
    text = neutralise_plain(_PLAIN.render(markdown))
    if not text.strip():
        return []
    return split_text(text, limit) if limit else [text]
