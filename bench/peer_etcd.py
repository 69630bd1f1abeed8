"""The registry against etcd 3.4, side by side, through the same Python ``grpc.aio`` client.

    python -m bench.run --peer etcd [--quick]      # or: python -m bench.peer_etcd [--quick]

etcd (Debian ``etcd-server``: ``apt-get install -y etcd-server``) runs as a single member
on loopback ports of its own in a temporary data directory, driven by stubs generated
from its own protos (``bench/etcd``). Our registry runs as ``python -m registry serve`` on
SQLite in the same temporary folder; registrations point at one live plugin process
(``python -m registry.testing``) that answers ``Health``. The client runs here.

The fair figure is **server CPU per operation**: utime + stime of the server process
(``/proc/PID/stat``, all threads) over the measured window, divided by the operations in
it; the Python client caps both systems' throughput. The two systems alternate per
repetition (ours, etcd, ours, etcd, ...) so that both see the same shared machine.

Rows (ours, etcd, ratio ours/etcd): lease renewals (``KeepAlive`` stream, or unary
``Heartbeat`` while the registry answers ``KeepAlive`` with UNIMPLEMENTED, labelled so, vs
``LeaseKeepAlive``); resolve (``Resolve`` vs ``Range`` of a prefix of 3 keys); propagation
with 1 and 100 watchers (``Register`` answered → a watcher has it, vs ``Put`` answered →
watch event); expiry (TTL 3 s → a watcher sees it gone, vs lease expiry → watch DELETE);
registrations (``Register`` with its first health check vs ``LeaseGrant`` + ``Put``); then
10,000 of them. How each is measured: ``bench.peer_etcd_calls`` (renewals, resolve,
registrations), ``bench.peer_etcd_watch`` (propagation, expiry), ``bench.peer_etcd_big``
(10,000). Each part's duration goes to stderr. Prints figures, never verdicts.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.etcd import MISSING, Etcd, etcd_binary
from bench.peer_etcd_big import big
from bench.peer_etcd_calls import (
    DEADLINE,
    FULL,
    OPTIONS,
    QUICK,
    Plan,
    Side,
    plugin_process,
    registrations,
    registry_process,
    renewals,
    resolve,
)
from bench.peer_etcd_watch import PROP_PREFIX, EtcdWatch, OurWatch, expiry, propagation


class Phases:
    """Says on stderr how long each part took (stdout is the table)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        print(f"#   {name}: {now - self.last:.1f} s", file=sys.stderr)
        self.last = now


async def small(plan: Plan, folder: Path, plugin: str, phases: Phases) -> list[dict[str, Any]]:
    """Everything but the 10,000: one registry (health interval 1 h: first checks only)
    and one etcd, both fresh."""
    ours = registry_process(f"sqlite:///{folder}/small.db", "--health-interval", "1h")
    etcd = Etcd(folder / "etcd-small")
    rows: list[dict[str, Any]] = []
    try:
        our_address, _ = await asyncio.gather(
            asyncio.to_thread(ours.wait_ready), asyncio.to_thread(etcd.start)
        )
        phases.done("start")
        async with (
            grpc.aio.insecure_channel(our_address, options=OPTIONS) as our_channel,
            grpc.aio.insecure_channel(etcd.address, options=OPTIONS) as etcd_channel,
        ):
            mine = Side(ours.proc.pid, our_address, our_channel)
            theirs = Side(etcd.pid, etcd.address, etcd_channel)
            rows += await renewals(plan, mine, theirs, plugin)
            phases.done("renewals")
            rows += await resolve(plan, mine, theirs)
            phases.done("resolve")
            watches = OurWatch(our_channel), EtcdWatch(etcd_channel, PROP_PREFIX)
            try:
                for watch in watches:
                    await asyncio.wait_for(watch.ready.wait(), DEADLINE)
                for watchers in (1, 100):
                    rows += await propagation(plan, mine, theirs, plugin, watches, watchers)
                    phases.done(f"propagation, {watchers} watcher(s)")
                rows += await expiry(plan, mine, theirs, plugin, watches)
                phases.done("expiry")
            finally:
                for watch in watches:
                    await watch.close()
            rows += await registrations(plan, mine, theirs, plugin)
            phases.done("registrations")
    finally:
        ours.stop()
        etcd.stop()
    return rows


async def main(plan: Plan) -> list[dict[str, Any]]:
    phases = Phases()
    with tempfile.TemporaryDirectory(prefix="peer-etcd-") as tmp:
        folder = Path(tmp)
        plugin = plugin_process()
        try:
            address = await asyncio.to_thread(plugin.wait_ready)
            rows = await small(plan, folder, address, phases)
            rows += await big(plan, folder, address)
            phases.done(f"{plan.big:,}")
        finally:
            plugin.stop()
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for bench.run (``--peer etcd``); exits with a one-line hint without etcd."""
    if etcd_binary() is None:
        raise SystemExit(MISSING)
    return asyncio.run(main(QUICK if quick else FULL))


if __name__ == "__main__":
    from bench.run import print_table

    print_table(run(quick="--quick" in sys.argv))
