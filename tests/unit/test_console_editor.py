"""The console's line editor and input cleaning: keys in, the line and the echo out."""

from __future__ import annotations

import pytest

from adapters.console import LineEditor, clean_line

LEFT, RIGHT, UP, DOWN, HOME, END, DELETE = "\x1b[D", "\x1b[C", "\x1b[A", "\x1b[B", "\x1b[H", "\x1b[F", "\x1b[3~"


def typed(*chunks: str, history: tuple[str, ...] = ()) -> list[str | None]:
    editor = LineEditor("you> ", list(history))
    lines: list[str | None] = []
    for chunk in chunks:
        lines += [line for line, _ in editor.feed(chunk)[1]]
    return lines


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        ("helo" + LEFT + "l\r", "hello"),
        ("world" + HOME + "hello \r", "hello world"),
        ("\x1bOHab\x1bOFc\r", "abc"),  # Home/End in application mode
        ("ab" + LEFT + LEFT + DELETE + "\r", "b"),
        ("abc\x7f\x7fd\r", "ad"),
        ("one two\x17three\r", "one three"),
        ("abc\x01\x0b" + "x\r", "x"),  # Ctrl-A, Ctrl-K
        ("abc\x15x\r", "x"),  # Ctrl-U
        ("a\x1b[15~\x1b[1;5Cb\x1b[200~c\x1b[201~\x07\r", "abc"),  # F5, ctrl-arrow, paste markers, bell
        ("a\x1b\x1b[Db\r", "ba"),  # Alt+left: the left is still taken
    ],
)
def test_keys_edit_the_line_and_escape_codes_are_never_typed(keys: str, line: str) -> None:
    assert typed(keys) == [line]


def test_an_escape_sequence_split_across_reads_is_still_one_key() -> None:
    assert typed("ab\x1b", "[", "D", "X\r") == ["aXb"]


def test_up_and_down_walk_the_history_and_come_back_to_the_draft() -> None:
    assert typed("first\r", "second\r", UP + UP + "!\r") == ["first", "second", "first!"]
    assert typed("dra" + UP + DOWN + "ft\r", history=("old",)) == ["draft"]
    assert typed(UP + UP + UP + "\r", history=("a", "b")) == ["a"]


def test_ctrl_d_ends_input_only_on_an_empty_line() -> None:
    assert typed("ab" + LEFT + "\x04\r", "\x04") == ["a", None]


def test_echo_redraws_the_line_only_while_the_prompt_is_shown() -> None:
    editor = LineEditor("you> ")
    echo, lines = editor.feed("early\r")  # typed while the bot was busy
    assert echo == "" and lines == [("early", False)]
    assert editor.show() == "\r\x1b[Kyou> "
    echo, lines = editor.feed("hi" + LEFT)
    assert echo.endswith("\r\x1b[Kyou> hi\x1b[1D") and lines == []
    echo, lines = editor.feed("\r")
    assert echo.endswith("\n") and lines == [("hi", True)] and not editor.active


def test_clean_line_drops_escape_codes_and_control_characters_from_piped_input() -> None:
    assert clean_line("\x1b[Ahel\x1b[Dlo\x1bOB\x07 \n") == "hello"
    assert clean_line("tab\tkept") == "tab\tkept"
