"""The in-memory index of every registered plugin, and the rules that change it.

Synchronous and free of I/O: each method checks, applies and returns the
:class:`~registry.model.Change` it made, or raises before touching anything.
:mod:`registry.state` keeps two: the write side, where the rules are checked and
changes are applied at once, and the committed view that reads (list, get,
resolve, watch snapshots) are served from, which :meth:`Catalog.apply` advances
as changes become durable.

Ownership (SPEC §6) lives on the write side only: which principal owns each plugin
name, and which (principal, plugin name) has claimed each source and emitter name.
It outlasts every instance: only :meth:`Catalog.release` gives it up. A method that
changes it also returns the :class:`OwnershipChange` to store with its change.

Reads in id order (ListPlugins pages, Resolve) walk
:class:`~registry.sortedids.SortedIds` indexes kept sorted as plugins come and go,
so a page costs O(log n + its size), never a sort of the catalogue (SPEC §7 "Cost
grows with work").
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

from registry.errors import AlreadyExists, PermissionDenied, ResourceExhausted
from registry.labels import EVERYTHING, Selector
from registry.model import Change, Plugin, PluginStatus, PluginType, Principal, Registration
from registry.sortedids import SortedIds
from registry.ulid import new_ulid

ClaimKind = Literal["source", "emitter"]
ClaimKey = tuple[ClaimKind, str]

INSTANCE_LIMIT = "max_instances_per_principal"
PLUGIN_LIMIT = "max_plugins"


@dataclass(frozen=True, slots=True)
class Owner:
    """The principal that owns a plugin name, and since when."""

    name: str
    principal: str
    claimed_at: datetime


@dataclass(frozen=True, slots=True)
class Claim:
    """A source or emitter name held by a principal for one of its plugin names."""

    kind: ClaimKind
    key: str
    principal: str
    plugin_name: str
    claimed_at: datetime


@dataclass(frozen=True, slots=True)
class Released:
    """What :meth:`Catalog.release` gave up: the owner and every claim under the name."""

    name: str
    principal: str
    sources: tuple[str, ...] = ()
    emitter_names: tuple[str, ...] = ()

    @property
    def emitter_name(self) -> str:
        """The released emitter names in one string (comma-separated when several)."""
        return ",".join(self.emitter_names)


@dataclass(slots=True)
class OwnershipChange:
    """Ownership records to store: the new record per key, or None when it is gone."""

    owners: dict[str, Owner | None] = field(default_factory=dict)
    claims: dict[ClaimKey, Claim | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.owners or self.claims)


class FirstCheck(NamedTuple):
    """A registration's first health check, made before it is stored (folded into it).

    ``status`` is what the check makes of a new (UNKNOWN) instance: HEALTHY when it
    passed, UNHEALTHY when it failed and one failure is the threshold, else UNKNOWN.
    ``error`` is empty when it passed.
    """

    status: PluginStatus
    checked_at: datetime
    error: str


class Registered(NamedTuple):
    """What :meth:`Catalog.register` did: the new instance, its change, and ownership."""

    plugin: Plugin
    change: Change
    # None when nothing was recorded (open mode, or every record already there).
    ownership: OwnershipChange | None


class Catalog:
    """Current plugins by id, with indexes by (name, address), source and emitter name."""

    def __init__(
        self,
        plugins: Iterable[Plugin] = (),
        revision: int = 0,
        *,
        owners: Iterable[Owner] = (),
        claims: Iterable[Claim] = (),
    ) -> None:
        self.revision = revision
        self._by_id: dict[str, Plugin] = {}
        # Every id in order, and the ids per source and per emitter name in order:
        # what reads in id order walk.
        self._order = SortedIds()
        self._by_instance: dict[tuple[str, str], str] = {}
        self._by_source: defaultdict[str, SortedIds] = defaultdict(SortedIds)
        self._by_emitter: defaultdict[str, SortedIds] = defaultdict(SortedIds)
        self._owners: dict[str, Owner] = {}
        self._claims: dict[ClaimKey, Claim] = {}
        self._claims_by_name: defaultdict[str, set[ClaimKey]] = defaultdict(set)
        # Live instances per plugin name and per owning principal, kept as instances
        # come and go, so the per-principal limit costs no scan of the catalogue;
        # and per source and emitter name, the live instances of each plugin name
        # holding it, so the live-holder rule costs no walk of the holders.
        self._live_by_name: dict[str, int] = {}
        self._live_by_principal: dict[str, int] = {}
        self._live_holders: dict[ClaimKey, dict[str, int]] = {}
        for owner in owners:
            self._set_owner(owner)
        for claim in claims:
            self._set_claim(claim)
        for plugin in plugins:
            self._index(plugin)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self._by_id.values())

    def get(self, plugin_id: str) -> Plugin | None:
        return self._by_id.get(plugin_id)

    # -- reads ---------------------------------------------------------------

    def by_source(self, source: str) -> list[Plugin]:
        """The plugins that take ``source``, in id order."""
        return [self._by_id[i] for i in self._by_source.get(source, ())]

    def by_emitter(self, emitter_name: str) -> list[Plugin]:
        """The emitters resolved by ``emitter_name``, in id order."""
        return [self._by_id[i] for i in self._by_emitter.get(emitter_name, ())]

    def select(
        self,
        *,
        type: PluginType = PluginType.UNSPECIFIED,
        source: str = "",
        statuses: frozenset[PluginStatus] = frozenset(),
        name: str = "",
        labels: Selector = EVERYTHING,
        after: str = "",
    ) -> Iterator[Plugin]:
        """Plugins matching every filter given, in id order, starting after ``after``.

        A keyset walk of the sorted index (of all ids, or of the source's): finding
        ``after`` costs O(log n), each plugin walked O(1) (a label selector: one
        lookup per requirement), so paging through all n costs O(n) in total. The
        other filters are applied while walking.
        """
        index = self._by_source.get(source) if source else self._order
        if index is None:
            return
        for plugin_id in index.after(after):
            plugin = self._by_id[plugin_id]
            if type and plugin.registration.type != type:
                continue
            if statuses and plugin.status not in statuses:
                continue
            if name and plugin.name != name:
                continue
            if labels and not labels.matches(plugin.registration.labels):
                continue
            yield plugin

    # -- ownership reads -------------------------------------------------------

    def owner_of(self, plugin_name: str) -> str | None:
        """The principal that owns ``plugin_name``, or None when nobody does."""
        owner = self._owners.get(plugin_name)
        return owner.principal if owner is not None else None

    def claim_of(self, kind: ClaimKind, key: str) -> Claim | None:
        """The claim on a source (``"source"``) or an emitter name (``"emitter"``)."""
        return self._claims.get((kind, key))

    def owners(self) -> list[Owner]:
        return list(self._owners.values())

    def claims(self) -> list[Claim]:
        return list(self._claims.values())

    def live_instances_of(self, principal: str) -> int:
        """Live instances of every plugin name ``principal`` owns."""
        return self._live_by_principal.get(principal, 0)

    def may_act_on(self, principal: Principal | None, plugin_name: str) -> bool:
        """Whether ``principal`` may act on the instances of ``plugin_name``.

        Heartbeat, Unregister and Drain: allowed in open mode (no principal), to
        admins, to the name's owner and, for a name nobody owns (registered in open
        mode, before a policy), to a principal whose policy lets it register the name.
        """
        if principal is None or principal.admin:
            return True
        owner = self._owners.get(plugin_name)
        if owner is None:
            return principal.may_name(plugin_name)
        return owner.principal == principal.name

    def check_instance_access(self, principal: Principal | None, plugin: Plugin) -> None:
        """Refuse acting on an instance of another principal's plugin name.

        Raises:
            PermissionDenied: :meth:`may_act_on` says no; names the plugin name only.
        """
        if not self.may_act_on(principal, plugin.name):
            raise PermissionDenied(
                f"plugin_id: the instance belongs to plugin {plugin.name!r} of another principal"
            )

    def check_name_access(self, principal: Principal | None, plugin_name: str) -> None:
        """Refuse acting on the instances of another principal's plugin name (Drain by name).

        Raises:
            PermissionDenied: :meth:`may_act_on` says no.
        """
        if not self.may_act_on(principal, plugin_name):
            raise PermissionDenied(
                f"name: plugin name {plugin_name!r} belongs to another principal"
            )

    def check_room(self, registration: Registration, max_plugins: int) -> None:
        """Refuse a registration that would make the catalogue hold over ``max_plugins``.

        Every plugin counts, whatever its status. A registration at the (name,
        address) of a held plugin replaces it, so it adds none. ``0``: no limit.

        Raises:
            ResourceExhausted: ``max_plugins`` are held (names the limit).
        """
        if not max_plugins or len(self._by_id) < max_plugins:
            return
        if (registration.name, registration.address) in self._by_instance:
            return
        raise ResourceExhausted(
            PLUGIN_LIMIT,
            f"the registry holds {len(self._by_id)} plugins; the limit is {max_plugins}",
        )

    # -- writes --------------------------------------------------------------

    def check_register(
        self,
        registration: Registration,
        principal: Principal | None = None,
        *,
        max_live_instances: int = 0,
        max_plugins: int = 0,
    ) -> Plugin | None:
        """Every rule :meth:`register` checks, changing nothing: it would be refused
        only if this raises (or the catalogue changes in between).

        Returns the instance it would replace (same name and address), if any.

        Raises:
            PermissionDenied, AlreadyExists, ResourceExhausted: as :meth:`register`.
        """
        # Admins skip the ownership checks and the limit, not the live-holder rule.
        checked = principal if principal is not None and not principal.admin else None
        if checked is not None:
            self._check_principal(registration, checked)
        self._check_live_holders(registration)
        replaced_id = self._by_instance.get((registration.name, registration.address))
        replaced = self._by_id[replaced_id] if replaced_id is not None else None
        self.check_room(registration, max_plugins)
        if checked is not None and max_live_instances:
            self._check_instance_limit(registration.name, checked, replaced, max_live_instances)
        return replaced

    def register(
        self,
        registration: Registration,
        now: datetime,
        principal: Principal | None = None,
        *,
        max_live_instances: int = 0,
        max_plugins: int = 0,
        first_check: FirstCheck | None = None,
    ) -> Registered:
        """Add an instance under a fresh id, replacing the one at the same (name, address).

        With a principal, the name and the claims are checked against ownership
        first, and recorded for it when absent. ``principal=None`` (open mode)
        checks and records no ownership. ``max_live_instances`` (0: no limit)
        bounds the live instances of the names a non-admin principal owns, and
        ``max_plugins`` (0: no limit) the plugins held in all (:meth:`check_room`);
        a replacement counts as one more for neither. ``first_check``, made before
        (:meth:`check_register`), gives the new instance its status, last check and
        last error; without one it is UNKNOWN, not checked yet.

        Raises:
            PermissionDenied: the principal may not use the name, or a source or the
                emitter name belongs to another principal or is not its to claim.
            AlreadyExists: a source or the emitter name belongs to another plugin name
                that has a live instance.
            ResourceExhausted: the principal's live instances or the plugins held
                reached their limit.
        """
        replaced = self.check_register(
            registration,
            principal,
            max_live_instances=max_live_instances,
            max_plugins=max_plugins,
        )
        plugin = Plugin(
            plugin_id=new_ulid(),
            registration=registration,
            status=PluginStatus.UNKNOWN if first_check is None else first_check.status,
            registered_at=now,
            last_heartbeat_at=now if registration.lease_ttl_seconds else None,
            last_check_at=None if first_check is None else first_check.checked_at,
            last_error="" if first_check is None else first_check.error,
            revision=self.revision + 1,
            status_since=now,
        )
        if replaced is not None:
            self._unindex(replaced)
        ownership = self._record(registration, principal, now) if principal is not None else None
        self._index(plugin)
        change = self._bump(upserted=(plugin,), removed=(replaced,) if replaced else ())
        return Registered(plugin, change, ownership)

    def release(self, plugin_name: str) -> tuple[Released, OwnershipChange] | None:
        """Forget the owner of a name and every claim recorded under it.

        Live instances stay as they are. Idempotent: None when nothing was recorded.
        """
        owner = self._owners.get(plugin_name)
        keys = sorted(self._claims_by_name.get(plugin_name, ()))
        if owner is None and not keys:
            return None
        change = OwnershipChange()
        claims = [self._claims[k] for k in keys]
        for key in keys:
            self._drop_claim(key)
            change.claims[key] = None
        if owner is not None:
            self._drop_owner(plugin_name)
            change.owners[plugin_name] = None
        released = Released(
            name=plugin_name,
            principal=owner.principal if owner is not None else claims[0].principal,
            sources=tuple(c.key for c in claims if c.kind == "source"),
            emitter_names=tuple(c.key for c in claims if c.kind == "emitter"),
        )
        return released, change

    def heartbeat(self, plugin_id: str, now: datetime) -> Plugin | None:
        """Renew a live lease; None when the id is unknown, replaced, reaped or expired.

        Changes no revision: a heartbeat that changes nothing pushes nothing.
        """
        plugin = self._by_id.get(plugin_id)
        if plugin is None or not plugin.live:
            return None
        renewed = self._by_id[plugin_id] = plugin.renewed(now)
        return renewed

    def check(self, plugin_id: str, at: datetime, error: str) -> Plugin | None:
        """Record a health check that changed no status (its time, its error, "" when it
        passed); None when the id is unknown. Changes no revision."""
        plugin = self._by_id.get(plugin_id)
        if plugin is None:
            return None
        checked = self._by_id[plugin_id] = plugin.checked(at, error)
        return checked

    def touch(self, plugin_id: str, **fields: object) -> Plugin | None:
        """Change fields no watcher needs to hear of (times, last error): no revision."""
        plugin = self._by_id.get(plugin_id)
        if plugin is None:
            return None
        touched = plugin.with_fields(**fields)
        self._replace(plugin, touched)
        return touched

    def hold_touched(self, plugin: Plugin) -> bool:
        """Hold ``plugin``, a touched state made for another catalog, if it is of the
        revision held here; False when another revision is held (touch that instead).

        A touch changes neither the revision nor the indexes (:meth:`heartbeat`,
        :meth:`check`, :meth:`touch`), so where this catalog holds the instance at the
        revision of ``plugin`` it holds the same state but for the touched fields: the
        two catalogs then share one object rather than each making its own. An id not
        held here is ignored (True).
        """
        held = self._by_id.get(plugin.plugin_id)
        if held is None:
            return True
        if held.revision != plugin.revision:
            return False
        self._by_id[plugin.plugin_id] = plugin
        return True

    def remove(self, plugin_ids: Iterable[str]) -> Change | None:
        """Remove plugins by id; unknown ids are ignored (removal is idempotent)."""
        removed = tuple(self._by_id[i] for i in dict.fromkeys(plugin_ids) if i in self._by_id)
        if not removed:
            return None
        for plugin in removed:
            self._unindex(plugin)
        return self._bump(removed=removed)

    def drain(self, plugin_ids: Iterable[str], drained: bool, now: datetime) -> Change | None:
        """Take instances out of routing (DRAINING), or put them back, in one revision.

        Idempotent: instances already in the state asked for, and unknown ids, are
        left alone; None when nothing changed. An EXPIRED instance is not drained:
        its lease has lapsed and its sources may be another name's by now, so
        draining must not bring it back to life.

        Undrained, an instance takes the health its last check saw: HEALTHY if that
        check passed, else UNKNOWN (not checked while drained, or failing), which the
        health checker checks again at once.
        """
        changed = []
        for plugin_id in dict.fromkeys(plugin_ids):
            plugin = self._by_id.get(plugin_id)
            if plugin is None:
                continue
            draining = plugin.status is PluginStatus.DRAINING
            if drained and not draining and plugin.status is not PluginStatus.EXPIRED:
                changed.append(dataclasses.replace(plugin, status=PluginStatus.DRAINING))
            elif not drained and draining:
                passed = plugin.last_check_at is not None and not plugin.last_error
                status = PluginStatus.HEALTHY if passed else PluginStatus.UNKNOWN
                changed.append(dataclasses.replace(plugin, status=status))
        return self.update(changed, now) if changed else None

    def instances_of(self, plugin_name: str) -> list[Plugin]:
        """Every instance of ``plugin_name``, in id order.

        A walk of the whole catalogue: for Drain by name, an operator's occasional
        call, which is not worth an index kept on every Register.
        """
        return list(self.select(name=plugin_name))

    def update(self, plugins: Iterable[Plugin], now: datetime) -> Change | None:
        """Store new states of existing plugins (status changes) in one revision."""
        revision = self.revision + 1
        updated = tuple(
            dataclasses.replace(
                p,
                revision=revision,
                status_since=now if p.status != self._by_id[p.plugin_id].status else p.status_since,
            )
            for p in plugins
            if p.plugin_id in self._by_id
        )
        if not updated:
            return None
        for plugin in updated:
            self._replace(self._by_id[plugin.plugin_id], plugin)
        return self._bump(upserted=updated)

    def apply(self, change: Change) -> None:
        """Replay a change made elsewhere (on the write side), without checking rules."""
        for plugin in change.removed:
            if plugin.plugin_id in self._by_id:
                self._unindex(self._by_id[plugin.plugin_id])
        for plugin in change.upserted:
            held = self._by_id.get(plugin.plugin_id)
            if held is None:
                self._index(plugin)
            elif (
                held.registration is plugin.registration or held.registration == plugin.registration
            ):
                self._replace(held, plugin)  # a new status: the indexes stay as they are
            else:
                self._unindex(held)
                self._index(plugin)
        self.revision = change.revision

    # -- rules -----------------------------------------------------------------

    def _check_principal(self, registration: Registration, principal: Principal) -> None:
        """SPEC §6: the name is the principal's to use, and so is every claim."""
        name = registration.name
        if not principal.may_name(name):
            raise PermissionDenied(
                f"info.name: principal {principal.name!r} may not register plugin name {name!r}"
            )
        owner = self._owners.get(name)
        if owner is not None and owner.principal != principal.name:
            raise PermissionDenied(f"info.name: plugin name {name!r} belongs to another principal")
        for field_name, kind, key in _claim_keys(registration):
            what = _WHAT[kind]
            claim = self._claims.get((kind, key))
            if claim is not None:
                if claim.principal != principal.name:
                    raise PermissionDenied(
                        f"{field_name}: {what} {key!r} belongs to plugin {claim.plugin_name!r}"
                    )
            elif not principal.may_claim(key):
                raise PermissionDenied(
                    f"{field_name}: principal {principal.name!r} may not claim {what} {key!r}"
                )

    def _check_live_holders(self, registration: Registration) -> None:
        """SPEC §2: a source or emitter name held by a live instance of another name.

        O(sources): the live instances per name of each key are counted as they
        come and go, so a key held by thousands of replicas costs no walk of them.
        """
        for field_name, kind, key in _claim_keys(registration):
            for holder in self._live_holders.get((kind, key), ()):
                if holder != registration.name:
                    # The holder's name only: its ids and addresses are another party's.
                    raise AlreadyExists(
                        f"{field_name}: {_WHAT[kind]} {key!r} belongs to plugin {holder!r}, "
                        "which has a live instance"
                    )

    def _check_instance_limit(
        self, name: str, principal: Principal, replaced: Plugin | None, limit: int
    ) -> None:
        live = self._live_by_principal.get(principal.name, 0)
        counted = live
        if replaced is not None and replaced.live and self.owner_of(name) == principal.name:
            counted -= 1  # the replacement takes the old instance's place
        if counted >= limit:
            raise ResourceExhausted(
                INSTANCE_LIMIT, f"principal {principal.name!r} has {live} live instances"
            )

    def _record(
        self, registration: Registration, principal: Principal, now: datetime
    ) -> OwnershipChange | None:
        """Record what is absent: the name's owner, then each claim for that owner.

        Claims go to the name's owner, which is ``principal`` unless an admin
        registers a name someone else owns. A claim the owner holds under another of
        its names moves to this one (the checks made sure no live instance of that
        name still uses it); a claim of another principal (which only an admin gets
        past) stays where it is.
        """
        change = OwnershipChange()
        name = registration.name
        owner = self._owners.get(name)
        if owner is None:
            owner = Owner(name, principal.name, now)
            self._set_owner(owner)
            change.owners[name] = owner
        for _, kind, key in _claim_keys(registration):
            claim = self._claims.get((kind, key))
            if claim is None or (claim.principal == owner.principal and claim.plugin_name != name):
                if claim is not None:
                    self._drop_claim((kind, key))
                claim = Claim(kind, key, owner.principal, name, now)
                self._set_claim(claim)
                change.claims[(kind, key)] = claim
        return change or None

    # -- internals -----------------------------------------------------------

    def _bump(self, upserted: tuple[Plugin, ...] = (), removed: tuple[Plugin, ...] = ()) -> Change:
        self.revision += 1
        return Change(self.revision, upserted, removed)

    def _index(self, plugin: Plugin) -> None:
        self._by_id[plugin.plugin_id] = plugin
        self._order.add(plugin.plugin_id)
        self._by_instance[(plugin.name, plugin.address)] = plugin.plugin_id
        for source in plugin.registration.sources:
            self._by_source[source].add(plugin.plugin_id)
        if plugin.registration.emitter_key:
            self._by_emitter[plugin.registration.emitter_key].add(plugin.plugin_id)
        if plugin.live:
            self._count_live(plugin, 1)

    def _unindex(self, plugin: Plugin) -> None:
        del self._by_id[plugin.plugin_id]
        self._order.discard(plugin.plugin_id)
        if self._by_instance.get((plugin.name, plugin.address)) == plugin.plugin_id:
            del self._by_instance[(plugin.name, plugin.address)]
        for key, index in [(s, self._by_source) for s in plugin.registration.sources] + (
            [(plugin.registration.emitter_key, self._by_emitter)]
            if plugin.registration.emitter_key
            else []
        ):
            index[key].discard(plugin.plugin_id)
            if not index[key]:
                del index[key]
        if plugin.live:
            self._count_live(plugin, -1)

    def _replace(self, old: Plugin, new: Plugin) -> None:
        """A new state of the same instance (same id, name and sources)."""
        self._by_id[new.plugin_id] = new
        if old.live != new.live:
            self._count_live(new, 1 if new.live else -1)

    def _count_live(self, plugin: Plugin, delta: int) -> None:
        name = plugin.name
        _add(self._live_by_name, name, delta)
        owner = self._owners.get(name)
        if owner is not None:
            _add(self._live_by_principal, owner.principal, delta)
        registration = plugin.registration
        keys: list[ClaimKey] = [("source", s) for s in registration.sources]
        if registration.emitter_key:
            keys.append(("emitter", registration.emitter_key))
        live_holders = self._live_holders
        for key in keys:
            holders = live_holders.get(key)
            if holders is None:
                if delta > 0:
                    live_holders[key] = {name: delta}
                continue
            count = holders.get(name, 0) + delta
            if count:
                holders[name] = count
            elif len(holders) > 1:
                del holders[name]
            else:
                del live_holders[key]  # names long gone hold no memory

    def _set_owner(self, owner: Owner) -> None:
        self._owners[owner.name] = owner
        _add(self._live_by_principal, owner.principal, self._live_by_name.get(owner.name, 0))

    def _drop_owner(self, name: str) -> None:
        owner = self._owners.pop(name)
        _add(self._live_by_principal, owner.principal, -self._live_by_name.get(name, 0))

    def _set_claim(self, claim: Claim) -> None:
        self._claims[(claim.kind, claim.key)] = claim
        self._claims_by_name[claim.plugin_name].add((claim.kind, claim.key))

    def _drop_claim(self, key: ClaimKey) -> None:
        claim = self._claims.pop(key)
        keys = self._claims_by_name[claim.plugin_name]
        keys.discard(key)
        if not keys:
            del self._claims_by_name[claim.plugin_name]


_WHAT: dict[ClaimKind, str] = {"source": "source", "emitter": "emitter name"}


def _claim_keys(registration: Registration) -> Iterator[tuple[str, ClaimKind, str]]:
    """(field, kind, key) of each source, then of the emitter name, as Register names them."""
    for source in registration.sources:
        yield "info.sources", "source", source
    if registration.emitter_key:
        yield "info.emitter_name", "emitter", registration.emitter_key


def _add(counts: dict[str, int], key: str, delta: int) -> None:
    """Add to a count, dropping it at zero so names long gone hold no memory."""
    if not delta:
        return
    value = counts.get(key, 0) + delta
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)
