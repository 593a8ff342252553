"""The Dockerfile's rules, checked as text (no Docker engine runs on the build machines)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in instructions() if keyword == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1] not in ("root", "0", "0:0")


def test_has_a_healthcheck_against_healthz_and_exposes_the_port() -> None:
    ins = instructions()
    health = [rest for keyword, rest in ins if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    assert ("EXPOSE", "8080") in ins


def test_official_slim_python_base() -> None:
    bases = [rest.split()[0] for keyword, rest in instructions() if keyword == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.1[1-9]-slim", base) for base in bases)


def test_no_secrets_baked_in() -> None:
    ins = instructions()
    copied = " ".join(rest for keyword, rest in ins if keyword in ("COPY", "ADD"))
    for forbidden in (".env", "config.yaml", "bridge-state", ".git ", "*.db"):
        assert forbidden not in copied
    env = " ".join(rest for keyword, rest in ins if keyword in ("ENV", "ARG"))
    assert not re.search(r"(TOKEN|SECRET|API_KEY)\s*=", env)
    # The build context is an allow-list: everything is ignored, then the package let back in.
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"
    assert all(r.startswith("!") or "__pycache__" in r or r.endswith(".pyc") for r in rules[1:])


def test_installs_from_the_project_metadata() -> None:
    runs = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    assert "pip install" in runs and "requirements" not in runs


def test_compose_runs_two_replicas_on_a_persistent_redis_with_time_to_stop() -> None:
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]
    bridges = [s for s in services.values() if s.get("image") == "insitechat-bridge"]
    assert len(bridges) >= 2
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command  # a Redis restart must not lose queued work
    for bridge in bridges:
        assert bridge["restart"] == "unless-stopped"
        grace = float(bridge["command"][bridge["command"].index("--grace") + 1])
        assert grace < float(bridge["stop_grace_period"].rstrip("s"))  # the grace ends before SIGKILL
        assert "${" not in str(bridge.get("environment", {}))  # secrets come from bridge.env


def test_env_example_holds_every_secret_the_example_config_names() -> None:
    import re as _re

    names = set(_re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "config.example.yaml").read_text())) - {
        "VAR",
        "INSITECHAT_BASE_URL",
    }
    example = (ROOT / "bridge.env.example").read_text()
    assert all(_re.search(rf"^#? ?{name}=", example, _re.M) for name in names), names
