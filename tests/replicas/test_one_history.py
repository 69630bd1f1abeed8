"""SPEC §8 "One history": three replicas on one PostgreSQL are one registry.

A registration made on any replica is listed by all; under 500 concurrent writes spread
over the three, a Watch on each replica streams the same revisions as the ``changes``
table holds, in order, and every catalogue ends the same.
"""

from __future__ import annotations

import pytest

from .cluster import Listing, describe_listings
from .common import DEADLINE, until
from .conftest import MakeCluster
from .load import churn, register_request
from .streams import check_streams

pytestmark = pytest.mark.postgres

REGISTERS = 300
# Two of every three are removed again: 300 Registers + 200 Unregisters = 500 writes.
UNREGISTERED = 200


def removed(i: int) -> bool:
    return i % 3 != 0


async def test_a_registration_on_any_replica_is_listed_by_all(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    await cluster.leader()  # writes answer UNAVAILABLE until one is known
    ids = {}
    for n, address in enumerate(cluster.addresses):
        response = await cluster.client(address).stub.Register(
            register_request(f"on-replica-{n}", 21000 + n), timeout=DEADLINE
        )
        assert response.accepted, f"Register through {address}: {response}"
        ids[response.plugin_id] = address

    last: dict[str, Listing | str] = {}

    async def everywhere() -> bool:
        last.update({a: await cluster.listing(a) for a in cluster.addresses})
        return all(isinstance(x, Listing) and set(ids) <= set(x.plugins) for x in last.values())

    await until(
        everywhere,
        what=lambda: (
            f"the plugins registered through each replica ({ids}) listed by every "
            f"replica:\n{describe_listings(last)}"
        ),
    )
    agreed = await cluster.wait_agreed()
    assert set(agreed.listing.plugins) == set(ids)


async def test_concurrent_writes_stream_the_same_history_from_every_replica(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster()
    await cluster.leader()
    streams = [await cluster.watch(a) for a in cluster.addresses]

    load = await churn(
        cluster, cluster.addresses, prefix="load", registers=REGISTERS, unregister=removed
    )
    assert load.calls == REGISTERS + UNREGISTERED
    assert not load.errors, f"{len(load.errors)} writes failed: {load.errors[:10]}"
    assert len(load.acknowledged) == REGISTERS
    assert len(load.unregistered) == UNREGISTERED

    agreed = await cluster.wait_agreed()
    table = await check_streams(cluster, streams, agreed.head)

    # Every write is one revision, on top of whatever the snapshot held.
    carrying = [c for c in table if c.carries_plugins and c.revision > streams[0].history().base]
    assert len(carrying) == REGISTERS + UNREGISTERED, (
        f"{len(carrying)} changes after the snapshot for {REGISTERS + UNREGISTERED} writes"
    )
    histories = [s.history() for s in streams]
    base = max(h.base for h in histories)
    sequences = {h.address: [r for r in h.revisions if r > base] for h in histories}
    assert len({tuple(s) for s in sequences.values()}) == 1, {
        a: f"{len(s)} revisions, first {s[:3]}, last {s[-3:]}" for a, s in sequences.items()
    }
    kept = load.kept
    assert set(agreed.listing.plugins) == kept, (
        f"listed but removed: {sorted(set(agreed.listing.plugins) - kept)[:5]}, "
        f"kept but not listed: {sorted(kept - set(agreed.listing.plugins))[:5]}"
    )
    names = {i: e.name for i, e in agreed.listing.plugins.items()}
    assert names == {i: load.acknowledged[i] for i in kept}
