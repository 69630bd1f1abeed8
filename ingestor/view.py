"""The resolver's picture of the registry: immutable, rebuilt on every Watch message.

A view is replaced, never changed, so any thread may read the one it holds while the
resolver builds the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from registry.wire import pb

HEALTHY = pb.PLUGIN_STATUS_HEALTHY
EMITTER = pb.PLUGIN_TYPE_EMITTER


def emitter_key(plugin: pb.RegisteredPlugin) -> str:
    """The emitter name a plugin is resolved by (its ``emitter_name``, else its name); "" if none.

    The registry's rule (``Registration.emitter_key``): only emitters have one.
    """
    info = plugin.info
    return (info.emitter_name or info.name) if info.type == EMITTER else ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One routable instance of a plugin: where to send a source's payloads."""

    address: str
    plugin_id: str = ""
    name: str = ""

    def label(self) -> str:
        """How logs and errors name it: ``name@address``, or the address alone."""
        return f"{self.name}@{self.address}" if self.name else self.address


@dataclass(frozen=True, slots=True)
class ResolverView:
    """Every plugin the registry reported, and the HEALTHY endpoints of each source.

    ``plugins`` maps plugin id to its latest ``RegisteredPlugin`` (any status);
    ``members`` maps each declared source to the ids of the plugins declaring it;
    ``routes`` maps each source to its routable endpoints, sorted by plugin id;
    ``emitters`` and ``emitter_routes`` are the same two for emitter names
    (:func:`emitter_key`).
    """

    revision: int = 0
    plugins: Mapping[str, pb.RegisteredPlugin] = field(default_factory=dict)
    members: Mapping[str, frozenset[str]] = field(default_factory=dict)
    routes: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    emitters: Mapping[str, frozenset[str]] = field(default_factory=dict)
    emitter_routes: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)

    def emitter_endpoints(self, emitter_name: str) -> tuple[Endpoint, ...]:
        """The routable endpoints of the emitter ``emitter_name``; empty when none is HEALTHY."""
        return self.emitter_routes.get(emitter_name, ())

    def declares_emitter(self, emitter_name: str) -> bool:
        """Whether any registered plugin (any status) is the emitter ``emitter_name``."""
        return bool(self.emitters.get(emitter_name))

    def emitter_names(self) -> frozenset[str]:
        """Every emitter name some registered plugin has."""
        return frozenset(self.emitters)

    def endpoints(self, source: str) -> tuple[Endpoint, ...]:
        """The routable endpoints of ``source``; empty when none is HEALTHY."""
        return self.routes.get(source, ())

    def declares(self, source: str) -> bool:
        """Whether any registered plugin (any status) declares ``source``."""
        return bool(self.members.get(source))

    def sources(self) -> frozenset[str]:
        """Every source some registered plugin declares."""
        return frozenset(self.members)

    @classmethod
    def snapshot(cls, revision: int, plugins: Iterable[pb.RegisteredPlugin]) -> ResolverView:
        """A view holding exactly ``plugins``."""
        return cls(revision=revision).apply(revision, plugins, (), replace_all=True)

    def apply(
        self,
        revision: int,
        upserted: Iterable[pb.RegisteredPlugin],
        removed: Iterable[str],
        *,
        replace_all: bool = False,
    ) -> ResolverView:
        """The view after one Watch message; only the sources it touches are rebuilt."""
        plugins = {} if replace_all else dict(self.plugins)
        members = {} if replace_all else dict(self.members)
        touched: set[str] = set(self.members) if replace_all else set()
        emitters = {} if replace_all else dict(self.emitters)
        touched_emitters: set[str] = set(self.emitters) if replace_all else set()

        def forget(plugin: pb.RegisteredPlugin) -> None:
            for source in plugin.info.sources:
                touched.add(source)
                ids = members.get(source, frozenset()) - {plugin.plugin_id}
                if ids:
                    members[source] = ids
                else:
                    members.pop(source, None)
            key = emitter_key(plugin)
            if key:
                touched_emitters.add(key)
                ids = emitters.get(key, frozenset()) - {plugin.plugin_id}
                if ids:
                    emitters[key] = ids
                else:
                    emitters.pop(key, None)

        for plugin_id in removed:
            old = plugins.pop(plugin_id, None)
            if old is not None:
                forget(old)
        for plugin in upserted:
            old = plugins.get(plugin.plugin_id)
            if old is not None:
                forget(old)
            plugins[plugin.plugin_id] = plugin
            for source in plugin.info.sources:
                touched.add(source)
                members[source] = members.get(source, frozenset()) | {plugin.plugin_id}
            key = emitter_key(plugin)
            if key:
                touched_emitters.add(key)
                emitters[key] = emitters.get(key, frozenset()) | {plugin.plugin_id}

        routes = {} if replace_all else dict(self.routes)
        _reroute(routes, touched, members, plugins)
        emitter_routes = {} if replace_all else dict(self.emitter_routes)
        _reroute(emitter_routes, touched_emitters, emitters, plugins)
        return ResolverView(
            revision=max(revision, 0 if replace_all else self.revision),
            plugins=plugins,
            members=members,
            routes=routes,
            emitters=emitters,
            emitter_routes=emitter_routes,
        )

    def at(self, revision: int) -> ResolverView:
        """The same contents, confirmed current at ``revision`` (a progress message)."""
        return self if revision <= self.revision else replace(self, revision=revision)


def _reroute(
    routes: dict[str, tuple[Endpoint, ...]],
    keys: Iterable[str],
    members: Mapping[str, frozenset[str]],
    plugins: Mapping[str, pb.RegisteredPlugin],
) -> None:
    """Rebuild the routable endpoints of each of ``keys`` (a source or an emitter name)."""
    for key in keys:
        live = tuple(
            Endpoint(address=p.address, plugin_id=p.plugin_id, name=p.info.name)
            for p in sorted((plugins[i] for i in members.get(key, ())), key=lambda p: p.plugin_id)
            if p.status == HEALTHY
        )
        if live:
            routes[key] = live
        else:
            routes.pop(key, None)
