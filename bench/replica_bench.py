"""Replicas on one PostgreSQL database (SPEC §5 "replicas", §8), measured from outside.

Three ``serve`` subprocesses on a database of their own (``polku_bench_<hex>``, created
beside the one in POLKU_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test,
and dropped WITH (FORCE) after), leader lease 2 s. In one run, on the same cluster:

1. leader SIGKILL → writes accepted again: one client Registers through a follower, one
   call at a time (0.5 s deadline, retried at once on any error); the leader is killed
   and the time from the kill to the first accepted Register *sent after it* is taken.
   Baseline: the leader lease. Full: 3 rounds (the killed replica restarted on its old
   address and all three agreeing on a leader in between); ours is the worst round,
   the median and every round in extra fields. Quick: 1 round.
2. Register through a follower vs the leader: 64 in flight for 10 s each (2 s quick).
3. Watch propagation through a follower vs the leader: a Watch (since_revision=0) on
   each; 200 Registers (30 quick), one at a time through the leader; Register answered
   → the upsert seen on each stream (an event that came before the answer counts 0).

Without a reachable PostgreSQL every row says skipped (ours 0, a note). Prints numbers,
never verdicts.

    python -m bench.replica_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty
from sqlalchemy.engine import make_url

from bench.common import Load, Process, closed_loop, python, row
from registry.wire import pb, pb_grpc

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
LEADER_LEASE = 2.0  # seconds, full and quick alike
ATTEMPT_DEADLINE = 0.5  # one Register of the fail-over client
DEADLINE = 30.0  # for any one wait: a broken run, not a measurement
CONCURRENCY = 64
# Nothing listens on port 9: one refused first check, then none for an hour, and a
# threshold never reached, so the only revisions are the benchmark's own.
QUIET = ("--health-interval", "1h", "--unhealthy-threshold", "1000", "--deregister-after", "0")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
SCENARIOS = (
    "replicas: leader SIGKILL → writes accepted again",
    "replicas: Register through a follower vs the leader",
    "replicas: Watch propagation p99 through a follower vs the leader",
)


def _request(name: str) -> pb.RegisterRequest:
    info = pb.PluginInfo(name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[name])
    return pb.RegisterRequest(info=info, address="127.0.0.1:9", no_lease=True)


def _ms(load: Load, q: float) -> float:
    return round(load.percentile(q) * 1000, 2)


# -- the cluster --------------------------------------------------------------------------


class _Replica(Process):
    """A registry subprocess that keeps its last lines, to say why it did not start."""

    def __init__(self, args: list[str]) -> None:
        self.tail: deque[str] = deque(maxlen=20)
        super().__init__(args)

    def _drain(self) -> None:
        assert self._stream is not None
        for line in self._stream:
            self.tail.append(line.rstrip())
            match = self._pattern.search(line)
            if match and not self._found.is_set():
                self.address = match.group(1)
                self.ready_at = time.perf_counter()
                self._found.set()
        self._found.set()  # it exited: wait_ready need not wait for the timeout

    def wait_ready(self, timeout: float = DEADLINE) -> str:
        """Its address once it serves.

        Raises:
            RuntimeError: it exited first or stayed silent for ``timeout`` (stopped then);
                the message ends with its last lines.
        """
        if not self._found.wait(timeout) or not self.address:
            self.stop()
            raise RuntimeError(f"a replica exited {self.proc.poll()} unready: {self.last()}")
        return self.address

    def last(self) -> str:
        return " | ".join(self.tail)


class Cluster:
    """Three replicas (subprocesses) and one channel to each; :meth:`stop` ends them all."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.token = secrets.token_hex(16)
        self.replicas: list[_Replica] = []
        self.every: list[_Replica] = []  # restarted ones too, for stop()
        self.channels: dict[str, grpc.aio.Channel] = {}

    def _spawn(self, listen: str) -> _Replica:
        args = [python(), "-m", "registry", "serve", "--listen", listen, "--db", self.url]
        lease = ["--leader-lease", f"{LEADER_LEASE:g}", "--cluster-token", self.token]
        replica = _Replica([*args, *lease, *QUIET, "--max-plugins", "500000"])
        self.every.append(replica)
        return replica

    async def start(self, n: int = 3) -> None:
        """Start ``n`` replicas at once; returns when each printed ``serving on``.

        Raises:
            RuntimeError: one exited or stayed silent (with its last lines).
        """
        self.replicas = [self._spawn("127.0.0.1:0") for _ in range(n)]
        await asyncio.gather(*(asyncio.to_thread(r.wait_ready) for r in self.replicas))

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def stub(self, address: str) -> Any:
        channel = self.channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self.channels[address] = channel
        return pb_grpc.PluginRegistryStub(channel)

    async def _status(self, address: str) -> Any:
        try:
            return await self.stub(address).GetStatus(Empty(), timeout=2)
        except grpc.aio.AioRpcError:
            return None

    async def agreed(self, *, after_epoch: int = 0) -> tuple[str, int]:
        """The (leader, epoch) that every replica reports, each in its own role.

        Raises:
            RuntimeError: no agreement within DEADLINE.
        """
        deadline = time.monotonic() + DEADLINE
        names = self.addresses
        while time.monotonic() < deadline:
            answers = await asyncio.gather(*(self._status(a) for a in names))
            if all(s is not None for s in answers):
                leaders = {s.leader for s in answers}
                epochs = {s.epoch for s in answers}
                if len(leaders) == 1 and len(epochs) == 1:
                    leader, epoch = leaders.pop(), epochs.pop()
                    roles = all(
                        s.role
                        == (pb.REPLICA_ROLE_LEADER if a == leader else pb.REPLICA_ROLE_FOLLOWER)
                        for a, s in zip(names, answers, strict=True)
                    )
                    if leader in names and epoch > after_epoch and roles:
                        return leader, epoch
            await asyncio.sleep(0.05)  # polling a condition with a deadline
        raise RuntimeError(f"the replicas {names} agreed on no leader")

    def kill(self, address: str) -> None:
        """SIGKILL one replica and reap it."""
        process = self.replicas[self.addresses.index(address)].proc
        process.kill()
        process.wait()

    async def restart(self, address: str) -> None:
        """A new replica on the address of a dead one, or on a new port when another
        process took that one meanwhile; returns once it serves.

        Raises:
            RuntimeError: it did not start (with its last lines).
        """
        index = self.addresses.index(address)
        channel = self.channels.pop(address, None)
        if channel is not None:
            await channel.close()
        self.replicas[index] = self._spawn(address)
        try:
            await asyncio.to_thread(self.replicas[index].wait_ready)
        except RuntimeError:
            if "cannot listen" not in self.replicas[index].last():
                raise
            self.replicas[index] = self._spawn("127.0.0.1:0")
            await asyncio.to_thread(self.replicas[index].wait_ready)

    async def stop(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()
        await asyncio.gather(*(asyncio.to_thread(r.stop) for r in self.every))


# -- 1. fail-over -------------------------------------------------------------------------


async def _failover(cluster: Cluster, round_: int, codes: Counter[str]) -> tuple[float, int]:
    """Seconds from the leader's SIGKILL to the first Register accepted (sent after it)
    through a follower; also the new epoch.

    Raises:
        RuntimeError: no Register accepted before or after the kill within DEADLINE.
    """
    leader, epoch = await cluster.agreed()
    follower = next(a for a in cluster.addresses if a != leader)
    stub = cluster.stub(follower)
    killed_at = 0.0
    warm = asyncio.Event()
    accepted_before = 0

    async def client() -> float:
        nonlocal accepted_before
        for i in range(10**9):
            started = time.perf_counter()
            if killed_at and started - killed_at > DEADLINE:
                break
            try:
                response = await stub.Register(
                    _request(f"fo{round_}-{i}"), timeout=ATTEMPT_DEADLINE
                )
            except grpc.aio.AioRpcError as exc:
                if killed_at:
                    codes[exc.code().name] += 1
                continue  # retried at once, as a client would
            if not response.accepted:
                raise RuntimeError(f"Register refused: {response.message}")
            if killed_at and started >= killed_at:
                return time.perf_counter() - killed_at
            accepted_before += 1
            if accepted_before >= 5:
                warm.set()
        raise RuntimeError("no Register accepted after the leader's SIGKILL")

    task = asyncio.create_task(client())
    warming = asyncio.create_task(warm.wait())
    try:
        await asyncio.wait({task, warming}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            await task  # raises what went wrong
        if not warm.is_set():
            raise RuntimeError(f"no Register accepted through {follower} before the kill")
        killed_at = time.perf_counter()
        cluster.kill(leader)
        seconds = await task
    finally:
        for pending in (task, warming):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await pending
    await cluster.restart(leader)
    _, new_epoch = await cluster.agreed(after_epoch=epoch)
    return seconds, new_epoch


async def _failovers(cluster: Cluster, rounds: int) -> dict[str, Any]:
    times: list[float] = []
    codes: Counter[str] = Counter()
    for round_ in range(rounds):
        seconds, _ = await _failover(cluster, round_, codes)
        times.append(seconds)
    return row(
        SCENARIOS[0],
        max(times),
        LEADER_LEASE,
        "≤ lease + 1 s",
        unit="s",
        worst_s=round(max(times), 3),
        median_s=round(statistics.median(times), 3),
        rounds_s=[round(t, 3) for t in times],
        errors_after_kill=dict(codes),
    )


# -- 2. Register throughput ---------------------------------------------------------------


async def _throughput(cluster: Cluster, seconds: float) -> dict[str, Any]:
    leader, _ = await cluster.agreed()
    follower = next(a for a in cluster.addresses if a != leader)
    loads: dict[str, Load] = {}
    for label, address in (("follower", follower), ("leader", leader)):
        loads[label] = await closed_loop(
            _registering(cluster.stub(address), f"tp-{label}"),
            concurrency=CONCURRENCY,
            seconds=seconds,
        )
    mine, base = loads["follower"], loads["leader"]
    return row(
        SCENARIOS[1] + f", {CONCURRENCY} in flight",
        mine.rate,
        base.rate,
        "—",
        p50_ms=_ms(mine, 0.5),
        p99_ms=_ms(mine, 0.99),
        leader_p50_ms=_ms(base, 0.5),
        leader_p99_ms=_ms(base, 0.99),
    )


def _registering(stub: Any, prefix: str) -> Callable[[int], Awaitable[None]]:
    """A closed-loop call: Register plugin ``prefix-i`` through ``stub``."""

    async def call(i: int) -> None:
        response = await stub.Register(_request(f"{prefix}-{i}"), timeout=DEADLINE)
        if not response.accepted:
            raise RuntimeError(f"Register refused: {response.message}")

    return call


# -- 3. Watch propagation -----------------------------------------------------------------


class _Seen:
    """A Watch from revision 0, read in the background: when each plugin id first came."""

    def __init__(self, stub: Any) -> None:
        self.at: dict[str, float] = {}
        self.first = asyncio.Event()
        self.error = ""
        self._call = stub.Watch(pb.WatchRequest(since_revision=0))
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self._call:
                now = time.perf_counter()
                for plugin in message.upserted:
                    self.at.setdefault(plugin.plugin_id, now)
                self.first.set()
        except grpc.aio.AioRpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.first.set()

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _propagation(cluster: Cluster, count: int) -> dict[str, Any]:
    leader, _ = await cluster.agreed()
    follower = next(a for a in cluster.addresses if a != leader)
    streams = {"follower": _Seen(cluster.stub(follower)), "leader": _Seen(cluster.stub(leader))}
    latencies: dict[str, list[float]] = {label: [] for label in streams}
    early: Counter[str] = Counter()  # events that came before the Register's answer
    try:
        for stream in streams.values():
            await asyncio.wait_for(stream.first.wait(), DEADLINE)  # the snapshot
        stub = cluster.stub(leader)
        for i in range(count):
            response = await stub.Register(_request(f"watch-{i}"), timeout=DEADLINE)
            answered = time.perf_counter()
            plugin_id = response.plugin_id
            deadline = answered + DEADLINE
            while not all(plugin_id in s.at for s in streams.values()):
                broken = [f"{k}: {s.error}" for k, s in streams.items() if s.error]
                if broken or time.perf_counter() > deadline:
                    raise RuntimeError(f"Watch streams missed {plugin_id}: {broken}")
                await asyncio.sleep(0.0005)  # polling a condition with a deadline
            for label, stream in streams.items():
                # The event may come before the answer: counted as 0, and counted.
                lag = stream.at[plugin_id] - answered
                early[label] += int(lag < 0)
                latencies[label].append(max(0.0, lag))
    finally:
        for stream in streams.values():
            await stream.close()
    mine = Load(count, 1.0, latencies["follower"])
    base = Load(count, 1.0, latencies["leader"])
    return row(
        SCENARIOS[2] + f", {count} Registers",
        mine.percentile(0.99) * 1000,
        base.percentile(0.99) * 1000,
        "≤ 2x the leader",
        unit="ms",
        p50_ms=_ms(mine, 0.5),
        p99_ms=_ms(mine, 0.99),
        leader_p50_ms=_ms(base, 0.5),
        leader_p99_ms=_ms(base, 0.99),
        before_answer={"follower": early["follower"], "leader": early["leader"]},
    )


# -- the database -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _database(admin_url: str) -> AsyncIterator[str]:
    """A new empty database beside ``admin_url``'s, dropped WITH (FORCE) after.

    Raises:
        OSError, TimeoutError, asyncpg errors: PostgreSQL is unreachable or refused.
    """
    import asyncpg  # only when PostgreSQL is benchmarked

    name = f"polku_bench_{secrets.token_hex(4)}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(_dsn(admin_url), timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _dsn(url: str) -> str:
    """``url`` as asyncpg reads it (no ``+driver`` in the scheme)."""
    plain = make_url(url).set(drivername="postgresql")
    return plain.render_as_string(hide_password=False)


def _skipped(reason: str) -> list[dict[str, Any]]:
    # The reason in the target column too: print_table shows no note.
    note = f"skipped: {reason}"
    return [row(s, 0, 0, note, unit="", note=note) for s in SCENARIOS]


async def _unreachable(admin_url: str) -> str:
    """Why PostgreSQL cannot be used at ``admin_url``; "" when it can."""
    import asyncpg

    try:
        conn = await asyncpg.connect(_dsn(admin_url), timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"PostgreSQL unreachable ({type(exc).__name__})"
    await conn.close()
    return ""


async def _main(quick: bool) -> list[dict[str, Any]]:
    admin_url = os.environ.get("POLKU_TEST_POSTGRES_URL") or ADMIN_URL
    reason = await _unreachable(admin_url)
    if reason:
        return _skipped(reason)
    async with _database(admin_url) as url:
        return await _measure(url, quick)


async def _measure(url: str, quick: bool) -> list[dict[str, Any]]:
    cluster = Cluster(url)
    try:
        await cluster.start()
        failover = await _failovers(cluster, 1 if quick else 3)
        # Watch before the throughput run: its snapshot stays small.
        watch = await _propagation(cluster, 30 if quick else 200)
        throughput = await _throughput(cluster, 2.0 if quick else 10.0)
    finally:
        await cluster.stop()
    return [failover, throughput, watch]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for bench.run: 1 fail-over round when ``quick``, else 3."""
    return asyncio.run(_main(quick))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one fail-over, shorter runs")
    args = parser.parse_args()
    from bench.run import print_table

    print_table(run(quick=args.quick))


if __name__ == "__main__":
    main()
