"""Keyset paging over the catalog's sorted indexes (SPEC §7 "Cost grows with work").

Paging through n plugins visits each once, in id order, while plugins come and go
between pages, and costs O(n) in total: the id comparisons it makes are counted
with ids that count their own comparisons, and stay at O(log n) per page (a sort,
or a scan from the start, per page would cost O(n) comparisons per page).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import islice

import pytest

from registry import RegistryClient, sortedids
from registry import catalog as catalog_module
from registry.catalog import Catalog
from registry.model import PluginStatus, PluginType, Registration
from registry.sortedids import SortedIds
from registry.testing import FakePlugin, running_registry
from registry.ulid import new_ulid
from registry.wire import pb

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
N = 20_000
PAGE = 100


def ingestor(name: str, source: str = "", address: str = "h:1") -> Registration:
    return Registration(
        name=name, type=PluginType.INGESTOR, address=address, sources=(source or name,)
    )


def pages(catalog: Catalog, size: int, **filters: object) -> Iterator[list[str]]:
    """Page ids as ListPlugins does: each page starts after the last id of the one before."""
    after = ""
    while True:
        page = [p.plugin_id for p in islice(catalog.select(after=after, **filters), size)]  # type: ignore[arg-type]
        if not page:
            return
        yield page
        after = page[-1]


# -- SortedIds ------------------------------------------------------------------


def test_sorted_ids_match_a_sorted_set_through_splits_and_merges(monkeypatch):
    monkeypatch.setattr(sortedids, "_CHUNK", 4)  # chunks split and merge often
    rng = random.Random(7)
    ids = SortedIds()
    reference: set[str] = set()
    for step in range(4000):
        key = f"{rng.randrange(600):04d}"
        if rng.random() < 0.55:
            ids.add(key)
            reference.add(key)
        else:
            ids.discard(key)
            reference.discard(key)
        if step % 97 == 0:
            assert list(ids) == sorted(reference)
            assert len(ids) == len(reference)
            probe = f"{rng.randrange(600):04d}"
            assert list(ids.after(probe)) == [k for k in sorted(reference) if k > probe]
            assert (probe in ids) == (probe in reference)
    assert list(ids) == sorted(reference)


def test_a_walk_in_progress_survives_changes_between_ids(monkeypatch):
    monkeypatch.setattr(sortedids, "_CHUNK", 4)
    rng = random.Random(11)
    ids = SortedIds(f"{i:04d}" for i in range(0, 1000, 2))
    throughout = set(ids)
    walked = []
    for key in ids.after(""):
        walked.append(key)
        # Add and remove around the walk's position, on both sides of it.
        for _ in range(3):
            new = f"{rng.randrange(1000):04d}"
            if new not in throughout:
                ids.add(new)
        victim = f"{rng.randrange(1000):04d}"
        if victim in ids and victim not in throughout:
            ids.discard(victim)
    assert walked == sorted(set(walked))  # in order, never twice
    assert throughout <= set(walked)  # nothing that stayed was skipped


# -- paging the catalog ---------------------------------------------------------


def test_paging_visits_every_id_once_in_order_while_plugins_come_and_go():
    rng = random.Random(3)
    catalog = Catalog()
    for i in range(N):
        catalog.register(ingestor(f"p{i}"), T0)
    initial = [p.plugin_id for p in catalog]
    last_initial = max(initial)
    removed_ahead: set[str] = set()  # removed before the walk reached them
    removed_behind: set[str] = set()
    added_ahead: set[str] = set()  # registered after the walk's position
    added: set[str] = set()
    visited: list[str] = []
    serial = N
    for page in pages(catalog, PAGE):
        visited.extend(page)
        if page[-1] > last_initial:
            continue  # past the initial plugins: let the walk end
        seen = set(visited)
        # Between two pages: registrations (new ids: mostly after the walk, but
        # ULIDs of one millisecond are in random order) and removals both behind
        # the walk and ahead of it.
        for _ in range(3):
            plugin_id = catalog.register(ingestor(f"p{serial}"), T0).plugin.plugin_id
            added.add(plugin_id)
            if plugin_id > page[-1]:
                added_ahead.add(plugin_id)
            serial += 1
        for victim in rng.sample(initial, 2):
            if catalog.get(victim) is not None:
                (removed_behind if victim in seen else removed_ahead).add(victim)
                catalog.remove([victim])
    assert visited == sorted(visited)
    assert len(visited) == len(set(visited))  # none twice
    stayed = set(initial) - removed_ahead - removed_behind
    assert stayed <= set(visited)  # none skipped that existed throughout
    assert added_ahead <= set(visited)  # nor any that came ahead of the walk
    assert not removed_ahead & set(visited)  # a removal ahead of the walk is not visited
    assert removed_behind <= set(visited)
    assert set(visited) <= set(initial) | added
    assert removed_ahead
    assert removed_behind
    assert len(added_ahead) > len(added) // 2


def test_paging_by_source_walks_that_source_only_in_order():
    catalog = Catalog()
    shared = []
    for i in range(3000):
        if i % 3 == 0:
            registration = ingestor("shared-owner", "shared", address=f"h:{i}")
            shared.append(catalog.register(registration, T0).plugin.plugin_id)
        else:
            catalog.register(ingestor(f"p{i}"), T0)
    walked = [plugin_id for page in pages(catalog, 70, source="shared") for plugin_id in page]
    assert walked == sorted(shared)
    healthy = shared[::5]
    for plugin_id in healthy:
        plugin = catalog.get(plugin_id)
        assert plugin is not None
        catalog.update([dataclasses.replace(plugin, status=PluginStatus.HEALTHY)], T0)
    statuses = frozenset({PluginStatus.HEALTHY})
    filtered = [
        plugin_id
        for page in pages(catalog, 7, source="shared", statuses=statuses)
        for plugin_id in page
    ]
    assert filtered == sorted(healthy)


# -- what paging costs -----------------------------------------------------------


class Comparisons:
    count = 0


class CountingId(str):
    """A plugin id that counts every comparison made with it."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        Comparisons.count += 1
        return str.__lt__(self, other)  # type: ignore[operator]

    def __le__(self, other: object) -> bool:
        Comparisons.count += 1
        return str.__le__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        Comparisons.count += 1
        return str.__gt__(self, other)  # type: ignore[operator]

    def __ge__(self, other: object) -> bool:
        Comparisons.count += 1
        return str.__ge__(self, other)  # type: ignore[operator]

    def __eq__(self, other: object) -> bool:
        Comparisons.count += 1
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        Comparisons.count += 1
        return str.__ne__(self, other)

    __hash__ = str.__hash__


@pytest.mark.parametrize("filters", [{}, {"source": "shared"}, {"type": PluginType.INGESTOR}])
def test_paging_through_n_plugins_costs_o_log_n_comparisons_per_page(monkeypatch, filters):
    monkeypatch.setattr(catalog_module, "new_ulid", lambda: CountingId(new_ulid()))
    catalog = Catalog()
    for i in range(N):
        # Every plugin takes the shared source too: the source's index holds all n.
        registration = Registration(
            name="many", type=PluginType.INGESTOR, address=f"h:{i}", sources=("shared",)
        )
        catalog.register(registration, T0)
    Comparisons.count = 0
    count = 0
    page_count = 0
    for page in pages(catalog, PAGE, **filters):
        count += len(page)
        page_count += 1
    assert count == N
    assert page_count == N // PAGE
    # Finding each page's start is a bisection over chunk maxima, then within one
    # chunk: about 2 log2(n) comparisons, whatever page it is. A sort per page, or
    # skipping ids up to the token, would make it O(n) per page, 200x as many here.
    bound = (page_count + 1) * 4 * N.bit_length()
    assert Comparisons.count <= bound, (Comparisons.count, bound)


# -- paging over the wire ----------------------------------------------------------


async def test_list_plugins_pages_follow_ids_while_plugins_come_and_go(tmp_path):
    """The same through ListPlugins' page tokens, with registrations and removals
    over the wire between pages."""
    count, size = 400, 25
    async with (
        running_registry(tmp_path, health_interval=3600, deregister_after=0) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        registered = await asyncio.gather(
            *(client.register(_info(f"w{i}"), plugin.address, no_lease=True) for i in range(count))
        )
        initial = [response.plugin_id for response in registered]
        rng = random.Random(5)
        removed: set[str] = set()
        visited: list[str] = []
        request = pb.ListPluginsRequest(page_size=size)
        serial = count
        while True:
            response = await client.stub.ListPlugins(request)
            assert len(response.plugins) <= size
            visited.extend(p.plugin_id for p in response.plugins)
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
            await client.register(_info(f"w{serial}"), plugin.address, no_lease=True)
            serial += 1
            victim = rng.choice(initial)
            removed.add(victim)
            await client.unregister(victim)
        assert visited == sorted(visited)
        assert len(visited) == len(set(visited))
        assert set(initial) - removed <= set(visited)


def _info(name: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[name])
