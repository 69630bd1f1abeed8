"""The change pump: every replica's catalogue fed from the ``changes`` table, in order.

One dedicated connection (never from the pool, so LISTEN stays put) per replica:
NOTIFY on the changes channel wakes it the moment the leader commits; a poll every
``poll_interval`` is the fallback and the connection's keep-alive. Each round reads
the revisions after the last one applied, oldest first, and hands them on only as
an unbroken sequence: a first revision past the next one expected means the
retained log no longer reaches back (the replica was away longer than it holds),
and the catalogue is resynchronised whole. A broken connection is made again with
backoff, and the first round after it catches up from the last revision applied.

While its replica leads, the pump stands still: the leader publishes its own
commits, and applying them twice must not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from registry.lifecycle import cancel_and_wait
from registry.model import Change
from registry.storage.store import CHANGES_CHANNEL, change_from_json

if TYPE_CHECKING:
    # Imported where used: asyncpg is the ``postgres`` extra, absent on SQLite installs.
    import asyncpg

log = logging.getLogger(__name__)

APPLICATION_NAME = "polku-registry-pump"
_PAGE = 500  # revisions read per query
_READ = (
    "SELECT revision, upserted::text AS upserted, removed::text AS removed FROM changes "
    "WHERE revision > $1 ORDER BY revision LIMIT $2"
)
_HEAD = "SELECT revision FROM registry_meta WHERE id = 1"
_OFF_LOOP = 50  # rows decoded on a thread beyond this many


class ChangePump:
    """Reads committed changes and applies them to the local catalogue in revision order."""

    def __init__(
        self,
        dsn: str,
        *,
        applied: Callable[[], int],
        apply: Callable[[list[Change]], None],
        resync: Callable[[], Awaitable[int]],
        on_notice: Callable[[str], None] = lambda payload: None,
        poll_interval: float = 1.0,
    ) -> None:
        """``applied()`` is the last revision in the catalogue; ``apply`` takes the next
        ones; ``resync()`` reloads the catalogue whole and returns its revision;
        ``on_notice`` hears payloads that are not revisions (the election's)."""
        self._dsn = dsn
        self._applied = applied
        self._apply = apply
        self._resync = resync
        self._on_notice = on_notice
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one reader at a time: the loop or a catch-up
        self.paused = False
        self.connected = False
        self.head = 0  # the newest revision seen in the database

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-change-pump")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._close()

    def wake(self) -> None:
        self._wake.set()

    async def catch_up(self) -> int:
        """Apply everything committed so far, even while paused; returns the revision.

        For a new leader, before it writes: its catalogue must be the database's head.

        Raises:
            OSError, asyncpg.PostgresError: the database failed.
        """
        async with self._lock:
            conn = await self._connection()
            return await self._drain(conn)

    async def _run(self) -> None:
        import asyncpg

        delay = 0.05
        while True:
            try:
                if not self.paused:
                    async with self._lock:
                        conn = await self._connection()
                        await self._drain(conn)
                delay = 0.05
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_interval)
                self._wake.clear()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if self.connected:
                    log.warning("change pump lost the database (%s); reconnecting", exc)
                await self._close()
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)
            except Exception:
                log.exception("change pump failed; starting over")
                await self._close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _connection(self) -> asyncpg.Connection:
        import asyncpg

        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        conn = await asyncpg.connect(
            self._dsn, timeout=5.0, server_settings={"application_name": APPLICATION_NAME}
        )
        try:
            await conn.add_listener(CHANGES_CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(lambda _conn: self._wake.set())
        self._conn = conn
        if not self.connected:
            self.connected = True
            log.info("change pump connected at revision %d", self._applied())
        return conn

    async def _close(self) -> None:
        self.connected = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
            conn.terminate()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.isdigit():
            self.head = max(self.head, int(payload))
            self._wake.set()
        else:
            self._on_notice(payload)

    async def _drain(self, conn: asyncpg.Connection) -> int:
        """Apply every revision after the last one applied, page by page."""
        while True:
            applied = self._applied()
            # The head first: every revision up to it is committed, so each one the log
            # still holds is seen by the read that follows (a later commit is no gap).
            head = await conn.fetchval(_HEAD, timeout=10.0) or 0
            self.head = max(self.head, head)
            rows = await conn.fetch(_READ, applied, _PAGE, timeout=10.0)
            if not rows:
                if head > applied:
                    # Committed revisions that the log no longer holds: start afresh.
                    log.warning("change log ends before revision %d: resynchronising", head)
                    return await self._resync()
                return applied
            if rows[0]["revision"] != applied + 1:
                log.warning(
                    "change log skips from revision %d to %d: resynchronising",
                    applied,
                    rows[0]["revision"],
                )
                await self._resync()
                continue
            changes = await _decode(rows)
            self.head = max(self.head, changes[-1].revision)
            self._apply(changes)
            if len(rows) < _PAGE:
                return changes[-1].revision


async def _decode(rows: list[Any]) -> list[Change]:
    def decode() -> list[Change]:
        return [
            change_from_json(r["revision"], json.loads(r["upserted"]), json.loads(r["removed"]))
            for r in rows
        ]

    return await asyncio.to_thread(decode) if len(rows) > _OFF_LOOP else decode()


def asyncpg_dsn(url: str) -> str:
    """A plain ``postgresql://`` DSN for asyncpg from an SQLAlchemy URL."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)
