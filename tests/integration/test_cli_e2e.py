"""The command line as a user runs it: subprocesses, real stdin/stdout, signals, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from bridge.emulator import SANDBOX_CHATBOT_ID, SANDBOX_KEY, Emulator

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], input=stdin, capture_output=True, text=True,
        env=env or ENV, timeout=timeout,
    )


def test_sandbox_answers_keeps_context_resets_and_ends_with_input() -> None:
    result = run_cli("run", stdin="What are your opening hours?\nAnd on Sunday?\nreset\nWhat did I ask?\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("insitechat-bridge sandbox:")  # says what it is, first
    answers = [line for line in lines if line.startswith("bot> ")]
    assert len(answers) == 3
    assert "opening hours" in answers[1] and "And on Sunday" in answers[1]  # context kept
    assert any(line.startswith("bot (notice)> Starting a new conversation") for line in lines)
    assert "opening hours" not in answers[2]  # reset forgot it
    assert "Traceback" not in result.stderr


def test_sandbox_plays_a_visitor_and_shows_alerts_with_claim_and_resolve() -> None:
    result = run_cli(
        "run", stdin="/visitor can I talk to a human please\n/claim\n/lead Ada Lovelace ada@example.com\n/resolve\n"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "alert> 🙋 A visitor asked for a human" in out
    assert 'alert>   "can I talk to a human please"' in out
    assert "alert> 📇 New lead captured" in out and "alert>   Email: ada@example.com" in out
    # Both act on the escalation: the lead that came in between has no buttons.
    assert "alert update>   Claimed by you" in out or "alert update>   Resolved by you" in out
    assert out.count("alert update>   Resolved by you") == 1
    assert out.index("alert> 🙋") < out.index("sandbox> the visitor sees")  # printed as it happened


def test_help_and_usage_errors_exit_2() -> None:
    assert run_cli("--help").returncode == 0
    assert run_cli().returncode == 2
    bad = run_cli("nonsense")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml: 1 problem(s)" in result.stderr and "cannot read the file" in result.stderr



async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_chatbots_sources_and_check_against_the_emulator(emulator: Emulator, tmp_path: Path) -> None:
    env = {**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY, "INSITECHAT_BASE_URL": emulator.base_url}
    code, out, err = await _cli("chatbots", env=env)
    assert code == 0, err
    assert SANDBOX_CHATBOT_ID in out and "Sandbox Bot" in out and "active" in out
    code, out, err = await _cli("sources", SANDBOX_CHATBOT_ID, env=env)
    assert code == 0, err
    assert "Help Center" in out and "done" in out
    code, out, err = await _cli("sources", "99999999-9999-4999-8999-999999999999", env=env)
    assert code == 1 and "Traceback" not in err

    cfg = tmp_path / "bridge.yaml"
    paused = emulator.add_chatbot(next(iter(emulator.accounts.values())), "Paused Bot", is_active=False)
    cfg.write_text(
        f"insitechat: {{base_url: '{emulator.base_url}', api_key: '${{INSITECHAT_API_KEY}}'}}\n"
        "console: {enabled: true}\n"
        "routes:\n"
        f"  - {{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}\n"
        f"  - {{platform: console, channel: other, chatbot: {paused.id}}}\n"
        "  - {platform: console, channel: gone, chatbot: 99999999-9999-4999-8999-999999999999}\n"
    )
    code, out, err = await _cli("check", "--live", "--config", str(cfg), env=env)
    assert code == 1, out + err
    assert "FAIL  insitechat: routes[1].chatbot: Paused Bot" in out and "is paused" in out
    assert "routes[2].chatbot: 99999999-9999-4999-8999-999999999999 is not a chatbot" in out
    assert SANDBOX_KEY not in out + err

    env_bad = {**env, "INSITECHAT_API_KEY": "ic_wrong_key_here"}
    code, out, err = await _cli("chatbots", env=env_bad)
    assert code == 1 and "ic_wrong_key_here" not in out + err


def console_config(
    tmp_path: Path,
    emulator: Emulator | None = None,
    *,
    state: Path | None = None,
    listen: str = "127.0.0.1:0",
    extra: str = "",
) -> Path:
    """A console-only bridge (on the emulator, if given), with its state in tmp_path and any free port."""
    cfg = tmp_path / "bridge.yaml"
    base_url = f"base_url: '{emulator.base_url}', " if emulator is not None else ""
    cfg.write_text(
        f"insitechat: {{{base_url}api_key: '${{INSITECHAT_API_KEY}}'}}\n"
        f"state: {{sqlite: '{state or tmp_path / 'state.db'}'}}\n"
        f"server: {{listen: '{listen}'}}\n"
        "console: {enabled: true}\n"
        f"routes: [{{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}]\n" + extra
    )
    return cfg


async def test_run_with_config_stops_cleanly_on_sigterm(emulator: Emulator, tmp_path: Path) -> None:
    cfg = console_config(tmp_path, emulator)
    env = {**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY}
    read_fd, write_fd = os.pipe()  # stdin stays open: only the signal can end this run
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "--config", str(cfg), env=env, stdin=read_fd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    os.close(read_fd)
    try:
        os.write(write_fd, b"hello over a pipe\n")
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        assert line.decode().startswith("bot> ") and "hello over a pipe" in line.decode()
        # The state file's WAL is checkpointed by a child process (bridge/store/checkpointer.py) ...
        checkpointers = [pid for pid in _children(proc.pid) if "checkpoint_process.py" in _cmdline(pid)]
        assert len(checkpointers) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        os.close(write_fd)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    assert not Path(f"/proc/{checkpointers[0]}").exists()  # ... which a stop ends and reaps


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def test_emulator_command_serves_the_api(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "emulator", "--port", str(port), env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        assert f"127.0.0.1:{port}/api" in first.decode()
        async with httpx.AsyncClient() as http:
            r = await http.get(
                f"http://127.0.0.1:{port}/api/v1/chatbots", headers={"Authorization": f"Bearer {SANDBOX_KEY}"}
            )
        assert r.status_code == 200 and r.json()[0]["id"] == SANDBOX_CHATBOT_ID
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_send_test_alert_goes_through_the_running_bridge(emulator: Emulator, tmp_path: Path) -> None:
    from bridge import config as config_module
    from bridge.app import BridgeApp
    from tests.fakes.alert_poster import FakePoster

    text = (
        f"insitechat: {{base_url: '{emulator.base_url}', api_key: '${{INSITECHAT_API_KEY}}'}}\n"
        f"state: {{sqlite: '{tmp_path / 'state.db'}'}}\n"
        "server: {listen: '127.0.0.1:0'}\n"
        "console: {enabled: true}\n"
        "discord: {token: '${INSITECHAT_API_KEY}'}\n"
        f"chatbots: [{{id: {SANDBOX_CHATBOT_ID}, webhook_secret: '${{WH}}'}}]\n"
        f"routes: [{{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}]\n"
        f"alerts: [{{chatbot: {SANDBOX_CHATBOT_ID}, to: ['discord:123']}}]\n"
    )
    env = {**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY, "WH": "whsec-cli-test"}
    settings = config_module.loads(text, env=env)
    app = BridgeApp(
        settings.model_copy(update={"discord": None}), console_in=io.StringIO(""), console_out=io.StringIO()
    )
    discord = FakePoster("discord")
    app.outbox.register(discord)  # a platform stand-in; the rest of the path is real
    await app.start()
    try:
        cfg = tmp_path / "bridge.yaml"
        cfg.write_text(text)
        code, out, err = await _cli(
            "send-test-alert", SANDBOX_CHATBOT_ID, "--config", str(cfg), "--url", app.server_url, env=env
        )
        assert code == 0, err
        assert "discord:123" in out
        for _ in range(200):
            if discord.posted:
                break
            await asyncio.sleep(0.02)
        assert "Test alert" in discord.posted[0].card["embed"]["title"]
        code, out, err = await _cli(
            "send-test-alert", "99999999-9999-4999-8999-999999999999", "--config", str(cfg), env=env
        )
        assert code == 1 and "no alert rule" in err
    finally:
        await app.stop()


async def test_sigterm_lets_the_answer_in_flight_finish(emulator: Emulator, tmp_path: Path) -> None:
    emulator.latency = 1.0  # the answer is still on its way when the signal comes
    cfg = console_config(tmp_path, emulator)
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "--config", str(cfg), "--grace", "5",
        env={**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY}, stdin=read_fd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    os.close(read_fd)
    try:
        os.write(write_fd, b"a slow question\n")
        for _ in range(300):  # until the chat call has reached InsiteChat
            if any(r.path.endswith("/chat") for r in emulator.requests):
                break
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        os.close(write_fd)
    assert proc.returncode == 0, err.decode()
    assert "bot> " in out.decode() and "a slow question" in out.decode()


async def test_check_live_warns_about_a_redis_that_keeps_nothing_and_fails_on_one_that_is_down(
    emulator: Emulator, tmp_path: Path, redis_url: str
) -> None:
    env = {**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY, "REDIS_URL": redis_url}
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(
        f"insitechat: {{base_url: '{emulator.base_url}', api_key: '${{INSITECHAT_API_KEY}}'}}\n"
        "state:\n  redis_url: ${REDIS_URL}\n  redis_prefix: 'check-test:'\n"
        "console: {enabled: true}\n"
        f"routes: [{{platform: console, chatbot: {SANDBOX_CHATBOT_ID}}}]\n"
    )
    code, out, err = await _cli("check", "--live", "--config", str(cfg), env=env)
    assert code == 0, out + err  # the test server persists nothing: a warning, not a failure
    assert "WARN  state:" in out and "restart loses the queued alerts and answers" in out
    code, out, err = await _cli("check", "--live", "--config", str(cfg), env={**env, "REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"})
    assert code == 1 and "FAIL  state.redis_url:" in out
    assert "hunter2" not in out + err and "Traceback" not in err


async def test_check_and_run_say_loudly_that_webhook_signatures_are_off(tmp_path: Path) -> None:
    cfg = console_config(
        tmp_path,
        extra="webhooks: {verify_signatures: false}\n"
        f"chatbots: [{{id: {SANDBOX_CHATBOT_ID}, webhook_secret: '${{WH}}'}}]\n"
        f"alerts: [{{chatbot: {SANDBOX_CHATBOT_ID}, to: ['console:alerts']}}]\n",
    )
    env = {**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY, "WH": "a-webhook-secret"}
    code, out, err = await _cli("check", "--config", str(cfg), env=env)
    assert code == 0, err
    [warning] = [line for line in out.splitlines() if line.startswith("WARN")]
    assert "webhooks.verify_signatures is false" in warning and "webhook_secret" in warning
    assert "a-webhook-secret" not in out + err
    # And every start says it, where the operator reads the bridge's log.
    result = run_cli("run", "--config", str(cfg), stdin="", env={**env, "INSITECHAT_BASE_URL": "http://127.0.0.1:9"})
    assert "SIGNATURE CHECKS ARE OFF" in result.stderr


def test_run_logs_one_start_line_with_what_runs(tmp_path: Path) -> None:
    cfg = console_config(tmp_path, extra="logging: {format: json}\n")
    env = {**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY, "INSITECHAT_BASE_URL": "http://127.0.0.1:9"}
    result = run_cli("run", "--config", str(cfg), stdin="", env=env)
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [start] = [line for line in lines if line["message"].startswith("insitechat-bridge starting")]
    assert start["config"] == str(cfg) and start["platforms"] == "console"
    assert (start["routes"], start["alert_rules"]) == (1, 0) and start["version"]


async def test_health_asks_the_bridge_on_its_configured_port(emulator: Emulator, tmp_path: Path) -> None:
    """The container's HEALTHCHECK: server.listen decides the port, and no secret is needed to ask."""
    from bridge import config
    from bridge.app import BridgeApp
    from tests.conftest import free_port

    port = free_port()
    cfg = console_config(tmp_path, emulator, listen=f"127.0.0.1:{port}")
    settings = config.load(cfg, env={"INSITECHAT_API_KEY": SANDBOX_KEY})
    app = BridgeApp(settings, console_in=io.StringIO(""), console_out=io.StringIO())
    await app.start()
    try:
        code, out, err = await _cli("health", "--config", str(cfg), env=ENV)  # INSITECHAT_API_KEY unset
        assert code == 0, err
        assert out.startswith(f"ok    http://127.0.0.1:{port}/healthz")
    finally:
        await app.stop()
    code, out, err = await _cli("health", "--config", str(cfg), env=ENV)
    assert code == 1 and "no answer from" in err and "Traceback" not in err


def test_a_state_file_that_cannot_be_opened_is_one_line_with_its_path(tmp_path: Path) -> None:
    junk = tmp_path / "state.db"
    junk.write_bytes(b"this is not an SQLite database, it is a text file that happens to be here" * 4)
    cfg = console_config(tmp_path, state=junk)
    result = run_cli("run", "--config", str(cfg), stdin="", env={**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(junk) in line and "not a database" in line


# --- the emulator command's webhooks (issue 12 item 22) --------------------------------------


async def test_emulator_command_sends_its_webhooks_to_the_given_url(tmp_path: Path) -> None:
    import hashlib
    import hmac
    import json
    import socket

    from aiohttp import web

    received: list[tuple[str, bytes]] = []

    async def take(request: web.Request) -> web.Response:
        received.append((request.headers.get("X-InsiteChat-Signature", ""), await request.read()))
        return web.Response()

    app = web.Application()
    app.router.add_post("/webhooks/insitechat/{chatbot}", take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/insitechat/{SANDBOX_CHATBOT_ID}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "emulator", "--port", str(port),
        "--webhook-url", hook_url, "--webhook-secret", "whsec-from-the-cli", env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        banner = b""
        while b"visitor:" not in banner:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
            assert line, (banner + await proc.stderr.read()).decode()  # type: ignore[union-attr]
            banner += line
        assert f"webhooks -> {hook_url}" in banner.decode()
        emu = f"http://127.0.0.1:{port}/emulator/chatbots/{SANDBOX_CHATBOT_ID}"
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{emu}/visitor", json={"message": "I need a human", "session_id": "web-1"})
            assert r.status_code == 200
            for _ in range(300):
                if any(json.loads(body)["event"] == "conversation.escalated" for _, body in received):
                    break
                await asyncio.sleep(0.02)
            test = await http.post(f"{emu}/send-test")
        assert test.json()["delivered"] is True
        events = [json.loads(body)["event"] for _, body in received]
        assert events == ["conversation.started", "message.received", "conversation.escalated", "webhook.test"]
        for signature, body in received:
            assert signature == "sha256=" + hmac.new(b"whsec-from-the-cli", body, hashlib.sha256).hexdigest()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await runner.cleanup()


# --- the sandbox console (issue 12 item 23) --------------------------------------------------


class Terminal:
    """The sandbox on a pseudo-terminal, as a person at a keyboard sees it."""

    def __init__(self, tmp: Path) -> None:
        import pty

        master, slave = pty.openpty()
        self.fd = master
        self.raw = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run"], stdin=slave, stdout=slave, stderr=slave,
            env={**ENV, "TMPDIR": str(tmp)}, start_new_session=True,
        )
        os.close(slave)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_for(self, condition: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        """Read until condition(screen lines) holds; fail at the deadline with what was shown."""
        import select
        import time

        deadline = time.monotonic() + timeout
        while not condition(screen(self.raw)):
            if time.monotonic() > deadline:
                raise AssertionError("not shown in time:\n" + "\n".join(screen(self.raw)))
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                with contextlib.suppress(OSError):  # the other end closed: nothing more will come
                    self.raw += os.read(self.fd, 65536)
        return screen(self.raw)

    def close(self) -> int:
        self.type("\x04")  # Ctrl-D on an empty line ends the sandbox
        try:
            self.wait_for(lambda _: self.proc.poll() is not None, timeout=30)
            return self.proc.returncode
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.fd)


def screen(raw: bytes) -> list[str]:
    """The lines a terminal shows for this output: carriage returns, erase-line and cursor moves applied."""
    import re

    lines: list[str] = []
    line: list[str] = []
    col = 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|.", raw.decode("utf-8", "replace"), flags=re.DOTALL):
        if token == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif token == "\r":
            col = 0
        elif token == "\b":
            col = max(col - 1, 0)
        elif token.startswith("\x1b["):
            count = int(token[2:-1] or 1)
            if token.endswith("K"):
                del line[col:]
            elif token.endswith("D"):
                col = max(col - count, 0)
            elif token.endswith("C"):
                col += count
        elif token >= " ":
            line += [" "] * (col - len(line) + 1) if col >= len(line) else []
            line[col] = token
            col += 1
    return [*lines, "".join(line).rstrip()]


def test_terminal_prompt_comes_back_after_a_late_card(tmp_path: Path) -> None:
    term = Terminal(tmp_path)
    try:
        term.wait_for(lambda s: s[-1] == "you>")
        term.type("/visitor I need a human\r")
        term.wait_for(lambda s: any("the visitor sees" in line for line in s) and s[-1] == "you>")
        term.type("/claim\r")
        # The card's update is printed by the outbox after the prompt is back: the prompt follows it.
        shown = term.wait_for(lambda s: any("Claimed by you" in line for line in s) and s[-1] == "you>", timeout=10)
        assert not any(line.startswith("you> alert") for line in shown), shown
    finally:
        assert term.close() == 0


def test_terminal_edits_the_line_and_recalls_history_without_sending_escape_codes(tmp_path: Path) -> None:
    term = Terminal(tmp_path)
    try:
        term.wait_for(lambda s: s[-1] == "you>")
        term.type("helo\x1b[Dl\x1b[C!\r")  # left arrow, the missing l, right arrow, then the end
        term.wait_for(lambda s: any('you asked "hello!"' in line for line in s) and s[-1] == "you>")
        term.type("\x1b[A\x7f?\r")  # up: the last line again; backspace edits it
        shown = term.wait_for(lambda s: any('you asked "hello?"' in line for line in s) and s[-1] == "you>")
        assert "you> hello?" in shown  # the edited line is what the terminal showed
        assert not any("[A" in line or "[D" in line or "\ufffd" in line for line in shown), shown
    finally:
        assert term.close() == 0


def test_piped_input_never_sends_escape_codes_to_the_chatbot() -> None:
    result = run_cli("run", stdin="\x1b[Ahel\x1b[Dlo\x1bOB\x07\n")
    assert result.returncode == 0, result.stderr
    [answer] = [line for line in result.stdout.splitlines() if line.startswith("bot> ")]
    assert 'you asked "hello"' in answer and "\x1b" not in answer, answer


def test_claim_on_a_resolved_alert_says_so() -> None:
    result = run_cli("run", stdin="/visitor I need a human\n/resolve\n/claim\n/resolve\n")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("sandbox> ")]
    assert sum("already resolved by you" in line for line in said) == 2, said


def test_an_unknown_command_lists_the_known_ones_and_asks_nothing() -> None:
    result = run_cli("run", stdin="/frobnicate now\n/etc/hosts is a file?\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    [unknown] = [line for line in lines if "/frobnicate" in line]
    assert unknown.startswith("sandbox> unknown command /frobnicate")
    for known in ("/visitor", "/lead", "/claim", "/resolve", "/help"):
        assert known in unknown
    # A path is a question, not a command.
    assert [line for line in lines if line.startswith("bot> ")] == [
        line for line in lines if line.startswith("bot> ") and "/etc/hosts" in line
    ] != []


def test_lead_without_an_argument_shows_the_usage_and_raises_nothing() -> None:
    result = run_cli("run", stdin="/lead\n/lead   \n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("sandbox> usage: /lead <name> <email>") == 2
    assert "alert>" not in result.stdout


async def test_banner_shows_the_web_server_which_answers(tmp_path: Path) -> None:
    import re

    read_fd, write_fd = os.pipe()  # stdin stays open while the web server is tried
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env={**ENV, "TMPDIR": str(tmp_path)}, stdin=read_fd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    os.close(read_fd)
    try:
        banner = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()  # type: ignore[union-attr]
        found = re.search(r"web server at (http://127\.0\.0\.1:\d+)", banner)
        assert found, banner
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{found.group(1)}/healthz")).status_code == 200
    finally:
        os.close(write_fd)  # end of input ends the sandbox
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0


def test_the_sandbox_leaves_no_state_directory_behind(tmp_path: Path) -> None:
    result = run_cli("run", stdin="hello\n", env={**ENV, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "insitechat-sandbox-" in result.stdout.splitlines()[0]  # it did use one, under TMPDIR
    assert list(tmp_path.glob("insitechat-sandbox-*")) == []


async def test_the_sandbox_leaves_no_state_directory_behind_after_sigterm(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env={**ENV, "TMPDIR": str(tmp_path)}, stdin=read_fd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    os.close(read_fd)
    try:
        await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        assert list(tmp_path.glob("insitechat-sandbox-*")) != []
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    finally:
        os.close(write_fd)
    assert proc.returncode == 0
    assert list(tmp_path.glob("insitechat-sandbox-*")) == []


async def test_the_chat_user_asking_for_a_human_is_not_called_a_website_visitor(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", env={**ENV, "TMPDIR": str(tmp_path)}, stdin=read_fd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    os.close(read_fd)
    shown: list[str] = []
    try:
        os.write(write_fd, b"I need a human\n")
        while not any(line.startswith("alert>   (type /claim") for line in shown):  # the whole card
            line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
            assert line, shown
            shown.append(line.decode().rstrip("\n"))
    finally:
        os.close(write_fd)
        await asyncio.wait_for(proc.communicate(), 30)
    [title] = [line for line in shown if line.startswith("alert> 🙋")]
    assert title.startswith("alert> 🙋 Someone asked for a human in chat"), shown
    assert not any("visitor" in line for line in shown if line.startswith("alert>")), shown


def test_run_with_stdin_on_dev_null_ends_cleanly(tmp_path: Path) -> None:
    """A service manager's stdin is /dev/null: the console reads its end at once, no traceback."""
    cfg = console_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "--config", str(cfg)], stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, env={**ENV, "INSITECHAT_API_KEY": SANDBOX_KEY},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
