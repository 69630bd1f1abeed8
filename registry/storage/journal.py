"""Group commit: every change staged while one transaction runs goes into the next.

A Register waits for the transaction that holds its change, so it is durable when
answered, yet 64 concurrent Registers cost a handful of commits, not 64.
Heartbeats and health results are staged without waking the writer, as lease
fields only: they ride along with the next commit or the periodic flush, never cost
a commit of their own, and never rewrite a plugin's row. A touch stages only the
plugin's id; its lease fields are read from the write side when the batch is taken
for writing, so a plugin touched a thousand times between two writes is one row of
its latest times, and a touch costs no row of its own. Ownership records ride in
the batch of the change that made them; a release, which makes no revision, is
staged on its own and committed like any change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from registry.catalog import OwnershipChange
from registry.errors import StoreError
from registry.model import Change
from registry.storage.store import Batch, LeaseFields, Store

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds a stopping journal waits for a database that does not answer


class Journal:
    """The single writer between the catalog and the store."""

    def __init__(
        self,
        store: Store,
        *,
        revision: int,
        flush_interval: float,
        retain: int,
        on_committed: Callable[[list[Change]], None],
        on_failed: Callable[[StoreError], Awaitable[None]],
        on_write: Callable[[float, int], None] | None = None,
        lease_of: Callable[[str], LeaseFields | None] | None = None,
    ) -> None:
        """``on_write(seconds, records)`` hears of every successful commit (metrics).

        ``lease_of(plugin_id)`` gives the current lease fields of a touched plugin
        (the write side's state of it), None once it is gone; without it, touches
        are not stored.
        """
        self._store = store
        self._lease_of = lease_of
        # Ids touched since the batch was taken (insertion order: rows in touch order).
        self._touched: dict[str, None] = {}
        self._on_write = on_write
        self._flush_interval = flush_interval
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._retain = retain
        self._batch = self._new_batch(revision)
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-journal")

    async def stop(self) -> None:
        """Finish the write in flight and write what is staged, then stop.

        A write is never cancelled halfway: what a reader saw stays stored. Gives up
        (cancelling) after ``STOP_TIMEOUT`` seconds of a database that does not answer.
        Safe before start and twice.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT)
        except TimeoutError:
            log.error("registry journal did not finish its last write in %ss", STOP_TIMEOUT)
        # Nobody writes any more: a commit still waiting would wait for ever.
        self._fail_staged(StoreError("the registry stopped writing; retry shortly"))

    def record(self, change: Change, ownership: OwnershipChange | None = None) -> None:
        """Stage a change and the ownership it recorded; :meth:`commit` makes both durable."""
        for plugin in change.upserted:
            self._batch.upsert(plugin)
        for plugin in change.removed:
            self._batch.remove(plugin.plugin_id)
        self._batch.revision = change.revision
        self._batch.changes.append(change)
        if ownership:
            self._batch.own(ownership)

    def record_ownership(self, ownership: OwnershipChange) -> None:
        """Stage ownership records that belong to no revision (a release)."""
        self._batch.own(ownership)

    def touch(self, plugin_id: str) -> None:
        """Stage the lease and check fields of a plugin lazily: no commit is asked for.

        For heartbeats and health results that change no status: only those fields
        are written (:class:`~registry.storage.store.Lease`), never the plugin's row again;
        their values are the latest when the batch is taken (``lease_of``).
        """
        self._touched[plugin_id] = None

    async def commit(self) -> None:
        """Wait until everything staged so far is durable.

        Raises:
            StoreError: the transaction failed; the change is not stored.
        """
        if self._task is None:
            raise StoreError("the registry is not running")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            try:
                await self._write_staged()
            except StoreError as exc:
                log.error("registry database write failed: %s", exc)
                # What was staged meanwhile was applied on top of the lost batch:
                # drop it too; the owner reloads the catalog from the database.
                self._fail_staged(exc)
                await self._on_failed(exc)
            except Exception:  # keep the writer alive whatever happens
                log.exception("registry journal failed")
            # Stopping: what was staged during the last write is written too.
            if self._stopping and not (self._waiters or self._batch or self._touched):
                return

    def reset(self, revision: int) -> None:
        """Continue from ``revision`` after the owner reloaded the catalog."""
        self._batch = self._new_batch(revision)
        self._touched = {}

    def _take(self) -> Batch:
        """The staged batch, with the lease rows of the touched plugins; a new one staged.

        Synchronous: the lease fields read are the write side's at this very moment,
        so they agree with every change the batch holds (a plugin removed in it has
        no lease to read; one upserted in it takes its newest lease, see
        :meth:`~registry.storage.store.Batch.touch`).
        """
        batch, self._batch = self._batch, self._new_batch(self._batch.revision)
        touched, self._touched = self._touched, {}
        lease_of = self._lease_of
        if lease_of is not None:
            for plugin_id in touched:
                lease = lease_of(plugin_id)
                if lease is not None:
                    batch.touch(plugin_id, lease)
        return batch

    def _new_batch(self, revision: int) -> Batch:
        return Batch(revision=revision, retain=self._retain)

    def _fail_staged(self, exc: StoreError) -> None:
        self._batch = self._new_batch(self._batch.revision)
        self._touched = {}
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)

    async def _write_staged(self) -> None:
        batch = self._take()
        waiters, self._waiters = self._waiters, []
        started = time.perf_counter()
        try:
            if batch:
                await self._store.write(batch)
        except BaseException as exc:
            failure = (
                exc if isinstance(exc, StoreError) else StoreError(f"write interrupted: {exc!r}")
            )
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
            raise
        if batch and self._on_write is not None:
            _report(self._on_write, time.perf_counter() - started, batch)
        try:
            if batch.changes:
                self._on_committed(batch.changes)
        finally:  # durable whatever a listener did: no commit waits for ever
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


def _report(on_write: Callable[[float, int], None], seconds: float, batch: Batch) -> None:
    """Tell ``on_write`` of a commit: its time, and the records it wrote."""
    records = len(batch.upserts) + len(batch.touches) + len(batch.removals)
    records += len(batch.owners) + len(batch.claims)
    try:
        on_write(seconds, records)
    except Exception:  # a metric must never stop the writer
        log.exception("journal on_write hook failed")
