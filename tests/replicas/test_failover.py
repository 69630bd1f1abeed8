"""SPEC §8 "Fail-over": the leader dies, stops or leaves, and the registry goes on.

- SIGKILL under load: nothing acknowledged is lost, writes are accepted again, watchers
  on the survivors miss nothing, and no lease expires because of it.
- SIGSTOP past its lease, then SIGCONT: the old leader commits nothing (every row of
  its epoch comes before every row of the new one), steps down and follows.
- SIGTERM: another replica leads and writes work.

No timing is asserted (the fail-over time is a benchmark); deadlines only bound failures.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from registry.wire import pb

from .cluster import LEADER_LEASE, Change, describe_status
from .common import DEADLINE, short, until
from .conftest import MakeCluster
from .load import Heartbeats, blocking_register, churn, register_request, register_retrying
from .sockets import queued_connections, wait_queued
from .streams import check_streams

pytestmark = pytest.mark.postgres

REGISTERS = 300
# Short enough that, if heartbeats answered around the fail-over never counted or the
# new leader gave no grace, these would expire while the test runs (it heartbeats on for
# two leases after the take-over); long enough to outlast a fail-over (leader lease 2 s).
BEATING_LEASE = 5
BEATING = 5
BEAT_EVERY = 0.5


def removed(i: int) -> bool:
    return i % 3 != 0


def fenced(table: list[Change], old: int, new: int) -> str:
    """Why the rows of epoch ``old`` are not all before those of ``new`` ("" when they are)."""
    problems = []
    of_old = [c.revision for c in table if c.epoch == old]
    of_new = [c.revision for c in table if c.epoch == new]
    if of_old and of_new and max(of_old) > min(of_new):
        late = [r for r in of_old if r > min(of_new)]
        problems.append(
            f"rows of the old epoch {old} after the first row of the new epoch {new} "
            f"(revision {min(of_new)}): {short(late)}"
        )
    backwards = [
        (a.revision, a.epoch, b.revision, b.epoch)
        for a, b in itertools.pairwise(table)
        if b.epoch < a.epoch
    ]
    if backwards:
        problems.append(
            f"epoch goes down between rows (rev, epoch, rev, epoch): {short(backwards)}"
        )
    return "; ".join(problems)


async def test_leader_sigkill_under_load_loses_nothing(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    leader, epoch = await cluster.agreed_leader()
    followers = [a for a in cluster.addresses if a != leader]
    streams = {a: await cluster.watch(a) for a in cluster.addresses}

    beating = []
    for n in range(BEATING):
        response = await register_retrying(
            cluster,
            [followers[n % 2]],
            register_request(f"beating-{n}", 22000 + n, lease=BEATING_LEASE),
        )
        beating.append(response.plugin_id)
    heartbeats = Heartbeats(cluster, beating, every=BEAT_EVERY).start()

    halfway = asyncio.Event()
    load = asyncio.create_task(
        churn(
            cluster,
            cluster.addresses,
            prefix="load",
            registers=REGISTERS,
            unregister=removed,
            halfway=halfway,
        )
    )
    await until(lambda: halfway.is_set() or load.done(), what="half of the registrations")
    await asyncio.to_thread(cluster.replica(leader).kill)
    result = await load

    # Writes are accepted again, through either survivor.
    after = await register_retrying(cluster, followers, register_request("after-kill", 22100))
    new_leader, new_epoch = await cluster.agreed_leader(followers, after_epoch=epoch)
    agreed = await cluster.wait_agreed(followers)
    await check_streams(cluster, [streams[a] for a in followers], agreed.head)
    # Two leases more of heartbeats through the survivors: a lease that the fail-over
    # broke (renewals lost on the way to the leader, no grace) would lapse meanwhile.
    await heartbeats.wait_rounds(round(2 * BEATING_LEASE / BEAT_EVERY))
    await heartbeats.stop()
    settled = await cluster.wait_agreed(followers)

    assert result.acknowledged, f"nothing was acknowledged: {result.errors[:5]}"
    assert result.codes <= {"UNAVAILABLE"}, (
        "writes failed otherwise than UNAVAILABLE: "
        f"{[e for e in result.errors if 'UNAVAILABLE' not in e][:5]}"
    )
    listed = set(agreed.listing.plugins)
    lost = sorted(result.kept - listed)
    assert not lost, (
        f"{len(lost)} acknowledged registrations are not listed after the fail-over "
        f"(leader {leader} epoch {epoch} -> {new_leader} epoch {new_epoch}): {short(lost)}"
    )
    back = sorted(result.unregistered & listed)
    assert not back, f"acknowledged removals listed again: {short(back)}"
    assert after.plugin_id in listed
    assert set(beating) <= listed
    assert not heartbeats.refused, (
        f"heartbeats not acknowledged (lease lost) during the fail-over: {heartbeats.refused[:5]}"
    )
    assert heartbeats.acknowledged >= len(beating), "the heartbeats never got through"
    statuses = {i: settled.listing.plugins[i].status for i in beating}
    assert "PLUGIN_STATUS_EXPIRED" not in statuses.values(), (
        f"heartbeated plugins (lease {BEATING_LEASE} s) after the fail-over: {statuses}"
    )
    expired = {a: s.history().expired for a, s in streams.items() if s.history().expired}
    assert not expired, f"EXPIRED pushed to watchers during the fail-over: {expired}"


async def test_leader_stopped_past_its_lease_commits_nothing_and_follows(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster()
    old, old_epoch = await cluster.agreed_leader()
    followers = [a for a in cluster.addresses if a != old]
    streams = {a: await cluster.watch(a) for a in cluster.addresses}
    before = await register_retrying(cluster, [old], register_request("before-stop", 23000))
    # Never heartbeated: its lease lapses while the leader is stopped, so the resumed
    # leader's reaper has a write to try (it must be fenced), and the new one's to make.
    lapsing = await register_retrying(
        cluster, [old], register_request("lapsing", 23003, lease=LEADER_LEASE)
    )

    stopped = cluster.replica(old)
    await asyncio.to_thread(stopped.pause)
    new, new_epoch = await cluster.agreed_leader(followers, after_epoch=old_epoch)
    assert new != old
    during = await register_retrying(cluster, [new], register_request("during-stop", 23001))

    # A Register sent to the stopped leader waits in its socket, for when it resumes.
    port = int(old.rpartition(":")[2])
    known = set(queued_connections(port))
    queued = asyncio.create_task(
        asyncio.to_thread(blocking_register, old, register_request("queued", 23002), DEADLINE)
    )
    await wait_queued(port, known)
    await asyncio.to_thread(stopped.resume)
    response, error = await queued

    last: list[pb.RegistryStatus | str | None] = [None]

    async def stepped_down() -> bool:
        last[0] = status = await cluster.status(old)
        if isinstance(status, str):
            return False
        head = await cluster.head()
        own = [r for r in status.replicas if r.address == old]
        return (
            status.role == pb.REPLICA_ROLE_FOLLOWER
            and status.epoch == new_epoch
            and status.leader == new
            and bool(own)
            and own[0].applied_revision == head
        )

    await until(
        stepped_down,
        what=lambda: (
            f"{old} to follow {new} at epoch {new_epoch}, applied up to the head; "
            f"it says {describe_status(last[0]) if last[0] is not None else 'nothing'}"
        ),
    )

    async def lapsed() -> bool:
        listing = await cluster.listing(new)
        entry = None if isinstance(listing, str) else listing.plugins.get(lapsing.plugin_id)
        return entry is not None and entry.status == "PLUGIN_STATUS_EXPIRED"

    await until(lapsed, what=f"the new leader {new} to expire the unrenewed lease")
    agreed = await cluster.wait_agreed()
    table = await check_streams(cluster, list(streams.values()), agreed.head)

    problem = fenced(table, old_epoch, new_epoch)
    assert not problem, f"the resumed leader {old} committed under its old epoch: {problem}"
    rows = {c.revision: c for c in table}
    by_id = {i: c for c in table for i in c.upserted}
    assert by_id[before.plugin_id].epoch == old_epoch
    assert by_id[during.plugin_id].epoch == new_epoch
    if response is None:
        assert error.startswith("UNAVAILABLE"), (
            f"the Register queued at the stopped leader failed with {error}, "
            "not UNAVAILABLE nor success by forwarding"
        )
    else:
        assert response.accepted, response
        row = by_id.get(response.plugin_id)
        assert row is not None, f"the queued Register was acknowledged but is in no row: {response}"
        assert row.epoch == new_epoch, (
            f"the queued Register committed at revision {row.revision} under epoch {row.epoch}, "
            f"not the new leader's {new_epoch} (rows: {short(sorted(rows))})"
        )
        assert response.plugin_id in agreed.listing.plugins
    assert {before.plugin_id, during.plugin_id} <= set(agreed.listing.plugins)


async def test_graceful_stop_of_the_leader_hands_over(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    leader, epoch = await cluster.agreed_leader()
    followers = [a for a in cluster.addresses if a != leader]
    before = await register_retrying(cluster, followers[:1], register_request("before-term", 24000))

    code = await asyncio.to_thread(cluster.replica(leader).terminate)
    assert code == 0, f"the leader exited {code} on SIGTERM:\n{cluster.replica(leader).tail()}"

    new_leader, new_epoch = await cluster.agreed_leader(followers, after_epoch=epoch)
    assert new_leader in followers
    written = [
        await register_retrying(cluster, [a], register_request(f"after-term-{n}", 24001 + n))
        for n, a in enumerate(followers)
    ]
    agreed = await cluster.wait_agreed(followers)
    wanted = {before.plugin_id, *(r.plugin_id for r in written)}
    assert wanted <= set(agreed.listing.plugins), (
        f"missing after the hand-over to {new_leader} (epoch {new_epoch}): "
        f"{sorted(wanted - set(agreed.listing.plugins))}"
    )
