"""A harness for the replica tests: n ``polku-registry serve`` processes on one PostgreSQL.

    cluster = await Cluster(url, n=3).start()
    leader = await cluster.leader()        # every live replica agrees on it (GetStatus)
    ...
    agreed = await cluster.wait_agreed()   # every live replica lists the same, at the head
    await cluster.stop()

Replicas are :class:`e2e.helpers.RegistryProcess` children (their blocking calls go
through ``asyncio.to_thread``). The database is read with asyncpg directly, one
connection per query, so that a PostgreSQL restart never leaves a broken one behind.
Every wait has a deadline that bounds a failure (never measures anything) and says on
failure what it saw last. Watch streams are recorded by :class:`WatchStream`, and
:func:`divergence` says how one differs from the ``changes`` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
from e2e.helpers import RegistryProcess
from google.protobuf.empty_pb2 import Empty

from registry.client import RegistryClient
from registry.wire import pb, pb_grpc

# Bounds on failures, generous because the suite runs on two busy cores.
DEADLINE = 30.0
LEADER_LEASE = 2
LONG_LEASE = 3600
# Plugins registered at addresses nobody serves keep their status for the whole test:
# one check an hour, and a threshold no test reaches, so revisions come from the test only.
QUIET_ARGS: tuple[str, ...] = ("--health-interval", "1h", "--unhealthy-threshold", "1000")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
PUMP_APPLICATION = "polku-registry-pump"
_CHANNEL_OPTIONS = (
    # A replica restarted on its old port is dialled again soon, not after gRPC's
    # default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


async def until(
    probe: Callable[[], Any],
    *,
    within: float = DEADLINE,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.05,
) -> Any:
    """Poll ``probe`` (sync or async) until it gives something truthy; return that.

    Raises:
        AssertionError: ``within`` seconds passed first; the message is ``what``, called
            at that moment when it is a function (so it can show the last state seen).
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {within}s waiting for {text}")
        await asyncio.sleep(interval)


def rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """``CODE: details`` of a failed call."""
    return f"{exc.code().name}: {exc.details()}"


def short(items: Sequence[Any], limit: int = 12) -> str:
    """At most ``limit`` items of a list, and how many more there are."""
    shown = ", ".join(map(str, items[:limit]))
    more = len(items) - limit
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"


def register_request(name: str, port: int, *, lease: int = LONG_LEASE) -> pb.RegisterRequest:
    """An ingestor ``name`` with the source ``name`` at 127.0.0.1:``port``."""
    return pb.RegisterRequest(
        info=pb.PluginInfo(
            name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[name]
        ),
        address=f"127.0.0.1:{port}",
        lease_ttl_seconds=lease,
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


# -- Watch streams ------------------------------------------------------------------------


@dataclass
class History:
    """What one Watch stream said, as revisions.

    ``base`` is the first snapshot's revision, ``revisions`` those of the change messages
    after it (no progress messages, no rest of a split snapshot), ``resets`` those of
    any later snapshot, ``expired`` every ``(revision, plugin_id)`` sent as EXPIRED.
    """

    address: str
    base: int
    revisions: list[int]
    resets: list[int] = field(default_factory=list)
    expired: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def history_of(address: str, messages: Sequence[pb.WatchResponse]) -> History:
    """Read a recorded stream (see :class:`History`)."""
    if not messages:
        return History(address, 0, [], problems=["it sent no message at all"])
    first = messages[0]
    history = History(address, first.revision if first.snapshot else 0, [])
    if not first.snapshot:
        history.problems.append(f"its first message (revision {first.revision}) is no snapshot")
    snapshot_revision = history.base if first.snapshot else -1
    for message in messages:
        history.expired += [
            (message.revision, p.plugin_id)
            for p in message.upserted
            if p.status == pb.PLUGIN_STATUS_EXPIRED
        ]
    for message in messages[1:] if first.snapshot else messages:
        if message.snapshot:
            history.resets.append(message.revision)
            snapshot_revision = message.revision
        elif not message.upserted and not message.removed_plugin_ids:
            continue  # a progress message
        elif message.revision == snapshot_revision:
            continue  # the rest of a snapshot split over several messages
        else:
            history.revisions.append(message.revision)
    return history


def divergence(history: History, table: Sequence[int], upto: int) -> str:
    """How a stream's changes differ from the ``changes`` table; ``""`` when they do not.

    Only revisions in ``(history.base, upto]`` count: before is the snapshot's, after
    is not settled yet. ``table`` is the table's revisions that name a plugin.
    """
    expected = [r for r in table if history.base < r <= upto]
    got = [r for r in history.revisions if r <= upto]
    issues = list(history.problems)
    if history.resets:
        issues.append(
            f"fresh snapshots mid-stream at revisions {short(history.resets)} "
            "(a resync reached the watchers instead of the changes)"
        )
    backwards = [(a, b) for a, b in itertools.pairwise(got) if b <= a]
    if backwards:
        issues.append(f"not strictly increasing at {short(backwards, 5)}")
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        first = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        issues.append(
            f"{len(got)} change messages after its snapshot at {history.base} (up to {upto}) "
            f"but the changes table has {len(expected)}; they part at position {first} "
            f"(stream {short(got[first : first + 5], 5)}, table "
            f"{short(expected[first : first + 5], 5)}); missing {short(missing)}; "
            f"not in the table {short(extra)}"
        )
    return f"Watch on {history.address}: " + "; ".join(issues) if issues else ""


class WatchStream:
    """A Watch from revision 0 on one replica, read in the background; keeps every message."""

    def __init__(self, client: RegistryClient, address: str) -> None:
        self.client = client
        self.address = address
        self.messages: list[pb.WatchResponse] = []
        self.error = ""
        self.ended = False
        self._call: Any = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, within: float = DEADLINE) -> None:
        """Start reading and wait for the first message.

        Raises:
            AssertionError: the stream ended or stayed silent first.
        """
        self._task = asyncio.create_task(self._read(), name=f"watch {self.address}")
        await until(
            lambda: self.messages or self.ended,
            within=within,
            what=f"the first Watch message from {self.address}",
            interval=0.01,
        )
        if not self.messages:
            raise AssertionError(f"Watch on {self.address} ended before a snapshot: {self.error}")

    async def _read(self) -> None:
        self._call = self.client.stub.Watch(pb.WatchRequest(since_revision=0))
        try:
            async for message in self._call:
                self.messages.append(message)
        except grpc.aio.AioRpcError as exc:
            self.error = rpc_error(exc)
        finally:
            self.ended = True

    @property
    def seen(self) -> int:
        """The highest revision any message carried (progress messages too)."""
        return max((m.revision for m in self.messages), default=0)

    def history(self) -> History:
        return history_of(self.address, list(self.messages))

    async def wait_seen(self, revision: int, within: float = DEADLINE) -> None:
        """Wait until a message at ``revision`` or later came.

        Raises:
            AssertionError: the stream ended or ``within`` passed first.
        """
        await until(
            lambda: self.seen >= revision or self.ended,
            within=within,
            what=lambda: f"Watch on {self.address} to reach {revision} (at {self.seen})",
            interval=0.02,
        )
        if self.seen < revision:
            raise AssertionError(
                f"Watch on {self.address} ended at revision {self.seen} before {revision}: "
                f"{self.error or 'closed by the server'}"
            )

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def check_streams(
    cluster: Cluster, streams: Sequence[WatchStream], head: int, *, within: float = DEADLINE
) -> list[Change]:
    """Wait until each stream reached ``head``; assert it matches the ``changes`` table.

    Returns the table. Raises AssertionError naming every stream that diverged.
    """
    for stream in streams:
        await stream.wait_seen(head, within=within)
    table = await cluster.changes()
    carrying = [c.revision for c in table if c.carries_plugins]
    problems = [p for s in streams if (p := divergence(s.history(), carrying, head))]
    silent = [c.revision for c in table if not c.carries_plugins]
    note = f" (rows naming no plugin, left out: {short(silent)})" if silent else ""
    assert not problems, "\n".join(problems) + note
    return table


# -- writes -------------------------------------------------------------------------------


async def register_retrying(
    cluster: Cluster,
    targets: Callable[[], Sequence[str]] | Sequence[str],
    request: pb.RegisterRequest,
    *,
    within: float = DEADLINE,
) -> pb.RegisterResponse:
    """Register through each target in turn until one accepts; retries UNAVAILABLE.

    Raises:
        AssertionError: another error code, or no success within ``within``.
    """
    errors: list[str] = []

    async def attempt() -> pb.RegisterResponse | None:
        addresses = targets() if callable(targets) else targets
        for address in addresses:
            try:
                response: pb.RegisterResponse = await cluster.client(address).stub.Register(
                    request, timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise AssertionError(
                        f"Register of {request.info.name} through {address}: {rpc_error(exc)} "
                        "(want success, or UNAVAILABLE while no leader is known)"
                    ) from exc
                errors.append(f"{address}: {rpc_error(exc)}")
                continue
            if response.accepted:
                return response
            errors.append(f"{address}: not accepted: {response.message}")
        return None

    def seen() -> str:
        return f"Register of {request.info.name} to be accepted; last answers {errors[-4:]}"

    response: pb.RegisterResponse = await until(attempt, within=within, what=seen, interval=0.1)
    return response


@dataclass
class Churn:
    """What a burst of Register/Unregister calls got acknowledged."""

    acknowledged: dict[str, str] = field(default_factory=dict)  # plugin_id -> name
    unregistered: set[str] = field(default_factory=set)  # removals acknowledged
    unsure: set[str] = field(default_factory=set)  # removals that failed: either state is fine
    errors: list[str] = field(default_factory=list)
    codes: set[str] = field(default_factory=set)
    calls: int = 0

    @property
    def kept(self) -> set[str]:
        """Acknowledged registrations the test never asked to remove."""
        return set(self.acknowledged) - self.unregistered - self.unsure


async def churn(
    cluster: Cluster,
    targets: Sequence[str],
    *,
    prefix: str,
    registers: int,
    unregister: Callable[[int], bool],
    concurrency: int = 32,
    halfway: asyncio.Event | None = None,
    port_base: int = 20000,
) -> Churn:
    """``registers`` Registers spread round-robin over ``targets``; each one ``unregister``
    picks is then removed through the next target. At most ``concurrency`` in flight.

    Every call is made once; failures are recorded, not retried. ``halfway`` is set once
    half of the registrations have been acknowledged.
    """
    result = Churn()
    gate = asyncio.Semaphore(concurrency)

    async def call(method: str, address: str, request: Any) -> Any:
        async with gate:
            result.calls += 1
            return await getattr(cluster.client(address).stub, method)(request, timeout=30)

    async def one(i: int) -> None:
        name = f"{prefix}-{i}"
        address = targets[i % len(targets)]
        try:
            response = await call("Register", address, register_request(name, port_base + i))
        except grpc.aio.AioRpcError as exc:
            result.codes.add(exc.code().name)
            result.errors.append(f"Register {name} via {address}: {rpc_error(exc)}")
            return
        if not response.accepted or not response.plugin_id:
            result.codes.add("NOT_ACCEPTED")
            result.errors.append(f"Register {name} via {address}: not accepted: {response}")
            return
        result.acknowledged[response.plugin_id] = name
        if halfway is not None and len(result.acknowledged) >= registers // 2:
            halfway.set()
        if not unregister(i):
            return
        other = targets[(i + 1) % len(targets)]
        try:
            await call("Unregister", other, pb.UnregisterRequest(plugin_id=response.plugin_id))
        except grpc.aio.AioRpcError as exc:
            result.codes.add(exc.code().name)
            result.errors.append(f"Unregister {name} via {other}: {rpc_error(exc)}")
            result.unsure.add(response.plugin_id)
            return
        result.unregistered.add(response.plugin_id)

    await asyncio.gather(*(one(i) for i in range(registers)))
    return result


class Heartbeats:
    """Heartbeats plugin ids about every ``every`` seconds through whichever live replica
    answers, until stopped. ``refused`` collects every heartbeat answered not acknowledged;
    ``rounds`` counts the rounds done (every id heartbeated once).
    """

    def __init__(self, cluster: Cluster, ids: Iterable[str], every: float = 1.0) -> None:
        self.cluster = cluster
        self.ids = list(ids)
        self.every = every
        self.refused: list[tuple[str, str]] = []  # (plugin_id, replica)
        self.acknowledged = 0
        self.errors: list[str] = []
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._turn = 0

    def start(self) -> Heartbeats:
        self._task = asyncio.create_task(self._run(), name="heartbeats")
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._beat(i) for i in self.ids))
            self.rounds += 1
            await asyncio.sleep(self.every)  # a rate, not a synchronisation

    async def wait_rounds(self, more: int) -> None:
        """Wait until ``more`` further rounds are done.

        Raises:
            AssertionError: not within a deadline that allows three times the rate.
        """
        target = self.rounds + more
        await until(
            lambda: self.rounds >= target,
            within=DEADLINE + 3 * more * self.every,
            what=lambda: (
                f"{more} more heartbeat rounds (at {self.rounds}, want {target}); "
                f"last errors {self.errors[-3:]}"
            ),
        )

    async def _beat(self, plugin_id: str) -> None:
        live = self.cluster.live()
        self._turn += 1
        for k in range(len(live)):
            address = live[(self._turn + k) % len(live)]
            try:
                response = await self.cluster.client(address).stub.Heartbeat(
                    pb.HeartbeatRequest(plugin_id=plugin_id), timeout=2
                )
            except grpc.aio.AioRpcError as exc:
                self.errors.append(f"{address}: {rpc_error(exc)}")
                continue
            if response.acknowledged:
                self.acknowledged += 1
            else:
                self.refused.append((plugin_id, address))
            return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- low level ----------------------------------------------------------------------------


def blocking_register(
    address: str, request: pb.RegisterRequest, timeout: float
) -> tuple[pb.RegisterResponse | None, str]:
    """One Register on a channel of its own, blocking (run it in a thread).

    Returns the response, or None and the status code's name.
    """
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PluginRegistryStub(channel)
        try:
            return stub.Register(request, timeout=timeout), ""
        except grpc.RpcError as exc:
            return None, f"{exc.code().name}: {exc.details()}"


def _tcp_table() -> list[list[str]]:
    rows: list[list[str]] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                rows += [line.split() for line in table.read().splitlines()[1:]]
        except OSError:
            continue
    return rows


def local_ports(pid: int) -> set[int]:
    """Local ports of the TCP sockets process ``pid`` holds (Linux /proc; empty elsewhere)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return {int(f[1].rpartition(":")[2], 16) for f in _tcp_table() if f[9] in inodes}


def queued_connections(port: int) -> dict[str, int]:
    """Established TCP connections to local ``port``: peer -> bytes received, unread.

    From /proc/net/tcp (Linux); empty where it cannot be read. A stopped process's
    listening socket still completes handshakes, so bytes sent to it wait here.
    """
    found: dict[str, int] = {}
    for fields in _tcp_table():
        local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
        if state == "01" and int(local.rpartition(":")[2], 16) == port:
            found[remote] = int(queues.partition(":")[2], 16)
    return found


async def wait_queued(port: int, before: Iterable[str], within: float = 10.0) -> bool:
    """Whether a new connection to ``port`` (not in ``before``) got bytes queued in time.

    Best effort, never fails: without /proc it returns False once ``within`` passed.
    """
    known = set(before)
    try:
        await until(
            lambda: any(q > 0 for peer, q in queued_connections(port).items() if peer not in known),
            within=within,
            interval=0.02,
        )
    except AssertionError:
        return False
    return True
