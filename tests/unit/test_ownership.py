"""Ownership of plugin names, sources and emitter names by principals (SPEC §6), in memory."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from registry.catalog import Catalog, Claim, Owner, OwnershipChange, Released
from registry.errors import AlreadyExists, PermissionDenied, ResourceExhausted
from registry.model import Plugin, PluginStatus, PluginType, Principal, Registration

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)
T2 = T1 + timedelta(seconds=5)

A = Principal(
    "team-a",
    frozenset({"register"}),
    names=("alpha", "a-*", "es-writer"),
    sources=("k8s", "syslog", "a.*", "elastic"),
)
# May name anything and claim anything nobody owns: only ownership stops it.
B = Principal("team-b", frozenset({"register"}), names=("*",), sources=None)
ADMIN = Principal("root", frozenset({"admin"}))


def ingestor(name: str, *sources: str, address: str = "") -> Registration:
    return Registration(
        name=name,
        type=PluginType.INGESTOR,
        address=address or f"{name}.svc:50051",
        sources=sources or (name,),
        lease_ttl_seconds=30,
    )


def emitter(name: str, emitter_name: str = "", *, address: str = "") -> Registration:
    return Registration(
        name=name,
        type=PluginType.EMITTER,
        address=address or f"{name}.svc:50051",
        emitter_name=emitter_name,
        lease_ttl_seconds=30,
    )


def expire(catalog: Catalog, plugin: Plugin) -> None:
    current = catalog.get(plugin.plugin_id)
    assert current is not None
    assert catalog.update([dataclasses.replace(current, status=PluginStatus.EXPIRED)], T1)


def refused(exc: Exception, *foreign: Plugin) -> str:
    """The message, after checking it names no other plugin's id or address."""
    message = str(exc)
    for plugin in foreign:
        assert plugin.plugin_id not in message
        assert plugin.address not in message
    return message


@pytest.fixture
def catalog() -> Catalog:
    return Catalog()


@pytest.fixture
def alpha(catalog: Catalog) -> Plugin:
    """team-a's ingestor 'alpha' on k8s and syslog, and its emitter 'es-writer'."""
    catalog.register(emitter("es-writer", "elastic"), T0, A)
    return catalog.register(ingestor("alpha", "k8s", "syslog"), T0, A).plugin


# -- what is recorded -----------------------------------------------------------


def test_the_first_principal_to_register_a_name_owns_it_and_its_claims(catalog):
    plugin, change, ownership = catalog.register(ingestor("alpha", "k8s", "syslog"), T0, A)
    assert change.upserted == (plugin,)
    assert catalog.owner_of("alpha") == "team-a"
    assert catalog.claim_of("source", "k8s") == Claim("source", "k8s", "team-a", "alpha", T0)
    assert ownership == OwnershipChange(
        owners={"alpha": Owner("alpha", "team-a", T0)},
        claims={
            ("source", "k8s"): Claim("source", "k8s", "team-a", "alpha", T0),
            ("source", "syslog"): Claim("source", "syslog", "team-a", "alpha", T0),
        },
    )
    # Registering again records nothing new, and keeps the first claim's time.
    assert catalog.register(ingestor("alpha", "k8s", address="h:2"), T1, A).ownership is None
    assert catalog.claim_of("source", "k8s") == Claim("source", "k8s", "team-a", "alpha", T0)


def test_an_emitter_claims_its_emitter_name(catalog):
    ownership = catalog.register(emitter("es-writer", "elastic"), T0, A).ownership
    assert ownership is not None
    assert ownership.claims == {
        ("emitter", "elastic"): Claim("emitter", "elastic", "team-a", "es-writer", T0)
    }
    assert catalog.claim_of("source", "elastic") is None


# -- another principal ------------------------------------------------------------


@pytest.mark.parametrize("gone", ["live", "removed", "expired"])
def test_another_principal_cannot_take_a_name_or_its_claims(catalog, alpha, gone):
    instances = list(catalog)
    if gone == "removed":
        catalog.remove([p.plugin_id for p in instances])
    elif gone == "expired":
        for plugin in instances:
            expire(catalog, plugin)
    revision = catalog.revision

    with pytest.raises(PermissionDenied) as caught:
        catalog.register(ingestor("alpha", "b.logs"), T2, B)
    assert refused(caught.value, *instances) == (
        "info.name: plugin name 'alpha' belongs to another principal"
    )
    with pytest.raises(PermissionDenied) as caught:
        catalog.register(ingestor("beta", "b.logs", "syslog"), T2, B)
    assert refused(caught.value, *instances) == (
        "info.sources: source 'syslog' belongs to plugin 'alpha'"
    )
    with pytest.raises(PermissionDenied) as caught:
        catalog.register(emitter("beta-out", "elastic"), T2, B)
    assert refused(caught.value, *instances) == (
        "info.emitter_name: emitter name 'elastic' belongs to plugin 'es-writer'"
    )
    # An emitter without emitter name is resolved by, and claims, its plugin name.
    with pytest.raises(PermissionDenied) as caught:
        catalog.register(emitter("elastic"), T2, B)
    assert refused(caught.value, *instances) == (
        "info.emitter_name: emitter name 'elastic' belongs to plugin 'es-writer'"
    )
    # Nothing changed, and nothing was recorded for the refused names.
    assert catalog.revision == revision
    assert catalog.owner_of("beta") is None
    assert catalog.owner_of("beta-out") is None
    assert catalog.owner_of("elastic") is None


def test_the_checks_go_name_then_sources_then_emitter_name(catalog, alpha):
    with pytest.raises(PermissionDenied, match=r"^info\.name: plugin name 'alpha'"):
        catalog.register(ingestor("alpha", "syslog"), T1, B)
    with pytest.raises(PermissionDenied, match=r"^info\.sources: source 'k8s'"):
        catalog.register(ingestor("beta", "fresh", "k8s", "syslog"), T1, B)


def test_the_policy_limits_which_names_and_claims_a_principal_may_use(catalog):
    with pytest.raises(PermissionDenied) as caught:
        catalog.register(ingestor("zeta", "k8s"), T0, A)
    assert str(caught.value) == "info.name: principal 'team-a' may not register plugin name 'zeta'"
    with pytest.raises(PermissionDenied) as caught:
        catalog.register(ingestor("a-one", "a.logs", "b.logs"), T0, A)
    assert str(caught.value) == "info.sources: principal 'team-a' may not claim source 'b.logs'"
    with pytest.raises(PermissionDenied) as caught:
        catalog.register(emitter("a-out", "kafka"), T0, A)
    assert str(caught.value) == (
        "info.emitter_name: principal 'team-a' may not claim emitter name 'kafka'"
    )
    assert len(catalog) == 0
    assert catalog.owners() == []
    assert catalog.claims() == []
    # A claim it already holds needs no pattern: it is its own.
    catalog.register(ingestor("a-one", "a.logs"), T0, A)
    narrowed = dataclasses.replace(A, sources=("k8s",))
    assert catalog.register(ingestor("a-one", "a.logs", address="h:2"), T1, narrowed).plugin


# -- admins -------------------------------------------------------------------------


def test_an_admin_may_use_any_name_and_the_owner_keeps_it(catalog, alpha):
    plugin, _, ownership = catalog.register(ingestor("alpha", "k8s", "extra"), T1, ADMIN)
    assert plugin.name == "alpha"
    assert catalog.owner_of("alpha") == "team-a"
    # A new claim under an owned name is the owner's.
    assert ownership == OwnershipChange(
        claims={("source", "extra"): Claim("source", "extra", "team-a", "alpha", T1)}
    )
    # An unowned name becomes the admin's.
    catalog.register(ingestor("fresh", "fresh"), T1, ADMIN)
    assert catalog.owner_of("fresh") == "root"
    with pytest.raises(PermissionDenied):
        catalog.register(ingestor("fresh", "fresh", address="h:9"), T1, B)


def test_an_admin_may_use_a_foreign_claim_but_not_a_live_holders_source(catalog, alpha):
    with pytest.raises(AlreadyExists) as caught:
        catalog.register(ingestor("other", "k8s"), T1, ADMIN)
    assert refused(caught.value, alpha) == (
        "info.sources: source 'k8s' belongs to plugin 'alpha', which has a live instance"
    )
    catalog.remove([alpha.plugin_id])
    assert catalog.register(ingestor("other", "k8s"), T1, ADMIN).plugin
    # The claim stays where it was: an admin's registration takes nothing away.
    assert catalog.claim_of("source", "k8s") == Claim("source", "k8s", "team-a", "alpha", T0)


def test_admins_have_no_instance_limit(catalog):
    for port in range(5):
        catalog.register(ingestor("fresh", address=f"h:{port}"), T0, ADMIN, max_live_instances=1)
    assert catalog.live_instances_of("root") == 5


# -- release --------------------------------------------------------------------------


def test_release_frees_a_name_and_its_claims_for_anyone(catalog, alpha):
    catalog.remove([p.plugin_id for p in catalog])
    revision = catalog.revision
    outcome = catalog.release("alpha")
    assert outcome is not None
    released, ownership = outcome
    assert released == Released("alpha", "team-a", sources=("k8s", "syslog"))
    assert ownership == OwnershipChange(
        owners={"alpha": None}, claims={("source", "k8s"): None, ("source", "syslog"): None}
    )
    assert catalog.revision == revision  # no watcher hears of it
    assert catalog.release("alpha") is None  # idempotent
    assert catalog.owner_of("alpha") is None

    plugin = catalog.register(ingestor("alpha", "k8s"), T2, B).plugin
    assert catalog.owner_of("alpha") == "team-b"
    assert catalog.claim_of("source", "k8s") == Claim("source", "k8s", "team-b", "alpha", T2)
    assert plugin.registration.sources == ("k8s",)
    # The emitter name was not released with 'alpha'.
    with pytest.raises(PermissionDenied):
        catalog.register(emitter("beta-out", "elastic"), T2, B)
    released_emitter = catalog.release("es-writer")
    assert released_emitter is not None
    assert released_emitter[0] == Released("es-writer", "team-a", emitter_names=("elastic",))
    assert released_emitter[0].emitter_name == "elastic"
    assert catalog.register(emitter("beta-out", "elastic"), T2, B).plugin


def test_release_leaves_live_instances_alone(catalog, alpha):
    before = list(catalog)
    assert catalog.release("alpha") is not None
    assert list(catalog) == before
    assert catalog.by_source("k8s") == [alpha]
    # The live instance still holds its sources (SPEC §2), whoever asks.
    with pytest.raises(AlreadyExists):
        catalog.register(ingestor("beta", "k8s"), T1, B)
    # Its name is free: the next principal to register it owns it.
    catalog.register(ingestor("alpha", "k8s", address="h:2"), T1, B)
    assert catalog.owner_of("alpha") == "team-b"


def test_release_of_a_name_nobody_owns_is_none(catalog):
    catalog.register(ingestor("open", "k8s"), T0)
    assert catalog.release("open") is None
    assert catalog.release("never-seen") is None


# -- one principal, several names ---------------------------------------------------------


def test_two_names_of_one_principal_still_share_no_live_source(catalog):
    first = catalog.register(ingestor("a-one", "k8s"), T0, A).plugin
    with pytest.raises(AlreadyExists) as caught:
        catalog.register(ingestor("a-two", "k8s"), T1, A)
    assert refused(caught.value, first) == (
        "info.sources: source 'k8s' belongs to plugin 'a-one', which has a live instance"
    )
    assert catalog.owner_of("a-two") is None  # a refused Register records nothing

    # Once 'a-one' has no live instance, the claim moves to the name that takes it.
    expire(catalog, first)
    ownership = catalog.register(ingestor("a-two", "k8s"), T2, A).ownership
    assert ownership is not None
    assert ownership.claims == {("source", "k8s"): Claim("source", "k8s", "team-a", "a-two", T2)}
    assert catalog.claim_of("source", "k8s") == Claim("source", "k8s", "team-a", "a-two", T2)
    outcome = catalog.release("a-one")
    assert outcome is not None
    assert outcome[0] == Released("a-one", "team-a")  # k8s is no longer under 'a-one'


# -- the per-principal instance limit -----------------------------------------------------------


def test_the_live_instances_of_a_principal_are_limited(catalog):
    one = catalog.register(ingestor("a-one", "a.one", address="h:1"), T0, A, max_live_instances=3)
    catalog.register(ingestor("a-one", "a.one", address="h:2"), T0, A, max_live_instances=3)
    catalog.register(ingestor("a-two", "a.two", address="h:3"), T0, A, max_live_instances=3)
    assert catalog.live_instances_of("team-a") == 3
    revision = catalog.revision
    with pytest.raises(ResourceExhausted) as caught:
        catalog.register(ingestor("a-three", "a.three"), T1, A, max_live_instances=3)
    assert caught.value.limit == "max_instances_per_principal"
    assert (
        str(caught.value) == "max_instances_per_principal: principal 'team-a' has 3 live instances"
    )
    assert catalog.revision == revision
    assert catalog.owner_of("a-three") is None

    # A replacement of the same (name, address) is not one more.
    replacement = catalog.register(
        ingestor("a-one", "a.one", address="h:1"), T1, A, max_live_instances=3
    )
    assert replacement.change.removed == (one.plugin,)
    assert catalog.live_instances_of("team-a") == 3
    # Other principals count on their own; open mode has no limit.
    catalog.register(ingestor("beta"), T1, B, max_live_instances=1)
    extra = catalog.register(ingestor("a-one", "a.one", address="h:9"), T1).plugin
    assert catalog.live_instances_of("team-a") == 4

    # Expired and removed instances free their places.
    expire(catalog, replacement.plugin)
    catalog.remove([extra.plugin_id])
    assert catalog.live_instances_of("team-a") == 2
    catalog.register(ingestor("a-three", "a.three"), T2, A, max_live_instances=3)
    with pytest.raises(ResourceExhausted):
        catalog.register(ingestor("a-four", "a.four"), T2, A, max_live_instances=3)


def test_instance_counts_follow_owners_and_a_reloaded_catalog(catalog):
    # Instances registered in open mode count once a principal owns their name.
    catalog.register(ingestor("a-old", "a.old", address="h:1"), T0)
    catalog.register(ingestor("a-old", "a.old", address="h:2"), T0)
    assert catalog.live_instances_of("team-a") == 0
    catalog.register(ingestor("a-old", "a.old", address="h:3"), T0, A)
    assert catalog.live_instances_of("team-a") == 3
    loaded = Catalog(
        list(catalog), catalog.revision, owners=catalog.owners(), claims=catalog.claims()
    )
    assert loaded.live_instances_of("team-a") == 3
    with pytest.raises(ResourceExhausted):
        loaded.register(ingestor("a-new", "a.new"), T1, A, max_live_instances=3)
    with pytest.raises(PermissionDenied):
        loaded.register(ingestor("a-old", "a.other"), T1, B)
    assert loaded.release("a-old") is not None
    assert loaded.live_instances_of("team-a") == 0


# -- open mode ------------------------------------------------------------------------------


def test_open_mode_checks_and_records_no_ownership(catalog, alpha):
    # The §2 rule holds as ever.
    with pytest.raises(AlreadyExists):
        catalog.register(ingestor("thief", "k8s"), T1)
    catalog.remove([alpha.plugin_id])
    plugin, _, ownership = catalog.register(ingestor("thief", "k8s"), T1)
    assert ownership is None
    assert plugin.name == "thief"
    assert catalog.owner_of("thief") is None
    assert catalog.claim_of("source", "k8s") == Claim("source", "k8s", "team-a", "alpha", T0)
    # Open mode may even use an owned name; its owner stays.
    assert catalog.register(ingestor("alpha", "a.x", address="h:7"), T1).ownership is None
    assert catalog.owner_of("alpha") == "team-a"


# -- instance access (Heartbeat, Unregister, Drain) ------------------------------------------------


def test_only_the_owner_acts_on_its_instances(catalog, alpha):
    catalog.check_instance_access(A, alpha)
    catalog.check_instance_access(ADMIN, alpha)
    catalog.check_instance_access(None, alpha)
    with pytest.raises(PermissionDenied) as caught:
        catalog.check_instance_access(B, alpha)
    assert refused(caught.value, alpha) == (
        "plugin_id: the instance belongs to plugin 'alpha' of another principal"
    )
    assert catalog.owner_of("alpha") == "team-a"


def test_an_instance_of_an_unowned_name_needs_the_right_to_name_it(catalog):
    plugin = catalog.register(ingestor("a-legacy", "a.legacy"), T0).plugin  # open mode
    catalog.check_instance_access(A, plugin)  # A may register 'a-*'
    catalog.check_instance_access(B, plugin)  # so may B ('*')
    reader = Principal("reader", frozenset({"read"}))
    with pytest.raises(PermissionDenied):
        catalog.check_instance_access(reader, plugin)


def test_acting_on_a_name_follows_its_owner(catalog, alpha):
    catalog.check_name_access(A, "alpha")
    with pytest.raises(PermissionDenied) as caught:
        catalog.check_name_access(B, "alpha")
    assert str(caught.value) == "name: plugin name 'alpha' belongs to another principal"
    # Released: the name is nobody's, so whoever may register it may act on it.
    catalog.release("alpha")
    catalog.check_name_access(B, "alpha")
    catalog.check_instance_access(B, alpha)
    assert not catalog.may_act_on(Principal("reader", frozenset({"read"})), "alpha")
