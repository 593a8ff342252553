"""The README and the example config only name commands and options the CLI has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bridge import cli

ROOT = Path(__file__).resolve().parents[2]
# A command, and the rest of its line up to the next command: the flags written there are its own.
MENTION = re.compile(r"insitechat-bridge ([a-z][a-z-]+)(?=[\s`\]|]|$)(.*?)(?=insitechat-bridge |$)", re.MULTILINE)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_flag_the_docs_name_exists() -> None:
    known = subcommands()
    for name in ("README.md", "config.example.yaml", "bridge.env.example", "Dockerfile", "docker-compose.yaml"):
        for command, rest in MENTION.findall((ROOT / name).read_text()):
            assert command in known, f"{name} names `insitechat-bridge {command}`, which does not exist"
            options = {o for a in known[command]._actions for o in a.option_strings}
            for flag in re.findall(r"--[a-z-]+", rest):
                assert flag in options, f"{name}: `insitechat-bridge {command} {flag}` is not an option"


def test_the_example_config_is_valid() -> None:
    env = {
        name: "xapp-x" if "APP" in name else "x" * 12
        for name in re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "config.example.yaml").read_text())
    }
    cli.config.load(ROOT / "config.example.yaml", env=env)
