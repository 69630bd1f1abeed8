"""Sharing decoded plugin states with the ones already in memory.

The stored change log holds whole plugin states (its every entry is a plugin's JSON).
Decoded naively, a restarted registry holds each of them as objects of their own:
10,000 retained changes of 10,000 plugins are 10,000 more registrations, times and
plugins beside the catalogue's, where a registry that made those changes itself
holds one registration per plugin, shared by every state of it (a change makes a
new ``Plugin`` with ``dataclasses.replace``, never a new ``Registration``).

:class:`PluginInterner` gives the decoder that sharing back. A plugin id's
registration never changes (a new source or label is a new registration under a
new id), so every state of one id shares one ``Registration``: the catalogue's when
it holds the id, else the first one decoded. A decoded state equal to the one the
catalogue holds *is* that object, and equal times are one ``datetime``. Equal
values only: what is decoded compares equal to what was stored, whatever is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from registry.model import Plugin, Registration

# The plugin the catalogue holds under an id, if any (``Catalog.get``).
Known = Callable[[str], Plugin | None]


class PluginInterner:
    """Makes decoded plugin states share the objects of equal states already held.

    ``known`` looks a plugin id up in the catalogue; without it, only the states
    decoded by this interner are shared among themselves.
    """

    __slots__ = ("_known", "_seen")

    def __init__(self, known: Known | None = None) -> None:
        self._known = known
        # The last state decoded per id that the catalogue does not hold.
        self._seen: dict[str, Plugin] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def plugin(self, plugin: Plugin) -> Plugin:
        """``plugin`` itself, or an equal plugin made of objects already held."""
        plugin_id = plugin.plugin_id
        held = self._known(plugin_id) if self._known is not None else None
        known = held is not None
        if held is None:
            held = self._seen.get(plugin_id)
            if held is None:
                self._seen[plugin_id] = plugin
                return plugin
        if held == plugin:
            return held
        shared = Plugin(
            plugin_id=held.plugin_id,
            registration=_same(held.registration, plugin.registration),
            status=plugin.status,
            registered_at=(
                held.registered_at
                if held.registered_at == plugin.registered_at
                else plugin.registered_at
            ),
            last_heartbeat_at=_same_time(held.last_heartbeat_at, plugin.last_heartbeat_at),
            last_check_at=_same_time(held.last_check_at, plugin.last_check_at),
            last_error=held.last_error
            if held.last_error == plugin.last_error
            else plugin.last_error,
            revision=plugin.revision,
            status_since=_same_time(held.status_since, plugin.status_since),
        )
        if not known:
            self._seen[plugin_id] = shared
        return shared


def _same(held: Registration, decoded: Registration) -> Registration:
    return held if held == decoded else decoded


def _same_time(held: datetime | None, decoded: datetime | None) -> datetime | None:
    return held if held is not None and held == decoded else decoded
