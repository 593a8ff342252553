"""Shared benchmark plumbing: /proc readers, percentiles, child processes, configs, machine facts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Fake credentials shared by the fakes and every process under test (never real ones).
ENV = {
    "BENCH_IC_KEY": "ic_sandbox_key",
    "BENCH_SLACK_BOT_TOKEN": "xoxb-test-token",
    "BENCH_SLACK_APP_TOKEN": "xapp-test-token",
    "BENCH_SLACK_SIGNING_SECRET": "test-signing-secret",
    "BENCH_WEBHOOK_SECRET": "bench-webhook-secret",
}


# --- /proc ---------------------------------------------------------------------------------------


def _status_kb(pid: int | str, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def descendants(pid: int | str) -> list[int]:
    """The live processes a process started, and theirs (the bridge's WAL checkpointer)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def _with_children(pid: int | str, children: bool, measure: Callable[[int | str], float]) -> float:
    total = measure(pid)
    if children:
        for child in descendants(pid):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it just exited
                total += measure(child)
    return total


def rss_mb(pid: int | str = "self", *, children: bool = False) -> float:
    """Resident memory now (VmRSS), in MiB; `children`: with the live processes it started."""
    return _with_children(pid, children, lambda p: _status_kb(p, "VmRSS") / 1024)


def peak_rss_mb(pid: int | str = "self", *, children: bool = False) -> float:
    """Highest resident memory so far (VmHWM), in MiB; `children`: the sum of each one's."""
    return _with_children(pid, children, lambda p: _status_kb(p, "VmHWM") / 1024)


def cpu_seconds(pid: int | str = "self", *, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads), in seconds.

    `children`: with the processes it started, the live ones and those it reaped, so that
    the bridge's figures include the work it hands to its WAL checkpointer.
    """

    def own(p: int | str) -> float:
        stat = Path(f"/proc/{p}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
        reaped = int(fields[13]) + int(fields[14]) if children and p == pid else 0  # cutime, cstime
        return (int(fields[11]) + int(fields[12]) + reaped) / CLK_TCK  # utime, stime

    return _with_children(pid, children, own)


def machine_busy_seconds() -> float:
    """CPU seconds spent on anything but idle, all cores, since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # user..steal; guest time is already inside user


class CpuMeter:
    """CPU use of the process under test, of this harness, and of everything else, over one interval.

    "other" shows a machine shared with other work (a test run, a build): numbers taken
    while it is high are not this code's alone.
    """

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        # The process under test with its children (the bridge's WAL checkpointer): its whole cost.
        self._start = (
            time.monotonic(), cpu_seconds(pid, children=True) if pid else 0.0, cpu_seconds(), machine_busy_seconds()
        )

    def read(self) -> dict[str, float]:
        """Fractions of one core since construction: {"sut", "harness", "other"}."""
        wall0, sut0, own0, busy0 = self._start
        wall = max(time.monotonic() - wall0, 1e-9)
        sut = (cpu_seconds(self.pid, children=True) - sut0) / wall if self.pid else 0.0
        harness = (cpu_seconds() - own0) / wall
        busy = (machine_busy_seconds() - busy0) / wall
        return {"sut": sut, "harness": harness, "other": max(0.0, busy - sut - harness)}


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


# --- machine -------------------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = []
    for dist in ("slack_bolt", "slack_sdk", "discord.py", "aiohttp", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    return {
        "cpu": model,
        "cores": str(len(os.sched_getaffinity(0))),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "memory": f"{_status_kb_meminfo() // 1024} MiB",
        "libraries": ", ".join(versions),
    }


def _status_kb_meminfo() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


# --- child processes -----------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (children must listen on a known port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """A process under test (the bridge, the baseline bot, the bare handler), with its log file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(
        self, ready_path: str | None = "/readyz", timeout: float = 60.0, *, until: Callable[[], bool] | None = None
    ) -> None:
        """Start it and wait until it answers: ready_path with 200, or None for any TCP accept.

        `until`: ready when this is true instead (a Socket Mode client listens on no port).
        """
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *self.argv, cwd=self.cwd, env={**os.environ, **ENV, **self.env},
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    await self.stop()
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
                if until() if until is not None else await self._answers(http, ready_path):
                    return
                await asyncio.sleep(0.05)

    async def _answers(self, http: aiohttp.ClientSession, ready_path: str | None) -> bool:
        if ready_path is None:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True
        try:
            async with http.get(self.url + ready_path, timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not end in time; returns the exit status."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            return await proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_count(self, needle: str) -> int:
        """How many lines of its log contain `needle` (warnings, errors)."""
        try:
            return sum(needle in line for line in self.log_path.read_text(errors="replace").splitlines())
        except OSError:
            return 0
