"""Checkpoints the SQLite state file's WAL from a child process, so that its fsyncs never stall the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# In WAL mode with `synchronous=NORMAL` a commit only appends to the WAL; the fsyncs happen
# in the checkpoint that copies the WAL back into the database file. SQLite runs that
# checkpoint inside whichever commit crosses 1,000 pages, and with it every answer in flight
# waits: 3-4 ms on a fast disk, 13-40 ms on a slow one, a few times a second at 50
# conversations (bench/README.md). SQLite's documentation suggests this way out: "turn off
# the automatic checkpoints and run checkpoints ... in a separate thread or process". The
# project runs no threads, so it is a process: bridge/store/checkpoint_process.py, which
# runs passive checkpoints (they never hold up a writer) until its standard input closes,
# that is until the bridge stops or dies.
#
# While the child runs, the store's own automatic checkpoint stays on at a high mark, as a
# backstop: if the child falls behind, the WAL still cannot grow without bound. When the
# child exits the store goes back to SQLite's default, and says so.

# SQLite's own default: the store checkpoints itself after this many WAL pages.
INLINE_PAGES = 1000
# While the child runs: only a WAL the child let grow this far (40 MB) is checkpointed in the loop.
BACKSTOP_PAGES = 10_000
PROGRAM = Path(__file__).with_name("checkpoint_process.py")
STOP_WAIT = 5.0  # for the child's last checkpoint at a stop; then it is killed


class WalCheckpointer:
    """The child process beside one SQLite connection; the connection's own checkpoints become a backstop."""

    def __init__(self, path: str, db: sqlite3.Connection) -> None:
        self._path = path
        self._db = db
        self._process: subprocess.Popen[bytes] | None = None
        self._reaped = asyncio.Event()  # its pipe closed and its exit status collected
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._process is not None and not self._reaped.is_set()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child; raises OSError when it cannot be (the connection then checkpoints as before)."""
        process = subprocess.Popen(
            # -I: the program alone, standard library only, none of the bridge's imports.
            [sys.executable, "-I", str(PROGRAM), self._path],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # What it says goes to the bridge's log; the pipe's end of file says it is gone.
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        assert process.stderr is not None
        fd = process.stderr.fileno()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._on_output, fd)
        self._process = process
        self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        log.debug("WAL checkpoints of %s run in process %d", self._path, process.pid)

    def _on_output(self, fd: int) -> None:
        try:
            said = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            said = b""
        if said:
            for line in said.decode(errors="replace").splitlines():
                if line.strip():
                    log.warning("the WAL checkpointer: %s", line.strip())
            return
        asyncio.get_running_loop().remove_reader(fd)
        self._db.execute(f"PRAGMA wal_autocheckpoint={INLINE_PAGES}")
        assert self._process is not None and self._process.stdin is not None and self._process.stderr is not None
        self._process.stderr.close()
        self._process.stdin.close()
        self._reap()
        if not self._stopping:
            log.warning(
                "the WAL checkpointer of %s (process %d) exited: the state store checkpoints in the loop again",
                self._path, self._process.pid,
            )

    def _reap(self) -> None:
        # Its pipe closes as it exits; the exit status follows within moments.
        assert self._process is not None
        if self._process.poll() is None:
            asyncio.get_running_loop().call_later(0.005, self._reap)
        else:
            self._reaped.set()

    async def stop(self) -> None:
        """Let the child finish its checkpoint and exit (killed after STOP_WAIT), and reap it."""
        process = self._process
        if process is None or self._reaped.is_set():
            return
        self._stopping = True
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(STOP_WAIT):
                await self._reaped.wait()
        except TimeoutError:
            log.warning("the WAL checkpointer (process %d) did not stop: killed", process.pid)
            process.kill()
            await self._reaped.wait()
