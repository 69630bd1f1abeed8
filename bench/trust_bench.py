"""Authentication and TLS on against off (SPEC §5 on §6): the registry's ratio to raw, both ways.

Four servers run side by side as subprocesses, all on 127.0.0.1: the raw no-op servicer
in plain text and over TLS (bench/raw_server.py), and the registry in open mode in plain
text and secured: an auth policy with one principal (scopes register and read, names
``*``), its bearer token on every call, TLS (trustme writes a CA and a certificate for
127.0.0.1/localhost into a temporary folder). Each registry has its own SQLite
database, durable, as in bench/registry_bench.py.

For each of Heartbeat, Resolve and Register, at 64 in flight (and 1, for information),
the four are measured one after the other, in rounds whose order alternates so that
drift on a shared machine falls on all of them alike. A rate is the median over rounds.
Rows: ours/raw in plain text, ours/raw secured (TLS on both sides of the baseline), and
the row of the target: the secured ratio over the plain one (≥ 0.85). Server CPU per
call (from /proc, all four servers) says where a difference comes from when the
throughput figures are noisy.

The secured registry runs with ``--register-rate 0`` and
``--max-instances-per-principal 0``: the row measures what authentication and TLS cost,
not the per-principal throttle (20 Registers/s by default) or bound (1,000 live
instances), which a flood of one principal would otherwise hit at once.

The client is this process, with the generated stubs as in bench/registry_bench.py; the
secured calls carry ``authorization: Bearer <token>`` metadata as RegistryClient does.
Prints numbers, never verdicts.

    python -m bench.trust_bench [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trustme

from bench.common import Load, Process, closed_loop, python, row
from registry.testing import FakePlugin
from registry.trust.policy import new_token, token_sha256
from registry.trust.tls import TlsFiles, channel_credentials
from registry.wire import pb, pb_grpc

HERE = Path(__file__).resolve().parent
SCENARIOS = ("Heartbeat", "Resolve", "Register")
CONCURRENCIES = (1, 64)
TARGET = "≥ 0.85"
PRINCIPAL = "bench"
# Off for the measured principal: the row is about cost, not throttling (module docstring).
UNTHROTTLED = ("--register-rate", "0", "--max-instances-per-principal", "0")
HEARTBEAT_IDS = 64
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Pki:
    """A CA and the servers' certificate for 127.0.0.1 and localhost, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def _pki(folder: Path) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    ca.cert_pem.write_to_path(str(pki.ca))
    pki.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pki.key))
    return pki


def _policy(folder: Path, token: str) -> Path:
    """The policy file: one principal that may register any name and read."""
    path = folder / "policy.toml"
    path.write_text(
        "[[principals]]\n"
        f'name = "{PRINCIPAL}"\n'
        f'token_sha256 = "{token_sha256(token)}"\n'
        'scopes = ["register", "read"]\n'
        'names = ["*"]\n'
    )
    return path


@dataclass
class Side:
    """One of the four servers, the client's channel to it, and what it measured."""

    label: str
    process: Process
    ours: bool
    metadata: tuple[tuple[str, str], ...] | None = None
    credentials: grpc.ChannelCredentials | None = None
    stub: Any = None
    loads: dict[tuple[str, int], list[Load]] = field(default_factory=dict)
    cpu: dict[tuple[str, int], float] = field(default_factory=dict)  # seconds, all rounds

    def cpu_seconds(self) -> float:
        """The server's user + system CPU so far, from /proc (all its threads)."""
        with open(f"/proc/{self.process.proc.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rate(self, key: tuple[str, int]) -> float:
        return statistics.median(load.rate for load in self.loads[key])

    def cpu_per_call_us(self, key: tuple[str, int]) -> float:
        calls = sum(load.calls for load in self.loads[key])
        return self.cpu[key] / calls * 1e6 if calls else 0.0

    def latencies(self, key: tuple[str, int]) -> Load:
        """Every round's latencies as one load, for percentiles."""
        loads = self.loads[key]
        merged = [latency for load in loads for latency in load.latencies]
        return Load(sum(load.calls for load in loads), sum(load.seconds for load in loads), merged)


def _registry(db: str, *extra: str) -> Process:
    args = [python(), "-m", "registry", "serve", "--listen", "127.0.0.1:0", "--db", db]
    return Process([*args, "--health-interval", "1h", "--deregister-after", "0", *extra])


def _raw(*extra: str) -> Process:
    return Process([python(), str(HERE / "raw_server.py"), *extra])


@contextlib.contextmanager
def _sides(folder: Path, pki: Pki, token: str) -> Iterator[list[Side]]:
    """Start the four servers (in parallel: each start costs an interpreter's imports)."""
    tls = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    policy = ("--auth-policy", str(_policy(folder, token)))
    credentials = channel_credentials(TlsFiles(ca=pki.ca))
    started: list[Side] = []
    try:
        started.append(Side("raw plain", _raw(), ours=False))
        started.append(Side("ours plain", _registry(f"sqlite:///{folder}/plain.db"), ours=True))
        started.append(Side("raw TLS", _raw(*tls), ours=False, credentials=credentials))
        secured = _registry(f"sqlite:///{folder}/secured.db", *tls, *policy, *UNTHROTTLED)
        bearer = (("authorization", f"Bearer {token}"),)
        started.append(
            Side("ours secured", secured, ours=True, metadata=bearer, credentials=credentials)
        )
        for side in started:
            side.process.wait_ready()
        yield started
    finally:
        for side in started:
            side.process.stop()


@contextlib.asynccontextmanager
async def _channels(sides: list[Side]) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for side in sides:
            address = side.process.address
            if side.credentials is None:
                channel = grpc.aio.insecure_channel(address)
            else:
                channel = grpc.aio.secure_channel(address, side.credentials)
            await stack.enter_async_context(channel)
            side.stub = pb_grpc.PluginRegistryStub(channel)
        yield


def _info(i: int | str, run: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=f"b{run}-{i}", version="1.0.0", type=1, sources=[f"s{run}-{i}"])  # type: ignore[arg-type]


async def _prepare(side: Side, plugin: FakePlugin) -> None:
    """Register the plugin Resolve finds and wait until it is HEALTHY (raw: one call)."""
    stub, metadata = side.stub, side.metadata
    if not side.ours:
        await stub.Resolve(pb.ResolveRequest(source="bench"))  # the channel is up
        return
    registration = pb.RegisterRequest(info=plugin.info(), address=plugin.address, no_lease=True)
    await stub.Register(registration, metadata=metadata)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = await stub.Resolve(pb.ResolveRequest(source="bench"), metadata=metadata)
        if found.endpoints:
            return
        await asyncio.sleep(0.01)  # polling a condition with a deadline
    raise RuntimeError(f"{side.label}: the bench plugin never became HEALTHY")


async def _call(
    side: Side, scenario: str, plugin: FakePlugin
) -> Callable[[int], Awaitable[object]]:
    """The call one scenario makes, with the setup it needs done (not timed)."""
    stub, metadata, run = side.stub, side.metadata, uuid.uuid4().hex[:6]
    if scenario == "Heartbeat":

        async def lease(i: int) -> str:
            request = pb.RegisterRequest(info=_info(i, run + "h"), address=plugin.address)
            return str((await stub.Register(request, metadata=metadata)).plugin_id)

        ids = await asyncio.gather(*(lease(i) for i in range(HEARTBEAT_IDS)))
        requests = [pb.HeartbeatRequest(plugin_id=plugin_id) for plugin_id in ids]
        return lambda i: stub.Heartbeat(requests[i % len(requests)], metadata=metadata)
    if scenario == "Resolve":
        request = pb.ResolveRequest(source=plugin.sources[0])
        return lambda i: stub.Resolve(request, metadata=metadata)
    if scenario == "Register":
        address = plugin.address
        return lambda i: stub.Register(
            pb.RegisterRequest(info=_info(i, run), address=address, no_lease=True),
            metadata=metadata,
        )
    raise ValueError(scenario)


async def _measure(
    sides: list[Side], plugin: FakePlugin, *, rounds: int, seconds: float, settle: float
) -> None:
    for number in range(rounds):
        order = sides if number % 2 == 0 else sides[::-1]
        for scenario in SCENARIOS:
            for concurrency in CONCURRENCIES:
                key = (scenario, concurrency)
                for side in order:
                    call = await _call(side, scenario, plugin)
                    # The setup's registrations and the last run's are health-checked
                    # in the background; a pause keeps most of that out of this window.
                    await asyncio.sleep(settle)
                    before = side.cpu_seconds()
                    load = await closed_loop(call, concurrency=concurrency, seconds=seconds)
                    side.cpu[key] = side.cpu.get(key, 0.0) + side.cpu_seconds() - before
                    side.loads.setdefault(key, []).append(load)


def _rows(sides: list[Side]) -> list[dict[str, Any]]:
    raw, ours, raw_tls, secured = sides
    rows: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        for concurrency in CONCURRENCIES:
            key = (scenario, concurrency)
            name = f"{scenario} c={concurrency}"
            unthrottled = " (register-rate off)" if scenario == "Register" else ""
            plain = _ratio_row(f"{name} plain: ours/raw", ours, raw, key)
            guarded = _ratio_row(
                f"{name} auth+TLS{unthrottled}: ours/raw TLS", secured, raw_tls, key
            )
            quotient = row(
                f"{name} auth+TLS ratio ÷ plain ratio",
                guarded["ratio"],
                plain["ratio"],
                TARGET if concurrency == 64 else "-",
                unit="ratio",
            )
            # row() rounds to 0.1, which would flatten two ratios below 1.
            quotient["ours"], quotient["baseline"] = guarded["ratio"], plain["ratio"]
            rows += [plain, guarded, quotient]
        key = (scenario, 64)
        rows.append(
            row(
                f"{scenario} c=64 server CPU/call: ours auth+TLS vs ours plain",
                secured.cpu_per_call_us(key),
                ours.cpu_per_call_us(key),
                "-",
                unit="µs",
                raw_tls_cpu_us=round(raw_tls.cpu_per_call_us(key), 1),
                raw_plain_cpu_us=round(raw.cpu_per_call_us(key), 1),
            )
        )
    return rows


def _ratio_row(scenario: str, mine: Side, base: Side, key: tuple[str, int]) -> dict[str, Any]:
    """Rate of ``mine`` against ``base``, with latencies and server CPU per call of both."""
    ours, raw = mine.latencies(key), base.latencies(key)
    return row(
        scenario,
        mine.rate(key),
        base.rate(key),
        "-",
        p50_ms=round(ours.percentile(0.5) * 1000, 2),
        p99_ms=round(ours.percentile(0.99) * 1000, 2),
        raw_p50_ms=round(raw.percentile(0.5) * 1000, 2),
        raw_p99_ms=round(raw.percentile(0.99) * 1000, 2),
        cpu_us=round(mine.cpu_per_call_us(key), 1),
        raw_cpu_us=round(base.cpu_per_call_us(key), 1),
    )


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Heartbeat, Resolve and Register with auth and TLS on and off; rows for bench/run.py."""
    rounds, seconds, settle = (1, 0.5, 0.05) if quick else (3, 3.0, 0.3)
    print(
        "# bench.trust_bench: the secured registry runs with "
        + " ".join(UNTHROTTLED)
        + ": the rows measure the cost of auth and TLS, not throttling",
        file=sys.stderr,
    )

    async def main(folder: Path) -> list[Side]:
        # The servers stop before the plugin does: their first health checks of the last
        # registrations must not be cut off in the plugin's hands.
        async with FakePlugin(name="bench", sources=["bench"]) as plugin:
            with _sides(folder, _pki(folder), new_token()) as sides:
                async with _channels(sides):
                    for side in sides:
                        await _prepare(side, plugin)
                    await _measure(sides, plugin, rounds=rounds, seconds=seconds, settle=settle)
        return sides

    with tempfile.TemporaryDirectory() as name:
        return _rows(asyncio.run(main(Path(name))))


if __name__ == "__main__":
    from bench.run import print_table

    print_table(run(quick="--quick" in sys.argv))
