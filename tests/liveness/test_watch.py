"""Watch: snapshot then deltas, resuming (across restarts too), filters, fan-out, slow readers.

Plugins registered at ``127.0.0.1:9`` (nothing listens there) with a 60 s health
interval fail one check and stay UNKNOWN, so each Register or Unregister is
exactly one revision and the expected revisions can be counted.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Iterable

import pytest

from registry import PluginStatus, RegistryClient, RegistryError
from registry.model import Change
from registry.testing import FakePlugin, running_registry
from registry.wire import pb

from .conftest import (
    WatchRecorder,
    current_revision,
    eventually,
    is_progress,
    plugin_info,
    recording,
    stalled_watcher,
    wait_status,
)

NOWHERE = "127.0.0.1:9"
QUIET = {"health_interval": 60}


async def register(
    client: RegistryClient,
    name: str,
    sources: Iterable[str] = (),
    *,
    address: str = NOWHERE,
    description: str = "",
    labels: dict[str, str] | None = None,
) -> str:
    """Register an operator-style (no lease) plugin; its id."""
    info = plugin_info(name, sources, description=description)
    response = await client.register(info, address, labels=labels, no_lease=True)
    return response.plugin_id


def upserted_ids(message: pb.WatchResponse) -> list[str]:
    return [p.plugin_id for p in message.upserted]


async def read_until(recorder: WatchRecorder, revision: int) -> list[pb.WatchResponse]:
    """Every change message up to ``revision``; checks they came in order, once each."""
    await recorder.wait_revision(revision)
    deltas = recorder.deltas
    revisions = [m.revision for m in deltas]
    assert revisions == sorted(set(revisions)), f"out of order or repeated: {revisions}"
    return deltas


async def test_snapshot_then_one_delta_per_change(tmp_path):
    async with (
        running_registry(tmp_path, **QUIET) as registry,
        RegistryClient(registry.address) as client,
    ):
        first = await register(client, "first")
        second = await register(client, "second")
        async with recording(client) as watch:
            snapshot = watch.messages[0]
            assert snapshot.snapshot
            assert snapshot.revision == 2
            assert sorted(upserted_ids(snapshot)) == sorted([first, second])

            third = await register(client, "third")
            await client.unregister(first)
            await client.unregister(first)  # idempotent: no change, no message
            deltas = await read_until(watch, 4)

        assert [(m.revision, upserted_ids(m), list(m.removed_plugin_ids)) for m in deltas] == [
            (3, [third], []),
            (4, [], [first]),
        ]
        assert PluginStatus(deltas[0].upserted[0].status) is PluginStatus.UNKNOWN
        assert deltas[0].upserted[0].revision == 3
        assert not any(m.snapshot for m in deltas)


async def test_reconnecting_watcher_gets_exactly_the_changes_it_missed(tmp_path):
    async with (
        running_registry(tmp_path, **QUIET) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
        recording(client) as steady,
    ):
        ids = [await register(client, f"p{i}") for i in range(3)]
        async with recording(client) as leaving:
            ids.append(await register(client, "healthy", address=plugin.address))
            await wait_status(client, ids[-1], PluginStatus.HEALTHY)
            left_at = (await read_until(leaving, await current_revision(client)))[-1].revision

        # Missed: registrations (HEALTHY at once: the first check folded in), removals.
        ids.append(await register(client, "another", address=plugin.address))
        await wait_status(client, ids[-1], PluginStatus.HEALTHY)
        await client.unregister(ids[0])
        await client.unregister(ids[3])
        ids.append(await register(client, "last"))
        final = await current_revision(client)

        async with recording(client, since_revision=left_at) as back:
            resumed = await read_until(back, final)
            assert not any(m.snapshot for m in back.messages)
        missed = [m for m in await read_until(steady, final) if m.revision > left_at]
        assert resumed == missed
        # A registration, 2 removals, a registration: none of them a second message.
        assert len(missed) == 4


async def test_resume_works_across_a_registry_restart(tmp_path):
    """The change log is persisted: a new registry on the same file serves the resume."""
    async with (
        running_registry(tmp_path, **QUIET) as registry,
        RegistryClient(registry.address) as client,
        recording(client) as steady,
    ):
        ids = [await register(client, f"p{i}") for i in range(4)]
        left_at = await current_revision(client)
        await client.unregister(ids[1])
        ids.append(await register(client, "late", sources=["late", "other"]))
        await client.unregister(ids[0])
        final = await current_revision(client)
        missed = [m for m in await read_until(steady, final) if m.revision > left_at]
    assert len(missed) == 3

    async with (
        running_registry(tmp_path, **QUIET) as registry,
        RegistryClient(registry.address) as client,
        recording(client, since_revision=left_at) as back,
    ):
        assert await read_until(back, final) == missed
        newest = await register(client, "after-restart")
        deltas = await read_until(back, final + 1)
        assert [upserted_ids(m) for m in deltas[len(missed) :]] == [[newest]]
        assert not any(m.snapshot for m in back.messages)


async def test_resume_from_a_snapshot_taken_while_a_commit_was_in_flight(tmp_path, monkeypatch):
    """A restart must not hand a revision a resuming watcher has seen to another change.

    The database is made slow (its next write waits until the registry stops) so that
    a snapshot is taken while a Register is applied but not yet committed, as happens
    for a few milliseconds on every Register.
    """
    async with (
        running_registry(tmp_path, **QUIET) as registry,
        RegistryClient(registry.address) as client,
    ):
        first = await register(client, "first")
        store = registry.state.store
        never = asyncio.Event()
        real_write = store.write

        async def slow_write(batch):
            await never.wait()  # a disk that hangs; cancelled when the registry stops
            await real_write(batch)

        monkeypatch.setattr(store, "write", slow_write)
        unanswered = asyncio.create_task(register(client, "second"))

        async def applied() -> bool:
            return len(registry.state.catalog) == 2

        await eventually(applied, what="the second registration in the catalog")
        async with recording(client) as watch:
            seen = watch.messages[0]
        assert seen.snapshot
        await registry.stop(grace=0)
        with pytest.raises(RegistryError):
            await unanswered  # never acknowledged: losing it is allowed

    async with (
        running_registry(tmp_path, **QUIET, watch_progress_interval=0.2) as registry,
        RegistryClient(registry.address) as client,
    ):
        third = await register(client, "third")
        async with recording(client, since_revision=seen.revision) as back:
            await back.wait_for(lambda ms: ms and is_progress(ms[-1]), what="an idle stream")
        # Its cache must end as the registry is: a snapshot, or deltas to get there.
        cache = {p.plugin_id for p in seen.upserted}
        for message in back.messages:
            if message.snapshot:
                cache = set()
            cache -= set(message.removed_plugin_ids)
            cache |= set(upserted_ids(message))
        assert cache == {first, third}


async def test_revision_older_than_the_retained_log_gets_a_snapshot(tmp_path):
    settings = {**QUIET, "change_log_size": 5}
    async with (
        running_registry(tmp_path, **settings) as registry,
        RegistryClient(registry.address) as client,
    ):
        ids = [await register(client, f"p{i}") for i in range(12)]
        for plugin_id in ids[:8]:
            await client.unregister(plugin_id)
        latest = await current_revision(client)
        assert latest == 20
    for restarted in (False, True):  # the log is trimmed on disk as well
        async with (
            running_registry(tmp_path, **settings) as registry,
            RegistryClient(registry.address) as client,
        ):
            async with recording(client, since_revision=latest - 5) as kept:
                deltas = await read_until(kept, latest)
                assert [m.revision for m in deltas] == list(range(latest - 4, latest + 1))
                assert not any(m.snapshot for m in kept.messages)
            async with recording(client, since_revision=latest - 6) as too_old:
                await too_old.wait_for(bool, what="the snapshot")
                first = too_old.messages[0]
                assert first.snapshot, f"restarted={restarted}"
                assert first.revision == latest
                assert sorted(upserted_ids(first)) == sorted(ids[8:])


async def test_sources_filter_shows_only_matching_plugins_and_their_removals(tmp_path):
    async with (
        running_registry(tmp_path, **QUIET) as registry,
        RegistryClient(registry.address) as client,
    ):
        alpha = await register(client, "a1", sources=["alpha"])
        beta = await register(client, "b1", sources=["beta"])
        async with recording(client, sources=["alpha"]) as watch:
            assert upserted_ids(watch.messages[0]) == [alpha]
            # Another instance of a1, declaring a source of its own as well.
            both = await register(client, "a1", ["delta", "alpha"], address="127.0.0.1:10")
            await register(client, "g1", sources=["gamma"])
            await client.unregister(beta)
            await client.unregister(alpha)
            end = await register(client, "a1", sources=["alpha"], address="127.0.0.1:11")
            deltas = await read_until(watch, await current_revision(client))

        assert [(upserted_ids(m), list(m.removed_plugin_ids)) for m in deltas] == [
            ([both], []),
            ([], [alpha]),
            ([end], []),
        ]


async def test_resumed_filtered_watch_shows_only_matching_removals(tmp_path):
    async with (
        running_registry(tmp_path, **QUIET) as registry,
        RegistryClient(registry.address) as client,
    ):
        alpha = await register(client, "a1", sources=["alpha"])
        beta = await register(client, "b1", sources=["beta"])
        left_at = await current_revision(client)
        await client.unregister(beta)
        await client.unregister(alpha)
        async with recording(client, since_revision=left_at, sources=["alpha"]) as back:
            deltas = await read_until(back, left_at + 2)
        assert [list(m.removed_plugin_ids) for m in deltas] == [[alpha]]


async def test_a_hundred_watchers_see_the_same_revisions(tmp_path):
    async with (
        running_registry(tmp_path, health_interval=60) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        watchers = [WatchRecorder(client) for _ in range(100)]
        try:
            for watcher in watchers:
                await watcher.wait_for(bool, what="the snapshot")
            start = await current_revision(client)
            assert {w.messages[0].revision for w in watchers} == {start}

            async def churn(i: int) -> None:
                # Healthy plugins add status changes made by the health checker.
                address = plugin.address if i % 2 else NOWHERE
                plugin_id = await register(client, f"p{i}", address=address)
                if i % 2:
                    await wait_status(client, plugin_id, PluginStatus.HEALTHY)
                if i % 3 == 0:
                    await client.unregister(plugin_id)

            await asyncio.gather(*(churn(i) for i in range(12)))
            final = await current_revision(client)
            seen = [[m.revision for m in await read_until(w, final)] for w in watchers]
        finally:
            for watcher in watchers:
                await watcher.close()

        assert seen[0] == list(range(start + 1, final + 1))
        assert all(revisions == seen[0] for revisions in seen)
        assert all(w.deltas == watchers[0].deltas for w in watchers)


async def test_idle_stream_gets_progress_messages_at_the_current_revision(tmp_path):
    async with (
        running_registry(tmp_path, **QUIET, watch_progress_interval=0.2) as registry,
        RegistryClient(registry.address) as client,
    ):
        await register(client, "one")
        async with recording(client) as watch:
            messages = await watch.wait_for(lambda ms: len(ms) >= 3, what="progress messages")
            assert messages[0].snapshot
            assert all(is_progress(m) and m.revision == 1 for m in messages[1:3])

            plugin_id = await register(client, "two")
            await watch.wait_for(
                lambda ms: is_progress(ms[-1]) and ms[-1].revision == 2, what="progress at 2"
            )
        kinds = [
            ("progress" if is_progress(m) else upserted_ids(m), m.revision) for m in watch.messages
        ]
        change = kinds.index(([plugin_id], 2))
        assert all(kind == "progress" and revision == 1 for kind, revision in kinds[1:change])
        assert all(kind == "progress" and revision == 2 for kind, revision in kinds[change + 1 :])


LABELS = {f"label-{i}": "v" * 256 for i in range(32)}  # 8 KiB, the most allowed


def live(kind: type) -> int:
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


async def test_stalled_watcher_keeps_memory_bounded_then_gets_a_snapshot(tmp_path):
    """A watcher that stops reading costs at most watch_max_backlog changes of memory.

    The watcher is a process stopped with SIGSTOP right after its snapshot: its
    socket fills, the stream's sends block, and the hub must stop queueing. Then
    1,000 register+unregister pairs, each Register change ~9 KiB (a 1 KiB
    description, 8 KiB of labels): ~9 MB, more than the socket buffers hold.

    Measured in process, at half of the changes and at all of them:
    (1) the hub's backlog of every watcher, sampled after each write, never exceeds
    watch_max_backlog; (2) the live ``Change`` objects (what any queue would hold)
    stay within retained log + backlog and do not grow from half to all; (3) the
    interpreter's allocated blocks do not grow from half to all beyond noise, where
    500 queued changes would add ~50 blocks each. tracemalloc would count bytes but
    made this churn three times slower; RSS is printed for the record only (malloc
    keeps freed pages). Then the watcher is continued: what the sockets held, a
    snapshot of the present, and live deltas again.
    """
    settings = {**QUIET, "watch_max_backlog": 16, "change_log_size": 64}
    pairs = 1000
    async with (
        running_registry(tmp_path, **settings) as registry,
        RegistryClient(registry.address) as client,
    ):
        keep = await register(client, "kept")
        hub = registry._hub
        assert hub is not None
        async with stalled_watcher(registry.address) as watcher:
            deepest, overflowed = 0, False

            async def churn(start: int, stop: int) -> None:
                names = iter(range(start, stop))

                async def worker() -> None:
                    nonlocal deepest, overflowed
                    for i in names:
                        plugin_id = await register(
                            client, f"churn-{i}", description="d" * 1024, labels=LABELS
                        )
                        await client.unregister(plugin_id)
                        for w in hub._watchers:
                            deepest = max(deepest, len(w.backlog))
                            overflowed = overflowed or w.needs_snapshot

                await asyncio.gather(*(worker() for _ in range(16)))

            base = sys.getallocatedblocks()
            changes, blocks, rss = [], [], []
            for start in (0, pairs // 2):
                await churn(start, start + pairs // 2)
                changes.append(live(Change))
                blocks.append(sys.getallocatedblocks() - base)
                rss.append(resident_mb())
            print(f"live changes {changes}, allocated blocks {blocks}, RSS MB {rss}")

            assert deepest <= 16
            assert all(count <= 64 + 16 + 16 for count in changes), changes
            assert blocks[1] - blocks[0] < 5_000, blocks
            assert overflowed, "the stopped watcher never fell behind"

            latest = await current_revision(client)
            watcher.resume()
            buffered = []
            while not (message := await watcher.next_message())["snapshot"]:
                buffered.append(message["revision"])
            print(f"{len(buffered)} messages were in the sockets before the snapshot")
            assert buffered == sorted(set(buffered))
            assert len(buffered) < 2 * pairs
            assert message["revision"] == latest
            assert message["upserted"] == [keep]

            newest = await register(client, "newest")
            live_delta = await watcher.next_message()
            assert live_delta == {
                "revision": latest + 1,
                "snapshot": False,
                "upserted": [newest],
                "removed": [],
            }


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
