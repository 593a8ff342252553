"""The layering holds: the core never imports a platform adapter, except where the bridge is wired together."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where the adapters are built and wired to the core: the only core modules that may import them.
COMPOSITION_ROOT = {"bridge/app.py", "bridge/cli.py"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_does_not_import_adapters() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "adapters")
        for path in (ROOT / "bridge").rglob("*.py")
        if str(path.relative_to(ROOT)) not in COMPOSITION_ROOT
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_one_platform_never_imports_another() -> None:
    for platform in ("slack", "discord"):
        others = {"adapters.slack", "adapters.discord"} - {f"adapters.{platform}"}
        for path in (ROOT / "adapters" / platform).rglob("*.py"):
            crossing = {m for m in imported_modules(path) if any(m == o or m.startswith(o + ".") for o in others)}
            assert not crossing, f"{path.relative_to(ROOT)} imports {sorted(crossing)}"


def attribute_calls(path: Path, name: str) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == name]


def test_running_adapters_leave_routes_to_the_core() -> None:
    """Routes decide in the relay and the hand-over service; only `check` (each setup.py) reads the whole config."""
    calls = {
        str(path.relative_to(ROOT)): lines
        for path in (ROOT / "adapters").rglob("*.py")
        if path.name != "setup.py" and (lines := attribute_calls(path, "route_for"))
    }
    assert calls == {}
