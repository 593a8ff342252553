"""The Dockerfile keeps its promises: cached dependencies, a probe on the configured port, a volume, no root."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
LINES = [line.strip() for line in DOCKERFILE.splitlines()]


def index_of(start: str) -> int:
    return next(i for i, line in enumerate(LINES) if line.startswith(start))


def test_dependencies_install_before_the_code_is_copied() -> None:
    deps = index_of("&& pip install --no-cache-dir --prefix=/install -r requirements.txt")
    assert index_of("COPY pyproject.toml") < deps < index_of("COPY bridge") < index_of("COPY adapters")
    assert "COPY README.md" not in "\n".join(LINES[:deps])  # a README edit must not reinstall everything


def test_the_health_check_follows_the_configured_port() -> None:
    healthcheck = DOCKERFILE[DOCKERFILE.index("HEALTHCHECK"):].split("\n", 2)
    assert 'CMD ["insitechat-bridge", "health"]' in healthcheck[1]
    assert "8080/healthz" not in DOCKERFILE


def test_state_lives_on_a_volume_and_the_process_is_not_root() -> None:
    assert 'VOLUME ["/data"]' in LINES and "WORKDIR /data" in LINES
    user = LINES[index_of("USER ")]
    assert user != "USER root" and index_of("USER ") < index_of("ENTRYPOINT")
