"""One replica of a registry on PostgreSQL: its role, and what changes with it (SPEC §8).

    replication = Replication(state, store, ...)
    await replication.start()      # campaigns once: a free lease is taken before serving
    ...
    await replication.stop()       # a leader hands the lease over

Taking over (elected): the pump stops applying, catches the catalogue up to the
database's head, the state loads its write side and gives every lease one TTL of
grace, writes are fenced by the new epoch, heartbeats this replica queued for the
old leader are applied here, then the leader's work starts (``on_lead``: health
checker, reaper). Stepping down (deposed, fenced, or stopping): the fence goes
first, so nothing more commits; then the leader's work stops (``on_follow``), the
write side is dropped, and the pump takes over again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import grpc
from sqlalchemy.exc import SQLAlchemyError

from registry.errors import StoreError
from registry.lifecycle import cancel_and_wait
from registry.model import Principal
from registry.replica import status
from registry.replica.election import LEADER_NOTICE, Election, LeaderLease, new_holder_id
from registry.replica.forward import LeaderLink
from registry.replica.pump import ChangePump, asyncpg_dsn
from registry.state import RegistryState
from registry.storage.store import SqlStore
from registry.wire import pb

log = logging.getLogger(__name__)

MAX_OWNERS = 50_000  # owners a follower remembers (least recently confirmed go first)

Work = Callable[[], Awaitable[None]]


class Replication:
    """Leader or follower among the replicas on one database; owned by the server."""

    def __init__(
        self,
        state: RegistryState,
        store: SqlStore,
        *,
        address: str,
        lease: float,
        cluster_token: str | None,
        credentials: grpc.ChannelCredentials | None,
        on_lead: Work,
        on_follow: Work,
        poll_interval: float = 1.0,
    ) -> None:
        self.state = state
        self.store = store
        self.address = address
        self.lease = lease
        self.holder = new_holder_id()
        self._on_lead = on_lead
        self._on_follow = on_follow
        self.election = Election(
            store.engine,
            holder=self.holder,
            address=address,
            lease=lease,
            on_elected=self._elected,
            on_deposed=self._deposed,
        )
        self.pump = ChangePump(
            asyncpg_dsn(store.engine.url.render_as_string(hide_password=False)),
            applied=lambda: state.view.revision,
            apply=state.apply,
            resync=state.resync,
            on_notice=self._notice,
            poll_interval=poll_interval,
        )
        self.link = LeaderLink(
            leader_address=self._forward_to,
            cluster_token=cluster_token,
            credentials=credentials,
            on_refused=self._refused,
        )
        # Plugin name -> the principal the leader confirmed may renew its instances.
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._reporter: asyncio.Task[None] | None = None
        self._stepping_down: asyncio.Task[None] | None = None
        state.on_fenced = self._fenced

    @property
    def leading(self) -> bool:
        return self.election.leading and self.state.leading

    def may_renew(self, principal: Principal | None, plugin_name: str) -> bool:
        """Whether this follower may answer a heartbeat itself (SPEC §6 holds here
        too): open mode, an admin, or the owner the leader confirmed for the name."""
        if principal is None or principal.admin:
            return True
        return self._owners.get(plugin_name) == principal.name

    def learn_owner(self, plugin_name: str, principal: Principal | None) -> None:
        """The leader renewed ``principal``'s heartbeat of ``plugin_name``: it may."""
        if principal is None or principal.admin:
            return
        self._owners[plugin_name] = principal.name
        self._owners.move_to_end(plugin_name)
        while len(self._owners) > MAX_OWNERS:
            self._owners.popitem(last=False)

    def _refused(self, plugin_ids: list[str]) -> None:
        """The leader refused heartbeats this follower answered: ask it from now on."""
        for plugin_id in plugin_ids:
            plugin = self.state.view.get(plugin_id)
            if plugin is not None:
                self._owners.pop(plugin.name, None)

    def _forward_to(self) -> str | None:
        """The leader writes go to; None while this replica holds the lease itself
        (taking over: writes wait for it, they are never sent to itself)."""
        if self.election.lease is not None:
            return None
        return self.election.leader_address

    async def start(self) -> None:
        """Start following, and campaign once: a free lease is this replica's at once.

        Raises:
            StoreError: the database cannot be read.
        """
        self.store.replicated = True
        await self.state.start(leading=False)
        self.pump.start()
        with contextlib.suppress(SQLAlchemyError, OSError, TimeoutError):
            await self.election.campaign_once()
        self.election.start()
        self.link.start()
        self._reporter = asyncio.create_task(self._report(), name="registry-replica-report")

    async def stop(self) -> None:
        """Write what is staged, hand the lease over (another replica takes it at
        once), stop following. The link to the leader stays until :meth:`close`."""
        reporter, self._reporter = self._reporter, None
        await cancel_and_wait(reporter)
        if self.leading:
            with contextlib.suppress(StoreError):
                await self.state.flush()  # heartbeats staged lazily are not lost
        await self.election.stop()
        await self.pump.stop()

    async def close(self) -> None:
        """Close the link to the leader (after the server answered its last calls)."""
        await self.link.stop()

    async def _elected(self, lease: LeaderLease) -> None:
        self.pump.paused = True
        await self.pump.catch_up()
        # The fence before the write side: the first write after lead() is this epoch's.
        self.store.fence = lease
        await self.state.lead()
        queued = self.link.take_heartbeats()
        for plugin_id in queued:
            self.state.heartbeat(plugin_id)
        await self._on_lead()
        log.info(
            "leading at revision %d (epoch %d); every lease has one TTL of grace",
            self.state.view.revision,
            lease.epoch,
        )

    async def _deposed(self) -> None:
        self.store.fence = None
        try:
            await self._on_follow()
            await self.state.follow()
        finally:
            self.pump.paused = False
            self.pump.wake()

    def _fenced(self) -> None:
        """A write found the epoch over: step down now, not at the next renewal."""
        lease = self.election.lease
        if lease is None or self._stepping_down is not None:
            return
        log.warning("a write was fenced: epoch %d is over; stepping down", lease.epoch)
        self._stepping_down = asyncio.create_task(self._step_down(lease))

    async def _step_down(self, lease: LeaderLease) -> None:
        try:
            await self.election.depose(lease)
        finally:
            self._stepping_down = None
            self.election.wake()

    def _notice(self, payload: str) -> None:
        if payload == LEADER_NOTICE:
            self.election.wake()

    async def _report(self) -> None:
        while True:
            try:
                await status.report(
                    self.store.engine,
                    address=self.address,
                    holder=self.holder,
                    role="leader" if self.leading else "follower",
                    epoch=self.election.epoch,
                    applied=self.state.view.revision,
                    forget=self.leading,
                )
            except (SQLAlchemyError, OSError) as exc:
                log.debug("replica report not written: %s", exc)
            await asyncio.sleep(self.lease / 3)

    async def status(self) -> pb.RegistryStatus:
        """GetStatus: this replica's view and every replica's last report.

        Raises:
            StoreError: the database failed.
        """
        try:
            reports, head = await status.read(self.store.engine, up_within=self.lease)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot read the replicas' reports: {exc}") from exc
        # This replica as of now, not as of its last report.
        mine = status.Report(
            address=self.address,
            role="leader" if self.leading else "follower",
            epoch=self.election.epoch,
            applied_revision=self.state.view.revision,
            seen_at=datetime.now(UTC),
            up=True,
        )
        reports = [mine if r.address == self.address else r for r in reports]
        if all(r.address != self.address for r in reports):
            reports.append(mine)
        return status.registry_status(
            address=self.address,
            leading=self.leading,
            leader=self.election.leader_address or "",
            epoch=self.election.epoch,
            head=max(head, self.state.view.revision),
            reports=sorted(reports, key=lambda r: r.address),
            backend="postgresql",
        )
