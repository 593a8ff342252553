"""The WAL checkpoint process's program (checkpointer.py): passive checkpoints of one file until its input closes."""

# Standard library only: it runs as `python -I checkpoint_process.py FILE`, none of the bridge's imports.

from __future__ import annotations

import os
import select
import signal
import sqlite3
import sys
from pathlib import Path

# This often while pages come in; backing off to MAX_INTERVAL while the bridge is idle.
MIN_INTERVAL = 0.1
MAX_INTERVAL = 1.0


def run(path: str) -> int:
    """Passive checkpoints of `path` until standard input closes; 1 when the file cannot be checkpointed."""
    # It stops when its input closes; a Ctrl-C or a SIGTERM to the whole process group is the
    # bridge's to handle (it closes that input as it stops).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        # rw: never create a file the bridge did not (mode=rw fails on a missing one).
        db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        print(f"checkpointer: cannot open {path}: {exc}", file=sys.stderr)
        return 1
    interval = MIN_INTERVAL
    last: tuple[int, int] | None = None
    while True:
        readable, _, _ = select.select([sys.stdin.fileno()], [], [], interval)
        if readable and not os.read(sys.stdin.fileno(), 512):
            return 0  # the bridge stopped, or died
        try:
            # PASSIVE copies what it can without waiting for, or holding up, the bridge's writes.
            _busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                continue  # the bridge's backstop checkpoint runs just now
            print(f"checkpointer: {path}: {exc}", file=sys.stderr)
            return 1
        # Often while pages come in, seldom while the bridge is idle.
        interval = MIN_INTERVAL if (frames, copied) != last else min(interval * 2, MAX_INTERVAL)
        last = (frames, copied)


if __name__ == "__main__":
    try:
        sys.exit(run(sys.argv[1]))
    except Exception as exc:  # one line in the bridge's log, not a traceback
        print(f"checkpointer: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
