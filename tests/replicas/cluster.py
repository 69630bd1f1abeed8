"""A harness for the replica tests: n ``polku-registry serve`` processes on one PostgreSQL.

    cluster = await Cluster(url, n=3).start()
    leader = await cluster.leader()        # every live replica agrees on it (GetStatus)
    ...
    agreed = await cluster.wait_agreed()   # every live replica lists the same, at the head
    await cluster.stop()

Replicas are :class:`e2e.helpers.RegistryProcess` children (their blocking calls go
through ``asyncio.to_thread``). The database is read with asyncpg directly, one
connection per query, so that a PostgreSQL restart never leaves a broken one behind.
Watch streams opened by :meth:`Cluster.watch` are recorded by
:class:`~.streams.WatchStream`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from e2e.helpers import RegistryProcess
from google.protobuf.empty_pb2 import Empty

from registry.client import RegistryClient
from registry.wire import pb

from .common import DEADLINE, rpc_error, short, until
from .sockets import local_ports
from .streams import WatchStream

LEADER_LEASE = 2
# Plugins registered at addresses nobody serves keep their status for the whole test:
# one check an hour, and a threshold no test reaches, so revisions come from the test only.
QUIET_ARGS: tuple[str, ...] = ("--health-interval", "1h", "--unhealthy-threshold", "1000")
PUMP_APPLICATION = "polku-registry-pump"
_CHANNEL_OPTIONS = (
    # A replica restarted on its old port is dialled again soon, not after gRPC's
    # default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def role_name(role: int) -> str:
    return pb.ReplicaRole.Name(role) if role in pb.ReplicaRole.values() else str(role)


def describe_status(status: pb.RegistryStatus | str) -> str:
    if isinstance(status, str):
        return status
    replicas = "; ".join(
        f"{r.address} {role_name(r.role)} epoch {r.epoch} applied {r.applied_revision} "
        f"lag {r.lag} up {r.up}"
        for r in status.replicas
    )
    return (
        f"role {role_name(status.role)}, leader {status.leader or '(none)'}, epoch "
        f"{status.epoch}, revision {status.revision}, backend {status.backend!r}, "
        f"replicas [{replicas}]"
    )


# -- the replicas -------------------------------------------------------------------------


class Replica(RegistryProcess):
    """One ``serve`` process that can also be paused (SIGSTOP) and resumed (SIGCONT)."""

    def __init__(self, database_url: str, *extra_args: str) -> None:
        super().__init__(database_url, *extra_args)
        self.paused = False

    @property
    def pid(self) -> int:
        assert self._process is not None, "the replica was never started"
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process is not None and self.returncode is None

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def terminate(self, timeout: float = DEADLINE) -> int:
        """SIGTERM, then wait for the exit (SIGKILL after ``timeout``); returns its status."""
        return self.stop(timeout)

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


@dataclass(frozen=True)
class Entry:
    """What must be the same for one plugin on every replica (heartbeat times may differ)."""

    name: str
    address: str
    status: str
    revision: int


@dataclass(frozen=True)
class Listing:
    """One replica's whole catalogue at one revision."""

    revision: int
    plugins: dict[str, Entry]


@dataclass(frozen=True)
class Agreed:
    """The state every live replica reached: the ``changes`` head and the common listing."""

    head: int
    listing: Listing


@dataclass(frozen=True)
class Change:
    """One row of ``changes``: its revision, epoch and the plugin ids it upserts/removes."""

    revision: int
    epoch: int
    upserted: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def carries_plugins(self) -> bool:
        """Whether Watch sends it (a change that names no plugin has nothing to send)."""
        return bool(self.upserted or self.removed)


def _ids(raw: str | None) -> tuple[str, ...]:
    items = json.loads(raw) if raw else []
    return tuple(str(item.get("plugin_id", "?")) for item in items)


class Cluster:
    """``n`` replicas on one PostgreSQL database, their clients and their database.

    ``extra_args`` go after ``--db`` (after ``--leader-lease`` and ``--cluster-token``,
    which every replica gets). Thread rules: one event loop, the test's.
    """

    def __init__(self, database_url: str, n: int = 3, extra_args: Sequence[str] = ()) -> None:
        self.database_url = database_url
        self.token = secrets.token_hex(16)
        self.args = (
            "--leader-lease",
            str(LEADER_LEASE),
            "--cluster-token",
            self.token,
            *extra_args,
        )
        self.replicas = [Replica(database_url, *self.args) for _ in range(n)]
        self._every: list[Replica] = list(self.replicas)  # restarted ones too, for stop()
        self._clients: dict[str, RegistryClient] = {}
        self._streams: list[WatchStream] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> Cluster:
        """Start every replica, all at once; returns when each printed ``serving on``.

        Raises:
            AssertionError: one exited or stayed silent (with its output).
        """
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in self.replicas))
        return self

    async def stop(self) -> None:
        """Close streams and clients, resume paused replicas, SIGTERM all. Idempotent."""
        for stream in self._streams:
            await stream.close()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

        async def end(replica: Replica) -> None:
            if replica.paused:
                replica.resume()
            await asyncio.to_thread(replica.stop, 15.0)

        await asyncio.gather(*(end(r) for r in self._every))

    async def restart(self, address: str) -> Replica:
        """Start a new replica on the address of a dead one (same port, same advertise)."""
        index = self.addresses.index(address)
        old = self.replicas[index]
        assert not old.alive, f"{address} is still running"
        replica = Replica(self.database_url, *self.args, "--listen", address)
        self.replicas[index] = replica
        self._every.append(replica)
        client = self._clients.pop(address, None)
        if client is not None:
            await client.close()
        started = await asyncio.to_thread(replica.start)
        assert started == address, f"restarted on {started}, not on {address}"
        return replica

    def report(self) -> str:
        """The last lines each replica printed, for the log of a failed test."""
        parts = []
        for replica in self._every:
            state = "running" if replica.alive else f"exit {replica.returncode}"
            parts.append(f"----- replica {replica.address} ({state}) -----\n{replica.tail()}")
        return "\n".join(parts)

    # -- who is who ----------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """Every replica's address (as it printed it), dead ones included."""
        return [r.address or "?" for r in self.replicas]

    def replica(self, address: str) -> Replica:
        return self.replicas[self.addresses.index(address)]

    def live(self) -> list[str]:
        """Addresses of the replicas running and not paused."""
        return [r.address or "?" for r in self.replicas if r.alive and not r.paused]

    def client(self, address: str) -> RegistryClient:
        """A cached client of one replica (closed by :meth:`stop`)."""
        client = self._clients.get(address)
        if client is None:
            client = RegistryClient(address, timeout=10.0, channel_options=_CHANNEL_OPTIONS)
            self._clients[address] = client
        return client

    async def status(self, address: str, deadline: float = 3.0) -> pb.RegistryStatus | str:
        """GetStatus of one replica, or ``CODE: details`` when the call failed."""
        try:
            status: pb.RegistryStatus = await self.client(address).stub.GetStatus(
                Empty(), timeout=deadline
            )
        except grpc.aio.AioRpcError as exc:
            return rpc_error(exc)
        return status

    async def statuses(self, addresses: Iterable[str]) -> dict[str, pb.RegistryStatus | str]:
        names = list(addresses)
        answers = await asyncio.gather(*(self.status(a) for a in names))
        return dict(zip(names, answers, strict=True))

    async def agreed_leader(
        self, among: Sequence[str] | None = None, *, after_epoch: int = 0, within: float = DEADLINE
    ) -> tuple[str, int]:
        """The leader and epoch every replica of ``among`` (default: the live ones) reports.

        Agreement: each answers GetStatus with the same ``leader`` (one of ``among``) and
        ``epoch`` (above ``after_epoch``), the leader says LEADER and the others FOLLOWER.

        Raises:
            AssertionError: no agreement within ``within`` (shows every last answer).
        """
        last: dict[str, pb.RegistryStatus | str] = {}

        async def agreement() -> tuple[str, int] | None:
            names = list(among) if among is not None else self.live()
            last.clear()
            last.update(await self.statuses(names))
            answers = list(last.values())
            if not names or any(isinstance(s, str) for s in answers):
                return None
            leaders = {s.leader for s in answers if not isinstance(s, str)}
            epochs = {s.epoch for s in answers if not isinstance(s, str)}
            if len(leaders) != 1 or len(epochs) != 1:
                return None
            leader, epoch = leaders.pop(), epochs.pop()
            if leader not in names or epoch <= after_epoch:
                return None
            for address, answer in last.items():
                assert not isinstance(answer, str)
                want = pb.REPLICA_ROLE_LEADER if address == leader else pb.REPLICA_ROLE_FOLLOWER
                if answer.role != want:
                    return None
            return leader, epoch

        def seen() -> str:
            lines = "\n".join(f"  {a}: {describe_status(s)}" for a, s in last.items())
            return (
                f"one leader (epoch > {after_epoch}) agreed on by {list(last)}; last seen:\n{lines}"
            )

        result: tuple[str, int] = await until(agreement, within=within, what=seen)
        return result

    async def leader(
        self, among: Sequence[str] | None = None, *, after_epoch: int = 0, within: float = DEADLINE
    ) -> str:
        """The address of the leader every replica of ``among`` agrees on (see agreed_leader)."""
        address, _ = await self.agreed_leader(among, after_epoch=after_epoch, within=within)
        return address

    async def followers(self, among: Sequence[str] | None = None) -> list[str]:
        """The live replicas (or ``among``) other than the agreed leader."""
        names = list(among) if among is not None else self.live()
        leader = await self.leader(names)
        return [a for a in names if a != leader]

    # -- catalogues ----------------------------------------------------------------------

    async def listing(self, address: str) -> Listing | str:
        """One replica's whole catalogue, or why it could not be read consistently."""
        stub = self.client(address).stub
        request = pb.ListPluginsRequest(page_size=1000)
        plugins: dict[str, Entry] = {}
        revisions: set[int] = set()
        try:
            while True:
                response = await stub.ListPlugins(request, timeout=10)
                revisions.add(response.revision)
                for p in response.plugins:
                    status = pb.PluginStatus.Name(p.status)
                    plugins[p.plugin_id] = Entry(p.info.name, p.address, status, p.revision)
                if not response.next_page_token:
                    break
                request.page_token = response.next_page_token
        except grpc.aio.AioRpcError as exc:
            return f"ListPlugins failed: {rpc_error(exc)}"
        if len(revisions) != 1:
            return f"moved from revision {min(revisions)} to {max(revisions)} while paging"
        return Listing(revisions.pop(), plugins)

    async def wait_agreed(
        self, among: Sequence[str] | None = None, *, within: float = DEADLINE
    ) -> Agreed:
        """Wait until every replica of ``among`` (default: the live ones) lists the same
        plugins at the ``changes`` head.

        Raises:
            AssertionError: not within ``within``; says where each replica stood.
        """
        last: dict[str, Listing | str] = {}
        heads: list[int] = [0]

        async def agreement() -> Agreed | None:
            names = list(among) if among is not None else self.live()
            heads[0] = head = await self.head()
            listings = await asyncio.gather(*(self.listing(a) for a in names))
            last.clear()
            last.update(zip(names, listings, strict=True))
            good = [x for x in listings if isinstance(x, Listing)]
            if len(good) != len(names) or any(x.revision != head for x in good):
                return None
            if any(x.plugins != good[0].plugins for x in good):
                return None
            return Agreed(head, good[0])

        def seen() -> str:
            return f"every replica at the changes head {heads[0]} with one listing:\n" + (
                describe_listings(last)
            )

        agreed: Agreed = await until(agreement, within=within, what=seen, interval=0.1)
        return agreed

    # -- the database --------------------------------------------------------------------

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run one query on a connection of its own."""
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    async def changes(self) -> list[Change]:
        """Every row of ``changes``, in revision order."""
        rows = await self.query(
            "SELECT revision, epoch, upserted::text AS upserted, removed::text AS removed "
            "FROM changes ORDER BY revision"
        )
        return [
            Change(r["revision"], r["epoch"], _ids(r["upserted"]), _ids(r["removed"])) for r in rows
        ]

    async def head(self) -> int:
        """The last revision in ``changes`` (0 when empty)."""
        rows = await self.query("SELECT coalesce(max(revision), 0) AS head FROM changes")
        head: int = rows[0]["head"]
        return head

    async def pumps(self) -> dict[str, list[int]]:
        """Each live replica's pump connections: address -> their backend pids.

        A backend is matched to the replica whose process owns the socket at its
        ``client_port``; ``"?"`` holds the pump backends no live replica owns.
        """
        rows = await self.query(
            "SELECT pid, client_port FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1",
            PUMP_APPLICATION,
        )
        owners = {
            port: r.address or "?" for r in self.replicas if r.alive for port in local_ports(r.pid)
        }
        found: dict[str, list[int]] = {a: [] for a in self.live()}
        for row in rows:
            found.setdefault(owners.get(row["client_port"], "?"), []).append(row["pid"])
        return found

    # -- streams -------------------------------------------------------------------------

    async def watch(self, address: str) -> WatchStream:
        """A Watch from revision 0 on one replica, recorded; returns once its snapshot came."""
        stream = WatchStream(self.client(address), address)
        self._streams.append(stream)
        await stream.open()
        return stream


def describe_listings(listings: dict[str, Listing | str]) -> str:
    """Where each replica stood, and which plugins the first readable one differs in."""
    good = {a: x for a, x in listings.items() if isinstance(x, Listing)}
    base = next(iter(good.values()), None)
    lines = []
    for address, listing in listings.items():
        if isinstance(listing, str):
            lines.append(f"  {address}: {listing}")
            continue
        line = f"  {address}: revision {listing.revision}, {len(listing.plugins)} plugins"
        if base is not None and listing is not base:
            only_here = sorted(set(listing.plugins) - set(base.plugins))
            only_there = sorted(set(base.plugins) - set(listing.plugins))
            differ = sorted(
                i
                for i in set(listing.plugins) & set(base.plugins)
                if listing.plugins[i] != base.plugins[i]
            )
            line += (
                f"; vs the first: only here {short(only_here, 5)}, missing {short(only_there, 5)}"
                f", different {short(differ, 5)}"
            )
        lines.append(line)
    return "\n".join(lines)
