"""The SQLite store's WAL checkpoints in a child process: done there, never lost, and back in the loop when it is gone.

Real SQLite files, a real child process (bridge/store/checkpoint_process.py) and real
signals. What a checkpoint did is read off the files: a commit in WAL mode only appends to
the `-wal` file, and only a checkpoint copies pages into the database file, so that file
grows when, and only when, a checkpoint ran.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.store import SQLiteStore
from bridge.store.checkpointer import BACKSTOP_PAGES, INLINE_PAGES
from tests.waiting import eventually

PAGE = 4096
ROWS = 300  # about 300 pages in the WAL: under SQLite's own 1,000, so only the child checkpoints them


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a parent that is itself gone) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _write_pages(store: SQLiteStore, rows: int = ROWS) -> None:
    """Commits of about one page each (the store's own connection: what its statements do)."""
    db = store._db  # the test writes bulk rows the store has no operation for
    db.execute("CREATE TABLE IF NOT EXISTS filler (n INTEGER PRIMARY KEY, blob BLOB)")
    for _ in range(rows):
        db.execute("INSERT INTO filler (blob) VALUES (?)", (os.urandom(PAGE - 200),))


def _autocheckpoint(store: SQLiteStore) -> int:
    return int(store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "state.db")
    yield opened
    await opened.close()


async def test_the_child_checkpoints_what_the_store_wrote_and_the_loop_does_not(
    store: SQLiteStore, tmp_path: Path
) -> None:
    db_file = tmp_path / "state.db"
    store.checkpoint_elsewhere()
    assert store.checkpointer is not None and store.checkpointer.running
    assert _autocheckpoint(store) == BACKSTOP_PAGES  # the loop's own checkpoint is only a backstop now
    before = db_file.stat().st_size
    _write_pages(store)
    # The child copies the pages into the database file on its own (the next test: nothing else would).
    await eventually(lambda: db_file.stat().st_size >= before + ROWS * PAGE // 2, what="the child's checkpoint")
    rows = sqlite3.connect(db_file).execute("SELECT COUNT(*) FROM filler").fetchone()[0]
    assert rows == ROWS


async def test_without_the_child_the_same_writes_stay_in_the_wal(store: SQLiteStore, tmp_path: Path) -> None:
    # The control for the test above: under 1,000 pages the store itself does not checkpoint.
    db_file = tmp_path / "state.db"
    assert _autocheckpoint(store) == INLINE_PAGES
    before = db_file.stat().st_size
    _write_pages(store)
    assert db_file.stat().st_size == before  # SQLite checkpoints inside a commit: none ran


async def test_a_dead_child_hands_the_checkpoints_back_to_the_store(store: SQLiteStore, tmp_path: Path) -> None:
    store.checkpoint_elsewhere()
    checkpointer = store.checkpointer
    assert checkpointer is not None and checkpointer.pid is not None
    os.kill(checkpointer.pid, signal.SIGKILL)
    await eventually(lambda: not checkpointer.running, what="the store to see the child gone")
    assert _autocheckpoint(store) == INLINE_PAGES
    # And the store checkpoints again: past 1,000 pages the database file takes them.
    db_file = tmp_path / "state.db"
    before = db_file.stat().st_size
    _write_pages(store, rows=INLINE_PAGES + 100)
    assert db_file.stat().st_size > before
    await eventually(lambda: not _pid_alive(checkpointer.pid or 0), what="the child reaped")


async def test_closing_the_store_stops_the_child_and_keeps_every_write(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    store.checkpoint_elsewhere()
    checkpointer = store.checkpointer
    assert checkpointer is not None and checkpointer.pid is not None
    _write_pages(store)
    await store.close()
    assert not checkpointer.running
    assert not _pid_alive(checkpointer.pid)
    reopened = sqlite3.connect(tmp_path / "state.db")
    assert reopened.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert reopened.execute("SELECT COUNT(*) FROM filler").fetchone()[0] == ROWS


async def test_a_memory_store_has_no_child() -> None:
    store = SQLiteStore(":memory:")
    store.checkpoint_elsewhere()
    assert store.checkpointer is None
    await store.close()


async def test_the_child_ends_when_the_bridge_is_killed(tmp_path: Path) -> None:
    # A bridge killed with SIGKILL closes nothing: the child must notice by itself.
    program = textwrap.dedent(
        f"""
        import asyncio, sys
        from bridge.store import SQLiteStore

        async def main():
            store = SQLiteStore({str(tmp_path / "state.db")!r})
            store.checkpoint_elsewhere()
            print(store.checkpointer.pid, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    bridge = await asyncio.create_subprocess_exec(sys.executable, "-c", program, stdout=asyncio.subprocess.PIPE)
    try:
        assert bridge.stdout is not None
        child = int(await bridge.stdout.readline())
        assert _pid_alive(child)
        bridge.kill()
        await bridge.wait()
        await eventually(lambda: not _pid_alive(child), what="the orphaned child to exit")
    finally:
        if bridge.returncode is None:
            bridge.kill()
            await bridge.wait()


def test_the_child_refuses_a_file_that_is_not_there(tmp_path: Path) -> None:
    program = Path(__file__).parents[2] / "bridge" / "store" / "checkpoint_process.py"
    missing = tmp_path / "nothing.db"
    result = subprocess.run(
        [sys.executable, "-I", str(program), str(missing)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert not missing.exists()  # it creates nothing
