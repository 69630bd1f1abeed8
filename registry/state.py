"""The registry's authoritative state: two in-memory catalogs and the journal.

Every write checks and applies its change to ``catalog`` (the write side) at once
(one event loop, no await in between, so the rules hold without locks), then waits
for the group commit that holds it. Once committed, the change is applied to
``view`` and published to listeners. Reads (list, get, resolve, watch) come from
``view``: nobody ever sees a revision that a crash could take back. If a commit
fails, both are reloaded from the database, which stays the source of truth, and
writes answer "unavailable" until they are.

Ownership of names and claims (SPEC §6) is held by ``catalog`` alone: only writes
and their checks need it. It is stored with the change that recorded it, and
reloaded with the catalog after a failed write.

Replicas (SPEC §8): a follower holds no journal and no write side of its own; its
``catalog`` *is* its ``view``, fed by the change pump through :meth:`apply`. It
becomes the leader with :meth:`lead` (a write side loaded fresh from the database,
which it has caught up with) and a follower again with :meth:`follow`.

``grace_from`` is the moment leases (and the deregister clock) count from at the
earliest: the start, or the end of a pause of the registry itself (SPEC §7 "Pauses
do not evict"), which :meth:`RegistryState.grant_grace` records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from registry.catalog import Catalog, FirstCheck, Released
from registry.errors import RegistryUnavailable, StoreError
from registry.model import Change, Plugin, Principal, Registration
from registry.storage.journal import Journal
from registry.storage.store import Fenced, Snapshot, Store

log = logging.getLogger(__name__)

Listener = Callable[[list[Change]], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


class RegistryState:
    """Catalog + journal + store. Owned by the server: ``start()``, ``stop()``."""

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 5.0,
        retain: int = 10_000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.clock = clock
        self.catalog = Catalog()
        self.view = Catalog()
        self.started_at = clock()
        self.grace_from = self.started_at
        self._flush_interval = flush_interval
        self._retain = retain
        self._journal: Journal | None = None
        self._listeners: list[Listener] = []
        self._reset_listeners: list[Callable[[], None]] = []
        self._recovering: asyncio.Task[None] | None = None
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Called when a write was fenced: this replica is no longer the leader.
        self.on_fenced: Callable[[], None] | None = None
        # Told of every commit: its seconds and records (metrics); any journal's.
        self.on_write: Callable[[float, int], None] | None = None

    async def start(self, *, leading: bool = True) -> None:
        """Load the catalog from the store and, leading, start the writer.

        Raises:
            StoreError: the database cannot be read.
        """
        snapshot = await self.store.load()
        self._load(snapshot)
        self.started_at = self.grace_from = self.clock()
        if leading:
            self._start_journal(snapshot.revision)
        else:
            self.catalog = self.view

    def _start_journal(self, revision: int) -> None:
        self._journal = Journal(
            self.store,
            revision=revision,
            flush_interval=self._flush_interval,
            retain=self._retain,
            on_committed=self._publish,
            on_failed=self._on_write_failed,
            on_write=self._wrote,
            lease_of=self._lease_of,
        )
        self._journal.start()

    def _wrote(self, seconds: float, records: int) -> None:
        if self.on_write is not None:
            self.on_write(seconds, records)

    async def stop(self) -> None:
        """Flush and stop the writer. Idempotent; safe before start."""
        if self._recovering is not None:
            self._recovering.cancel()
        journal, self._journal = self._journal, None
        if journal is not None:
            await journal.stop()
        for _, waiter in self._applied_waiters:
            waiter.cancel()
        self._applied_waiters = []

    # -- replicas --------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self._journal is not None

    async def lead(self) -> None:
        """Take the write side: load it from the database (already caught up to its
        head), start the writer, and give every lease one TTL of grace (SPEC §8).

        Raises:
            StoreError: the database cannot be read.
        """
        snapshot = await self.store.load()
        if snapshot.revision != self.view.revision:
            # The pump had not caught up after all: take the database's state whole.
            self.view = Catalog(snapshot.plugins, snapshot.revision)
            self._reset()
        self.catalog = Catalog(
            snapshot.plugins, snapshot.revision, owners=snapshot.owners, claims=snapshot.claims
        )
        self.grant_grace()
        self._start_journal(snapshot.revision)

    async def follow(self) -> None:
        """Give the write side up: writes staged and not committed are dropped
        (their callers hear the registry is unavailable); the view stays."""
        if self._recovering is not None:
            self._recovering.cancel()
            self._recovering = None
        journal, self._journal = self._journal, None
        if journal is not None:
            await journal.stop()
        self.catalog = self.view

    async def flush(self) -> None:
        """Make everything staged durable now (a leader about to hand over).

        Raises:
            StoreError: the write failed.
        """
        if self._journal is not None:
            await self._journal.commit()

    def apply(self, changes: list[Change]) -> None:
        """Apply changes the leader committed (from the change pump), in revision order."""
        fresh = [c for c in changes if c.revision > self.view.revision]
        if fresh:
            self._publish(fresh)

    async def resync(self) -> int:
        """Reload the view whole from the database (a follower that missed changes).

        Raises:
            StoreError: the database cannot be read.
        """
        snapshot = await self.store.load()
        self.view = Catalog(snapshot.plugins, snapshot.revision)
        if self._journal is None:
            self.catalog = self.view
        self._reset()
        self._wake_applied()
        log.info("registry catalogue resynchronised at revision %d", snapshot.revision)
        return snapshot.revision

    async def wait_applied(self, revision: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the view holds ``revision``; False after ``timeout`` seconds."""
        if self.view.revision >= revision:
            return True
        waiter = asyncio.get_running_loop().create_future()
        entry = (revision, waiter)
        self._applied_waiters.append(entry)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._applied_waiters.remove(entry)
        return True

    def _wake_applied(self) -> None:
        revision = self.view.revision
        for wanted, waiter in self._applied_waiters:
            if wanted <= revision and not waiter.done():
                waiter.set_result(None)

    def _reset(self) -> None:
        for on_reset in self._reset_listeners:
            on_reset()

    def subscribe(self, listener: Listener, on_reset: Callable[[], None] | None = None) -> None:
        """Call ``listener`` with each committed batch of changes, in revision order.

        ``on_reset`` is called when the catalog was reloaded after a failed write:
        whatever was derived from it must be rebuilt.
        """
        self._listeners.append(listener)
        if on_reset is not None:
            self._reset_listeners.append(on_reset)

    @property
    def writable(self) -> bool:
        """Whether writes are taken here now (leading, and not reloading)."""
        return self._journal is not None and self._recovering is None

    @property
    def recovering(self) -> bool:
        """Whether the catalog is being reloaded after a failed write."""
        return self._recovering is not None

    def grant_grace(self) -> datetime:
        """Count every lease and deregister clock from now at the earliest; returns now.

        As after a restart: the registry was paused or starved, so silence meant nothing.
        """
        self.grace_from = self.clock()
        return self.grace_from

    # -- writes ----------------------------------------------------------------

    async def register(
        self,
        registration: Registration,
        principal: Principal | None = None,
        *,
        max_live_instances: int = 0,
        max_plugins: int = 0,
        first_check: FirstCheck | None = None,
    ) -> Plugin:
        """Store a new instance, and the ownership it records; durable when this returns.

        ``principal=None`` is open mode: no ownership is checked or recorded.
        ``max_live_instances`` (0: off) bounds a non-admin principal's live instances,
        ``max_plugins`` (0: off) the plugins held in all. ``first_check`` is folded
        into the one change that stores it (status, last check, last error).

        Raises:
            PermissionDenied: the principal may not use the name or a claim.
            AlreadyExists: a claimed source or emitter name has another live owner.
            ResourceExhausted: the principal has ``max_live_instances`` live instances,
                or the registry holds ``max_plugins``.
            RegistryUnavailable: the database cannot take writes now.
        """
        journal = self._writer()
        plugin, change, ownership = self.catalog.register(
            registration,
            self.clock(),
            principal,
            max_live_instances=max_live_instances,
            max_plugins=max_plugins,
            first_check=first_check,
        )
        journal.record(change, ownership)
        await journal.commit()
        return plugin

    async def release(self, name: str) -> Released | None:
        """Forget who owns plugin name ``name`` and what it claimed; durable when this returns.

        Live instances are not touched. Idempotent: None when nothing was recorded.
        Makes no revision: ownership is not part of what watchers see.

        Raises:
            RegistryUnavailable: the database cannot take writes now.
        """
        journal = self._writer()
        released = None
        outcome = self.catalog.release(name)
        if outcome is not None:
            released, ownership = outcome
            journal.record_ownership(ownership)
        # Even with nothing to release: a release in flight is durable when we answer.
        await journal.commit()
        return released

    def check_register(
        self,
        registration: Registration,
        principal: Principal | None = None,
        *,
        max_live_instances: int = 0,
        max_plugins: int = 0,
    ) -> None:
        """Refuse early, changing nothing, what :meth:`register` would refuse now.

        Raises:
            PermissionDenied, AlreadyExists, ResourceExhausted: as :meth:`register`.
            RegistryUnavailable: the database cannot take writes now.
        """
        self._writer()
        self.catalog.check_register(
            registration,
            principal,
            max_live_instances=max_live_instances,
            max_plugins=max_plugins,
        )

    def check_room(self, registration: Registration, max_plugins: int) -> None:
        """Refuse early what :meth:`register` would refuse for ``max_plugins``.

        Raises:
            ResourceExhausted: the registry holds ``max_plugins`` and this adds one.
        """
        self.catalog.check_room(registration, max_plugins)

    def check_instance_access(self, principal: Principal | None, plugin_id: str) -> Plugin | None:
        """The instance, if ``principal`` may act on it (heartbeat, unregister, drain).

        None when the id is unknown (nothing to protect: acting on it is a no-op).

        Raises:
            PermissionDenied: the instance belongs to another principal's plugin name.
        """
        plugin = self.catalog.get(plugin_id)
        if plugin is not None:
            self.catalog.check_instance_access(principal, plugin)
        return plugin

    def check_name_access(self, principal: Principal | None, name: str) -> None:
        """Refuse acting on the instances of another principal's plugin name ``name``.

        Raises:
            PermissionDenied: the name belongs to another principal.
        """
        self.catalog.check_name_access(principal, name)

    def heartbeat(self, plugin_id: str) -> Plugin | None:
        """Renew a lease in memory; persisted lazily. None when not acknowledged.

        One new state of the plugin, shared by the write side and the view (see
        :meth:`_touched`), and its id staged for the next write: no row, no commit.
        """
        now = self.clock()
        plugin = self.catalog.heartbeat(plugin_id, now)
        if plugin is not None:
            view = self.view
            if view is not self.catalog and not view.hold_touched(plugin):
                view.touch(plugin_id, last_heartbeat_at=now)
            if self._journal is not None:
                self._journal.touch(plugin_id)
        return plugin

    async def remove(self, plugin_ids: list[str]) -> int:
        """Remove plugins (idempotent); durable when this returns.

        Returns the revision of the removal, 0 when nothing was there to remove.

        Raises:
            RegistryUnavailable: the database cannot take writes now.
        """
        journal = self._writer()
        change = self.catalog.remove(plugin_ids)
        if change is not None:
            journal.record(change)
        await journal.commit()
        return change.revision if change is not None else 0

    async def drain(self, plugin_ids: list[str], *, drained: bool) -> int:
        """Drain instances (``drained=True``) or undrain them; durable when this returns.

        One revision for all that changed (see :meth:`Catalog.drain`); returns it, or
        0 when nothing changed (already so, expired, or gone).

        Raises:
            RegistryUnavailable: the database cannot take writes now.
        """
        journal = self._writer()
        change = self.catalog.drain(plugin_ids, drained, self.clock())
        if change is not None:
            journal.record(change)
        # Even with nothing to change: a drain in flight is durable when we answer.
        await journal.commit()
        return change.revision if change is not None else 0

    def instances_of(self, name: str) -> list[str]:
        """The ids of every instance of plugin name ``name`` (write side), in id order."""
        return [p.plugin_id for p in self.catalog.instances_of(name)]

    def touch(self, plugin_id: str, **fields: object) -> None:
        """Change fields no watcher needs (last check, last error); persisted lazily."""
        plugin = self.catalog.touch(plugin_id, **fields)
        if plugin is not None:
            self._touched(plugin, **fields)

    def touch_many(self, plugin_ids: Iterable[str], checked_at: datetime, error: str) -> None:
        """Record one health check's result for plugins whose status it did not change.

        One call answers every plugin of an address (registry.poller): one time, one
        pass, one new state per plugin shared by both sides. Ids no longer held are
        skipped.

        Stored only when the error text changed: a check time alone decides nothing
        (leases run on heartbeats, and a restart checks every plugin within one
        interval), so 10,000 passing checks per interval write no rows of their own;
        the time rides along with the plugin's next lease or status write.
        """
        catalog, view, journal = self.catalog, self.view, self._journal
        shared = view is not catalog
        for plugin_id in plugin_ids:
            before = catalog.get(plugin_id)
            plugin = catalog.check(plugin_id, checked_at, error)
            if plugin is None or before is None:
                continue
            if shared and not view.hold_touched(plugin):
                view.touch(plugin_id, last_check_at=checked_at, last_error=error)
            if journal is not None and before.last_error != error:
                journal.touch(plugin_id)

    def _touched(self, plugin: Plugin, **fields: object) -> None:
        # The view holds the same state when it is at the same revision (shared, one
        # object); else (the write side is ahead, not committed yet) it gets the same
        # fields on its own committed state of the plugin.
        view = self.view
        if view is not self.catalog and not view.hold_touched(plugin):
            view.touch(plugin.plugin_id, **fields)
        if self._journal is not None:
            self._journal.touch(plugin.plugin_id)

    def _lease_of(self, plugin_id: str) -> Plugin | None:
        """The write side's state of a plugin whose lease fields are to be stored."""
        return self.catalog.get(plugin_id)

    async def update(self, plugins: list[Plugin]) -> None:
        """Store new states of existing plugins in one revision (status changes).

        Build ``plugins`` from the catalog right before calling, with no await in
        between, so no concurrent change is overwritten.
        """
        journal = self._writer()
        change = self.catalog.update(plugins, self.clock())
        if change is not None:
            journal.record(change)
            await journal.commit()

    # -- internals -------------------------------------------------------------

    def _load(self, snapshot: Snapshot) -> None:
        self.catalog = Catalog(
            snapshot.plugins, snapshot.revision, owners=snapshot.owners, claims=snapshot.claims
        )
        self.view = Catalog(snapshot.plugins, snapshot.revision)

    def _writer(self) -> Journal:
        if self._journal is None:
            raise RegistryUnavailable("the registry is not running")
        if self._recovering is not None:
            raise RegistryUnavailable("the registry database is unavailable; retry shortly")
        return self._journal

    def _publish(self, changes: list[Change]) -> None:
        for change in changes:
            self.view.apply(change)
        if self._applied_waiters:
            self._wake_applied()
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:
                log.exception("change listener failed")

    async def _on_write_failed(self, exc: StoreError) -> None:
        if isinstance(exc, Fenced):
            # Not a database failure: this replica's epoch is over. Its owner steps down.
            if self.on_fenced is not None:
                self.on_fenced()
            return
        if self._recovering is None:
            self._recovering = asyncio.create_task(self._recover(), name="registry-recover")

    async def _recover(self) -> None:
        """Reload the catalog from the database, dropping changes that were not stored."""
        delay = 0.1
        while True:
            try:
                snapshot = await self.store.load()
            except StoreError as exc:
                log.warning("registry database still unavailable: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._load(snapshot)
            if self._journal is not None:
                self._journal.reset(snapshot.revision)
            self._reset()
            log.info("registry catalog reloaded at revision %d", snapshot.revision)
            self._recovering = None
            return
