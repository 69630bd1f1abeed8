"""The in-memory index of every registered plugin, and the rules that change it.

Synchronous and free of I/O: each method checks, applies and returns the
:class:`~registry.model.Change` it made, or raises before touching anything.
:mod:`registry.state` keeps two: the write side, where the rules are checked and
changes are applied at once, and the committed view that reads (list, get,
resolve, watch snapshots) are served from, which :meth:`Catalog.apply` advances
as changes become durable.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from registry.errors import AlreadyExists
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.ulid import new_ulid


class Catalog:
    """Current plugins by id, with indexes by (name, address), source and emitter name."""

    def __init__(self, plugins: Iterable[Plugin] = (), revision: int = 0) -> None:
        self.revision = revision
        self._by_id: dict[str, Plugin] = {}
        self._by_instance: dict[tuple[str, str], str] = {}
        self._by_source: defaultdict[str, set[str]] = defaultdict(set)
        self._by_emitter: defaultdict[str, set[str]] = defaultdict(set)
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
        return [self._by_id[i] for i in sorted(self._by_source.get(source, ()))]

    def by_emitter(self, emitter_name: str) -> list[Plugin]:
        return [self._by_id[i] for i in sorted(self._by_emitter.get(emitter_name, ()))]

    def select(
        self,
        *,
        type: PluginType = PluginType.UNSPECIFIED,
        source: str = "",
        statuses: frozenset[PluginStatus] = frozenset(),
        name: str = "",
        after: str = "",
    ) -> Iterator[Plugin]:
        """Plugins matching every filter given, in id order, starting after ``after``."""
        candidates = self.by_source(source) if source else sorted(self._by_id.values(), key=_id)
        for plugin in candidates:
            if plugin.plugin_id <= after:
                continue
            if type and plugin.registration.type != type:
                continue
            if statuses and plugin.status not in statuses:
                continue
            if name and plugin.name != name:
                continue
            yield plugin

    # -- writes --------------------------------------------------------------

    def register(self, registration: Registration, now: datetime) -> tuple[Plugin, Change]:
        """Add an instance under a fresh id, replacing the one at the same (name, address).

        Raises:
            AlreadyExists: a source or the emitter name belongs to another plugin name
                that has a live instance.
        """
        self._check_ownership(registration)
        replaced_id = self._by_instance.get((registration.name, registration.address))
        replaced = self._by_id[replaced_id] if replaced_id is not None else None
        plugin = Plugin(
            plugin_id=new_ulid(),
            registration=registration,
            status=PluginStatus.UNKNOWN,
            registered_at=now,
            last_heartbeat_at=now if registration.lease_ttl_seconds else None,
            revision=self.revision + 1,
            status_since=now,
        )
        if replaced is not None:
            self._unindex(replaced)
        self._index(plugin)
        return plugin, self._bump(upserted=(plugin,), removed=(replaced,) if replaced else ())

    def heartbeat(self, plugin_id: str, now: datetime) -> Plugin | None:
        """Renew a live lease; None when the id is unknown, replaced, reaped or expired.

        Changes no revision: a heartbeat that changes nothing pushes nothing.
        """
        plugin = self._by_id.get(plugin_id)
        if plugin is None or not plugin.live:
            return None
        return self.touch(plugin_id, last_heartbeat_at=now)

    def touch(self, plugin_id: str, **fields: object) -> Plugin | None:
        """Change fields no watcher needs to hear of (times, last error): no revision."""
        plugin = self._by_id.get(plugin_id)
        if plugin is None:
            return None
        touched = dataclasses.replace(plugin, **fields)  # type: ignore[arg-type]
        self._by_id[plugin_id] = touched
        return touched

    def remove(self, plugin_ids: Iterable[str]) -> Change | None:
        """Remove plugins by id; unknown ids are ignored (removal is idempotent)."""
        removed = tuple(self._by_id[i] for i in dict.fromkeys(plugin_ids) if i in self._by_id)
        if not removed:
            return None
        for plugin in removed:
            self._unindex(plugin)
        return self._bump(removed=removed)

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
            self._by_id[plugin.plugin_id] = plugin
        return self._bump(upserted=updated)

    def apply(self, change: Change) -> None:
        """Replay a change made elsewhere (on the write side), without checking rules."""
        for plugin in change.removed:
            if plugin.plugin_id in self._by_id:
                self._unindex(self._by_id[plugin.plugin_id])
        for plugin in change.upserted:
            if plugin.plugin_id in self._by_id:
                self._unindex(self._by_id[plugin.plugin_id])
            self._index(plugin)
        self.revision = change.revision

    # -- internals -----------------------------------------------------------

    def _bump(self, upserted: tuple[Plugin, ...] = (), removed: tuple[Plugin, ...] = ()) -> Change:
        self.revision += 1
        return Change(self.revision, upserted, removed)

    def _check_ownership(self, registration: Registration) -> None:
        claims: list[tuple[str, str, Callable[[str], list[Plugin]]]] = [
            ("info.sources", s, self.by_source) for s in registration.sources
        ]
        if registration.emitter_key:
            claims.append(("info.emitter_name", registration.emitter_key, self.by_emitter))
        for field, key, owners in claims:
            for owner in owners(key):
                if owner.live and owner.name != registration.name:
                    what = "source" if field == "info.sources" else "emitter name"
                    raise AlreadyExists(
                        f"{field}: {what} {key!r} belongs to plugin {owner.name!r} "
                        f"(live instance {owner.plugin_id} at {owner.address})"
                    )

    def _index(self, plugin: Plugin) -> None:
        self._by_id[plugin.plugin_id] = plugin
        self._by_instance[(plugin.name, plugin.address)] = plugin.plugin_id
        for source in plugin.registration.sources:
            self._by_source[source].add(plugin.plugin_id)
        if plugin.registration.emitter_key:
            self._by_emitter[plugin.registration.emitter_key].add(plugin.plugin_id)

    def _unindex(self, plugin: Plugin) -> None:
        del self._by_id[plugin.plugin_id]
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


def _id(plugin: Plugin) -> str:
    return plugin.plugin_id
