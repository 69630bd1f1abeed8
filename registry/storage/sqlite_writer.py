"""The SQLite write path: one plain sqlite3 connection on one thread, a batch per hop.

Part of the store (``registry.storage.store``). aiosqlite costs three thread hops per
statement and SQLAlchemy its own work per statement and per row; here the event loop
hands the whole batch to the writer thread once, which runs it as one transaction of
one ``executemany`` per table (:func:`registry.storage.batch_sql.statements`) and answers
once. The connection has the pragmas of the store's engine (:data:`PRAGMAS`): WAL,
and ``synchronous=FULL``, so a batch is on disk when :meth:`SqliteWriter.write`
returns. Readers (start-up, tests) use the engine's own connections beside it.

Thread rules: the connection is opened, used and closed on the writer's single
thread only; callers on the event loop await :meth:`SqliteWriter.write` and
:meth:`SqliteWriter.close`. One write at a time is the journal's rule already.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from registry.storage.batch_sql import Tracer, statements

if TYPE_CHECKING:
    from registry.storage.store import Batch

# WAL lets readers run beside the writer; synchronous=FULL fsyncs every commit, so
# an acknowledged write survives a crash of the machine too. Every connection of the
# store runs these (the engine's too).
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA busy_timeout=30000")
BUSY_TIMEOUT = 30.0  # seconds a write waits for another writer's lock, as the engine does


class SqliteWriter:
    """Writes batches to one SQLite file through a connection and thread of its own.

    The connection is opened at the first write, never creating the file: the
    store's migrations made it. After :meth:`close`, a write opens it again.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # the writer thread's alone

    async def write(self, batch: Batch, trace: Tracer | None = None) -> None:
        """Apply ``batch`` in one transaction; on disk when this returns.

        Raises:
            sqlite3.Error, OSError: the database failed; nothing was written.
            ValueError: a time in the batch is naive.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="registry-sqlite-writer")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write, batch, trace)

    async def close(self) -> None:
        """Close the connection (after the write in flight) and stop the thread."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        finally:
            executor.shutdown(wait=False)

    # -- on the writer thread ---------------------------------------------------------

    def _write(self, batch: Batch, trace: Tracer | None) -> None:
        todo = statements(batch, "sqlite")
        if not todo:
            return
        conn = self._connection()
        try:
            # IMMEDIATE: take the write lock now (waiting up to the busy timeout)
            # rather than failing to upgrade a read lock halfway through the batch.
            _run(conn, "BEGIN IMMEDIATE", trace)
            for statement in todo:
                if trace is not None:
                    trace(statement.sql, statement.rows)
                conn.executemany(statement.sql, statement.rows)
            _run(conn, "COMMIT", trace)
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    # The connection is unusable: open a new one for the next write.
                    self._close()
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                f"file:{quote(str(self._path))}?mode=rw",
                uri=True,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,  # transactions are ours: BEGIN ... COMMIT
            )
            try:
                for pragma in PRAGMAS:
                    conn.execute(pragma)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _run(conn: sqlite3.Connection, sql: str, trace: Tracer | None) -> None:
    if trace is not None:
        trace(sql, [])
    conn.execute(sql)
