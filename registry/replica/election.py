"""Leader election on PostgreSQL: one lease row, an epoch, the database's clock (SPEC §8).

The row ``registry_leader`` (id 1) says who leads (``holder``, a random id per
process), where it is reached (``address``), under which ``epoch``, until when
(``expires_at``, compared with the database's ``clock_timestamp()`` so no replica's
clock decides). A replica takes the row when it expired, raising the epoch by one;
the leader renews it every third of the lease. Every write transaction of the
leader is fenced by the epoch (``registry.storage.store``), so a deposed leader, or one
resumed after SIGSTOP, commits nothing.

The leader also keeps its own deadline on the monotonic clock, started *before*
each renewal was sent: once it passes, :meth:`LeaderLease.holds` is false and the
store refuses to write before even asking the database. A renewal that fails or
finds the row taken deposes the leader at once.

A process restarted on the address the row names takes the lease over at its
first attempt rather than waiting it out: the old holder is dead, for this one has
bound its address. That is tried once, at start, so two replicas misconfigured
with one address cannot take it from each other for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.lifecycle import cancel_and_wait
from registry.storage.store import CHANGES_CHANNEL

log = logging.getLogger(__name__)

_READ = text(
    "SELECT epoch, holder, address, "
    "EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) AS remaining "
    "FROM registry_leader WHERE id = 1"
)
_ACQUIRE = text(
    "UPDATE registry_leader SET holder = :holder, address = :address, epoch = epoch + 1, "
    "expires_at = clock_timestamp() + make_interval(secs => :lease) "
    "WHERE id = 1 AND (expires_at <= clock_timestamp() OR holder = '' "
    "OR (:take_over AND address = :address)) RETURNING epoch"
)
# Renewal needs only the row unchanged: nobody took it, so nobody else led meanwhile.
_RENEW = text(
    "UPDATE registry_leader SET expires_at = clock_timestamp() + make_interval(secs => :lease) "
    "WHERE id = 1 AND holder = :holder AND epoch = :epoch RETURNING epoch"
)
_RESIGN = text(
    "UPDATE registry_leader SET holder = '', expires_at = clock_timestamp() "
    "WHERE id = 1 AND holder = :holder AND epoch = :epoch"
)
LEADER_NOTICE = "leader"  # payload on the changes channel: the lease was given up


def new_holder_id() -> str:
    """A process's identity in the lease row: random, never reused."""
    return secrets.token_hex(8)


class LeaderLease:
    """The lease this replica holds: the :class:`~registry.storage.store.Fence` of its writes."""

    def __init__(self, epoch: int, holder: str, valid_until: float) -> None:
        self.epoch = epoch
        self.holder = holder
        self._valid_until = valid_until
        self._lost = False

    def holds(self) -> bool:
        """Whether the lease is still ours by this process's monotonic clock."""
        return not self._lost and time.monotonic() < self._valid_until

    def extend(self, valid_until: float) -> None:
        self._valid_until = max(self._valid_until, valid_until)

    def lose(self) -> None:
        self._lost = True


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """The lease row as a replica last read it."""

    epoch: int
    holder: str
    address: str
    remaining: float  # seconds until it expires by the database's clock

    @property
    def held(self) -> bool:
        return bool(self.holder) and self.remaining > 0


class Election:
    """Campaigns for the lease, renews it while leading, and says when that changes.

    ``on_elected(lease)`` runs when this replica wins (it must catch up before it
    writes); ``on_deposed()`` when it loses the lease or gives it up. Both run on
    the election's own task, one at a time, so roles never interleave. A take-over
    has the lease's length to finish, not the round's third of it: cut off halfway,
    it would leave a leader that renews its lease but never serves. One that fails or
    runs out of time gives the lease up.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        holder: str,
        address: str,
        lease: float,
        on_elected: Callable[[LeaderLease], Awaitable[None]],
        on_deposed: Callable[[], Awaitable[None]],
    ) -> None:
        self._engine = engine
        self.holder = holder
        self.address = address
        self.lease_seconds = lease
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self.lease: LeaderLease | None = None
        self.leader: LeaderInfo | None = None
        self.changed = asyncio.Event()  # set whenever the known leader changes
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._take_over = True

    @property
    def leading(self) -> bool:
        return self.lease is not None and self.lease.holds()

    @property
    def epoch(self) -> int:
        if self.lease is not None:
            return self.lease.epoch
        return self.leader.epoch if self.leader is not None else 0

    @property
    def leader_address(self) -> str | None:
        """Where writes go now: this replica's address while leading, else the leader's."""
        if self.leading:
            return self.address
        if self.leader is not None and self.leader.held and self.leader.holder != self.holder:
            return self.leader.address
        return None

    async def campaign_once(self) -> None:
        """One round at once (at start: a free lease is taken before serving)."""
        await self._round()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-election")

    def wake(self) -> None:
        """Look at the lease now (a leader gave it up)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop campaigning; a leader gives the lease up so another takes over at once."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        lease = self.lease
        if lease is not None:
            await self.depose(lease)
            with contextlib.suppress(SQLAlchemyError, OSError, TimeoutError):
                async with asyncio.timeout(1.0), self._engine.begin() as conn:
                    await conn.execute(_RESIGN, {"holder": self.holder, "epoch": lease.epoch})
                    await conn.execute(
                        text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": CHANGES_CHANNEL, "payload": LEADER_NOTICE},
                    )
                log.info("gave up the leader lease of epoch %d", lease.epoch)

    async def _run(self) -> None:
        while True:
            delay = await self._round()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _round(self) -> float:
        """Renew or campaign once; returns how long to wait before the next round."""
        interval = self.lease_seconds / 3
        try:
            async with asyncio.timeout(interval):
                if self.lease is not None:
                    await self._renew(self.lease)
                    return interval
                delay, won = await self._campaign(interval)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("leader election: the database did not answer: %s", exc)
            lease = self.lease
            if lease is not None and not lease.holds():
                await self.depose(lease)
            return min(interval, 0.5)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("leader election failed")
            return interval
        if won is not None:
            began = time.monotonic()
            await self._take_over_as(won)
            if time.monotonic() - began > interval:
                return 0.0  # the lease ran on during a slow take-over: renew it now
        return delay

    async def _take_over_as(self, lease: LeaderLease) -> None:
        """Run ``on_elected``, bounded by the lease; give the lease up when it fails."""
        try:
            async with asyncio.timeout(self.lease_seconds):
                await self._on_elected(lease)
        except asyncio.CancelledError:
            raise
        except Exception:  # TimeoutError among them
            log.exception("taking over as leader failed; giving the lease up")
            await self.depose(lease)

    async def _renew(self, lease: LeaderLease) -> None:
        if not lease.holds():
            await self.depose(lease)
            return
        sent = time.monotonic()
        async with self._engine.begin() as conn:
            epoch = await conn.scalar(
                _RENEW, {"holder": self.holder, "epoch": lease.epoch, "lease": self.lease_seconds}
            )
        if epoch is None:
            log.warning("leader lease of epoch %d was taken over: stepping down", lease.epoch)
            await self.depose(lease)
        else:
            lease.extend(sent + self.lease_seconds)

    async def _campaign(self, interval: float) -> tuple[float, LeaderLease | None]:
        """One attempt at the lease: the delay to the next round, and the lease if won."""
        sent = time.monotonic()
        take_over, self._take_over = self._take_over, False
        async with self._engine.begin() as conn:
            epoch = await conn.scalar(
                _ACQUIRE,
                {
                    "holder": self.holder,
                    "address": self.address,
                    "lease": self.lease_seconds,
                    "take_over": take_over,
                },
            )
            row = None if epoch is not None else (await conn.execute(_READ)).one()
        if epoch is not None:
            lease = LeaderLease(int(epoch), self.holder, sent + self.lease_seconds)
            self.lease = lease
            self._set_leader(LeaderInfo(lease.epoch, self.holder, self.address, self.lease_seconds))
            log.info("elected leader of epoch %d", lease.epoch)
            return interval, lease
        assert row is not None
        info = LeaderInfo(int(row.epoch), str(row.holder), str(row.address), float(row.remaining))
        self._set_leader(info)
        # Wake right when the lease runs out, should its holder be gone.
        return (min(interval, max(0.01, info.remaining + 0.01)) if info.held else 0.05), None

    async def depose(self, lease: LeaderLease) -> None:
        lease.lose()
        if self.lease is lease:
            self.lease = None
            self._set_leader(None)
            try:
                await self._on_deposed()
            except Exception:
                log.exception("stepping down failed")

    def _set_leader(self, info: LeaderInfo | None) -> None:
        old = self.leader
        self.leader = info
        if (old and (old.epoch, old.address)) != (info and (info.epoch, info.address)):
            if info is not None and info.holder != self.holder:
                log.info("following leader %s (epoch %d)", info.address, info.epoch)
            self.changed.set()
