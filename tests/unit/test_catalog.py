"""The Catalog's rules, in memory: register, replace, own, heartbeat, remove, select."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from registry.catalog import Catalog
from registry.errors import AlreadyExists
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.ulid import ULID_PATTERN

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)


def ingestor(name: str, *sources: str, address: str = "", ttl: int = 30) -> Registration:
    return Registration(
        name=name,
        type=PluginType.INGESTOR,
        address=address or f"{name}:50051",
        sources=sources or (name,),
        lease_ttl_seconds=ttl,
    )


def emitter(name: str, emitter_name: str = "", *, address: str = "") -> Registration:
    return Registration(
        name=name,
        type=PluginType.EMITTER,
        address=address or f"{name}:50051",
        emitter_name=emitter_name,
        lease_ttl_seconds=30,
    )


def set_status(
    catalog: Catalog, plugin: Plugin, status: PluginStatus, now: datetime = T1
) -> Change:
    change = catalog.update([dataclasses.replace(plugin, status=status)], now)
    assert change is not None
    return change


# -- register -------------------------------------------------------------------


def test_register_adds_an_unknown_instance_in_one_change():
    catalog = Catalog()
    plugin, change, _ = catalog.register(ingestor("a", "k8s"), T0)
    assert ULID_PATTERN.match(plugin.plugin_id)
    assert plugin.status is PluginStatus.UNKNOWN
    assert plugin.registered_at == T0
    assert plugin.status_since == T0
    assert plugin.last_heartbeat_at == T0  # registering counts as the first heartbeat
    assert plugin.revision == 1
    assert change == Change(revision=1, upserted=(plugin,), removed=())
    assert catalog.revision == 1
    assert catalog.get(plugin.plugin_id) == plugin
    assert list(catalog) == [plugin]
    assert len(catalog) == 1


def test_an_instance_without_lease_has_no_heartbeat():
    plugin = Catalog().register(ingestor("a", ttl=0), T0).plugin
    assert plugin.last_heartbeat_at is None


def test_every_register_gets_a_fresh_id():
    catalog = Catalog()
    ids = {catalog.register(ingestor("a", address="h:1"), T0).plugin.plugin_id for _ in range(50)}
    assert len(ids) == 50


def test_same_name_and_address_replaces_in_one_change():
    catalog = Catalog()
    old = catalog.register(ingestor("a", "k8s", address="h:1"), T0).plugin
    new, change, ownership = catalog.register(ingestor("a", "k8s", "extra", address="h:1"), T1)
    assert change == Change(revision=2, upserted=(new,), removed=(old,))
    assert ownership is None  # open mode records no ownership
    assert catalog.revision == 2
    assert catalog.get(old.plugin_id) is None
    assert list(catalog) == [new]
    assert catalog.by_source("k8s") == [new]
    assert catalog.by_source("extra") == [new]


def test_replacement_drops_the_sources_the_new_instance_no_longer_claims():
    catalog = Catalog()
    catalog.register(ingestor("a", "old-source", address="h:1"), T0)
    new = catalog.register(ingestor("a", "new-source", address="h:1"), T1).plugin
    assert catalog.by_source("old-source") == []
    # The dropped source is free for anyone.
    other = catalog.register(ingestor("b", "old-source"), T1).plugin
    assert catalog.by_source("old-source") == [other]
    assert catalog.by_source("new-source") == [new]


def test_same_name_on_another_address_is_a_replica():
    catalog = Catalog()
    first = catalog.register(ingestor("a", "k8s", address="h:1"), T0).plugin
    second, change, _ = catalog.register(ingestor("a", "k8s", address="h:2"), T0)
    assert change.removed == ()
    assert {p.plugin_id for p in catalog.by_source("k8s")} == {first.plugin_id, second.plugin_id}


# -- ownership ------------------------------------------------------------------


def test_a_source_of_a_live_owner_is_refused_and_nothing_changes():
    catalog = Catalog()
    owner = catalog.register(ingestor("owner", "k8s", "syslog"), T0).plugin
    with pytest.raises(AlreadyExists) as caught:
        catalog.register(ingestor("thief", "mine", "syslog"), T1)
    # The owner's name only: never its id or address, which are another party's.
    assert str(caught.value) == (
        "info.sources: source 'syslog' belongs to plugin 'owner', which has a live instance"
    )
    assert catalog.revision == 1
    assert list(catalog) == [owner]
    assert catalog.by_source("mine") == []


@pytest.mark.parametrize("status", [PluginStatus.UNKNOWN, PluginStatus.UNHEALTHY])
def test_an_unhealthy_owner_still_holds_its_sources(status):
    catalog = Catalog()
    owner = catalog.register(ingestor("owner", "k8s"), T0).plugin
    if status is not PluginStatus.UNKNOWN:
        set_status(catalog, owner, status)
    with pytest.raises(AlreadyExists):
        catalog.register(ingestor("thief", "k8s"), T1)


def test_an_expired_owner_gives_its_sources_up():
    catalog = Catalog()
    owner = catalog.register(ingestor("owner", "k8s"), T0).plugin
    set_status(catalog, owner, PluginStatus.EXPIRED)
    thief = catalog.register(ingestor("thief", "k8s"), T1).plugin
    assert {p.plugin_id for p in catalog.by_source("k8s")} == {owner.plugin_id, thief.plugin_id}


def test_a_removed_owner_gives_its_sources_up():
    catalog = Catalog()
    owner = catalog.register(ingestor("owner", "k8s"), T0).plugin
    catalog.remove([owner.plugin_id])
    thief = catalog.register(ingestor("thief", "k8s"), T1).plugin
    assert catalog.by_source("k8s") == [thief]


def test_an_emitter_name_belongs_to_one_plugin_name():
    catalog = Catalog()
    owner = catalog.register(emitter("es-writer", "elastic"), T0).plugin
    with pytest.raises(AlreadyExists) as caught:
        catalog.register(emitter("other", "elastic"), T1)
    assert str(caught.value) == (
        "info.emitter_name: emitter name 'elastic' belongs to plugin 'es-writer', "
        "which has a live instance"
    )
    replica = catalog.register(emitter("es-writer", "elastic", address="h:2"), T1).plugin
    assert [p.plugin_id for p in catalog.by_emitter("elastic")] == sorted(
        [owner.plugin_id, replica.plugin_id]
    )


def test_an_emitter_without_emitter_name_owns_its_plugin_name():
    catalog = Catalog()
    catalog.register(emitter("stdout"), T0)
    with pytest.raises(AlreadyExists):
        catalog.register(emitter("printer", "stdout"), T1)
    assert [p.name for p in catalog.by_emitter("stdout")] == ["stdout"]


def test_sources_and_emitter_names_are_separate():
    catalog = Catalog()
    catalog.register(ingestor("a", "shared-name"), T0)
    plugin = catalog.register(emitter("b", "shared-name"), T0).plugin
    assert catalog.by_emitter("shared-name") == [plugin]
    assert [p.name for p in catalog.by_source("shared-name")] == ["a"]


# -- heartbeat --------------------------------------------------------------------


def test_heartbeat_of_a_live_plugin_renews_without_a_revision():
    catalog = Catalog()
    plugin = catalog.register(ingestor("a"), T0).plugin
    beat = catalog.heartbeat(plugin.plugin_id, T1)
    assert beat is not None
    assert beat.last_heartbeat_at == T1
    assert beat.revision == plugin.revision
    assert catalog.revision == 1
    stored = catalog.get(plugin.plugin_id)
    assert stored is not None
    assert stored.last_heartbeat_at == T1


def test_heartbeat_of_an_expired_plugin_is_refused():
    catalog = Catalog()
    plugin = catalog.register(ingestor("a"), T0).plugin
    set_status(catalog, plugin, PluginStatus.EXPIRED)
    assert catalog.heartbeat(plugin.plugin_id, T1) is None


@pytest.mark.parametrize("status", [PluginStatus.HEALTHY, PluginStatus.UNHEALTHY])
def test_heartbeat_of_a_checked_plugin_is_acknowledged(status):
    catalog = Catalog()
    plugin = catalog.register(ingestor("a"), T0).plugin
    set_status(catalog, plugin, status)
    assert catalog.heartbeat(plugin.plugin_id, T1) is not None


def test_heartbeat_of_an_unknown_or_replaced_id_is_refused():
    catalog = Catalog()
    old = catalog.register(ingestor("a", address="h:1"), T0).plugin
    catalog.register(ingestor("a", address="h:1"), T0)
    assert catalog.heartbeat(old.plugin_id, T1) is None
    assert catalog.heartbeat("01ARZ3NDEKTSV4RRFFQ69G5FAV", T1) is None
    assert catalog.revision == 2


# -- remove -----------------------------------------------------------------------


def test_remove_is_one_change_and_idempotent():
    catalog = Catalog()
    a = catalog.register(ingestor("a"), T0).plugin
    b = catalog.register(ingestor("b"), T0).plugin
    change = catalog.remove([a.plugin_id, "unknown", a.plugin_id, b.plugin_id])
    assert change == Change(revision=3, removed=(a, b))
    assert change.removed_ids == [a.plugin_id, b.plugin_id]
    assert len(catalog) == 0
    assert catalog.by_source("a") == []
    assert catalog.remove([a.plugin_id]) is None
    assert catalog.remove([]) is None
    assert catalog.revision == 3


# -- update -----------------------------------------------------------------------


def test_update_changes_status_in_one_revision():
    catalog = Catalog()
    a = catalog.register(ingestor("a"), T0).plugin
    b = catalog.register(ingestor("b"), T0).plugin
    change = catalog.update(
        [
            dataclasses.replace(a, status=PluginStatus.HEALTHY),
            dataclasses.replace(b, last_error="slow"),  # same status
            dataclasses.replace(a, plugin_id="gone", status=PluginStatus.HEALTHY),
        ],
        T1,
    )
    assert change is not None
    assert change.revision == 3
    assert [p.plugin_id for p in change.upserted] == [a.plugin_id, b.plugin_id]
    new_a, new_b = change.upserted
    assert new_a.status is PluginStatus.HEALTHY
    assert new_a.status_since == T1
    assert new_a.revision == 3
    assert new_b.status_since == T0  # its status did not change
    assert catalog.get(a.plugin_id) == new_a
    assert catalog.update([dataclasses.replace(a, plugin_id="gone")], T1) is None
    assert catalog.revision == 3


# -- select -----------------------------------------------------------------------


@pytest.fixture
def populated() -> tuple[Catalog, dict[str, Plugin]]:
    catalog = Catalog()
    plugins = {
        "a1": catalog.register(ingestor("a", "k8s", "syslog", address="h:1"), T0).plugin,
        "a2": catalog.register(ingestor("a", "k8s", "syslog", address="h:2"), T0).plugin,
        "b": catalog.register(ingestor("b", "audit"), T0).plugin,
        "e": catalog.register(emitter("e"), T0).plugin,
    }
    set_status(catalog, plugins["a2"], PluginStatus.HEALTHY)
    set_status(catalog, plugins["e"], PluginStatus.UNHEALTHY)
    return catalog, plugins


def ids(plugins: object) -> list[str]:
    return [p.plugin_id for p in plugins]  # type: ignore[attr-defined]


def test_select_everything_in_id_order(populated):
    catalog, plugins = populated
    assert ids(catalog.select()) == sorted(p.plugin_id for p in plugins.values())


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"type": PluginType.INGESTOR}, ["a1", "a2", "b"]),
        ({"type": PluginType.EMITTER}, ["e"]),
        ({"source": "k8s"}, ["a1", "a2"]),
        ({"source": "audit"}, ["b"]),
        ({"source": "none"}, []),
        ({"statuses": frozenset({PluginStatus.HEALTHY})}, ["a2"]),
        ({"statuses": frozenset({PluginStatus.UNKNOWN})}, ["a1", "b"]),
        ({"statuses": frozenset({PluginStatus.HEALTHY, PluginStatus.UNHEALTHY})}, ["a2", "e"]),
        ({"name": "a"}, ["a1", "a2"]),
        ({"name": "a", "statuses": frozenset({PluginStatus.UNKNOWN})}, ["a1"]),
        ({"source": "syslog", "type": PluginType.EMITTER}, []),
    ],
)
def test_select_filters(populated, filters, expected):
    catalog, plugins = populated
    assert ids(catalog.select(**filters)) == sorted(plugins[k].plugin_id for k in expected)


def test_select_after_continues_without_duplicates_or_gaps(populated):
    catalog, _ = populated
    everything = ids(catalog.select())
    for i, plugin_id in enumerate(everything):
        assert ids(catalog.select(after=plugin_id)) == everything[i + 1 :]
    source_order = ids(catalog.select(source="k8s"))
    assert ids(catalog.select(source="k8s", after=source_order[0])) == source_order[1:]


def test_a_catalog_loaded_from_plugins_keeps_the_rules():
    first = Catalog()
    owner = first.register(ingestor("owner", "k8s", address="h:1"), T0).plugin
    loaded = Catalog([owner], revision=first.revision)
    assert loaded.revision == 1
    assert loaded.by_source("k8s") == [owner]
    with pytest.raises(AlreadyExists):
        loaded.register(ingestor("thief", "k8s"), T1)
    new, change, _ = loaded.register(ingestor("owner", "k8s", address="h:1"), T1)
    assert change.removed_ids == [owner.plugin_id]
    assert change.revision == 2
    assert loaded.by_source("k8s") == [new]


def test_a_source_held_by_many_replicas_is_free_only_when_all_have_expired():
    catalog = Catalog()
    replicas = [
        catalog.register(ingestor("owner", "k8s", address=f"h:{i}"), T0).plugin for i in range(50)
    ]
    for replica in replicas[:-1]:
        set_status(catalog, replica, PluginStatus.EXPIRED)
    with pytest.raises(AlreadyExists) as caught:
        catalog.register(ingestor("thief", "k8s"), T1)
    assert "belongs to plugin 'owner'" in str(caught.value)
    catalog.remove([replicas[-1].plugin_id])
    thief = catalog.register(ingestor("thief", "k8s"), T1).plugin
    holders = ids(catalog.by_source("k8s"))
    assert holders == sorted(holders)
    assert set(holders) == {thief.plugin_id} | {r.plugin_id for r in replicas[:-1]}


def test_a_replayed_catalog_keeps_its_indexes_in_order():
    """The committed view replays changes: status updates keep its id order and indexes."""
    writer, view = Catalog(), Catalog()
    alone = writer.register(ingestor("alone"), T0)
    shared = [writer.register(ingestor("s", "shared", address=f"h:{i}"), T0) for i in range(20)]
    for registered in [alone, *shared]:
        view.apply(registered.change)
    view.apply(set_status(writer, shared[3].plugin, PluginStatus.HEALTHY))
    removal = writer.remove([shared[5].plugin.plugin_id])
    assert removal is not None
    view.apply(removal)
    expected = sorted(r.plugin.plugin_id for r in shared if r is not shared[5])
    assert ids(view.select(source="shared")) == expected
    assert ids(view.select()) == sorted([*expected, alone.plugin.plugin_id])
    healthy = ids(view.select(statuses=frozenset({PluginStatus.HEALTHY})))
    assert healthy == [shared[3].plugin.plugin_id]
    assert ids(view.by_source("shared")) == expected
