"""pyproject.toml's package list holds every package of the source tree, so a wheel (the Docker image) has them all."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_package_goes_into_the_wheel() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packaged = set(find_packages(str(ROOT), include=find["include"]))
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("bridge", "adapters")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert on_disk <= packaged
    assert {"bridge.store", "adapters.slack", "adapters.discord"} <= packaged
