"""One log line per plugin registered, removed or changing status (SPEC §9 "Logs").

On the logger ``registry.transitions``, next to ``registry.audit`` (which says who
asked for a write, SPEC §6), this says what happened to a plugin, whoever caused it
(a client, the health checker, the lease reaper, an operator's drain)::

    plugin registered id=01J… name=lines address=127.0.0.1:7000 new → HEALTHY:
        lease 10s; first check: passed (revision 3)
    plugin status changed id=01J… name=lines address=127.0.0.1:7000 HEALTHY → UNHEALTHY:
        UNAVAILABLE: unreachable, or not a gRPC server (revision 5)
    plugin removed id=01J… name=lines address=127.0.0.1:7000 UNHEALTHY → removed:
        deregister_after: UNHEALTHY for over 300s (revision 9)

(one line each, folded here). A plugin whose first check did not answer within
Register's wait is registered ``new → UNKNOWN: lease 10s``, and its first result is
a status change of its own.
Each line also carries its fields for the JSON format (``extra=``): ``event``
(``registered``, ``status_changed``, ``removed``), ``plugin_id``, ``plugin_name``,
``address``, ``from_status`` and ``to_status`` (``null`` for "new" and "removed"),
``reason`` and ``revision``.

A change does not say why it was made, so the reason is read from the plugin: its
``last_error`` for a failed check or a lapsed lease, "drained"/"undrained" around
DRAINING; a removal of a plugin dead (UNHEALTHY or EXPIRED) for longer than
``deregister_after`` is the reaper's, any other is an unregistration (an operator's
removal within one reaper tick of that deadline is named as the reaper's).

Replicas (SPEC §8): every replica hears every change; the leader, which made it,
logs at INFO, the followers at DEBUG, so a cluster says each change once at INFO.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from registry.model import Change, Plugin, PluginStatus
from registry.state import RegistryState

log = logging.getLogger("registry.transitions")

_DEAD = (PluginStatus.UNHEALTHY, PluginStatus.EXPIRED)
_NEW, _GONE, _UNKNOWN = "new", "removed", "?"


class TransitionLog:
    """A state listener that logs each plugin's transitions: ``subscribe()`` once.

    It keeps the status of every plugin the catalogue holds, to say "from" (the
    listener hears of a change after it was applied). That map follows the
    catalogue, so it is bounded as the catalogue is (``max_plugins``), and it is
    rebuilt from the catalogue whenever the state reloads it.
    """

    def __init__(self, state: RegistryState, *, deregister_after: float) -> None:
        self._state = state
        self._deregister_after = deregister_after
        self._statuses: dict[str, PluginStatus] = {}
        self._revision = 0
        self._reload()

    def subscribe(self) -> None:
        """Start hearing the state's committed changes."""
        self._state.subscribe(self.record, on_reset=self._reload)

    def _reload(self) -> None:
        view = self._state.view
        self._statuses = {p.plugin_id: p.status for p in view}
        self._revision = view.revision

    def record(self, changes: list[Change]) -> None:
        """Log one line per plugin each change registers, removes or changes the status of."""
        if not changes:
            return
        if changes[0].revision != self._revision + 1:
            # The catalogue was loaded under us (a replica that starts as a follower):
            # what it held before this batch is known, but for the plugins it touches.
            touched = {p.plugin_id for c in changes for p in (*c.upserted, *c.removed)}
            self._statuses = {
                p.plugin_id: p.status for p in self._state.view if p.plugin_id not in touched
            }
        level = logging.INFO if self._state.leading else logging.DEBUG
        enabled = log.isEnabledFor(level)
        for change in changes:
            if enabled:
                self._log(change, level)
            for plugin in change.removed:
                self._statuses.pop(plugin.plugin_id, None)
            for plugin in change.upserted:
                self._statuses[plugin.plugin_id] = plugin.status
            self._revision = change.revision

    def _log(self, change: Change, level: int) -> None:
        replaced = {(p.name, p.address): p for p in change.removed}
        successors: dict[str, str] = {}
        for plugin in change.upserted:
            before = self._statuses.get(plugin.plugin_id)
            if before is None and _fresh(plugin, change):
                reason = _lease(plugin) + _first_check(plugin)
                old = replaced.get((plugin.name, plugin.address))
                if old is not None:
                    successors[old.plugin_id] = plugin.plugin_id
                    reason += f"; replaces {old.plugin_id}"
                self._line(level, "registered", plugin, None, plugin.status, reason, change)
            elif before is not plugin.status:
                reason = _status_reason(before, plugin)
                self._line(level, "status_changed", plugin, before, plugin.status, reason, change)
        now = self._state.clock()
        for plugin in change.removed:  # each in its last state
            successor = successors.get(plugin.plugin_id)
            if successor is not None:
                reason = f"replaced by {successor}"
            elif self._reaped(plugin, now):
                dead = plugin.status.name
                reason = f"deregister_after: {dead} for over {self._deregister_after:g}s"
            else:
                reason = "unregistered"
            self._line(level, "removed", plugin, plugin.status, None, reason, change)

    def _reaped(self, plugin: Plugin, now: datetime) -> bool:
        """Whether the reaper removed it: dead for longer than ``deregister_after``."""
        if not self._deregister_after or plugin.status not in _DEAD:
            return False
        since = plugin.status_since or plugin.registered_at
        return since + timedelta(seconds=self._deregister_after) <= now

    @staticmethod
    def _line(
        level: int,
        event: str,
        plugin: Plugin,
        before: PluginStatus | None,
        after: PluginStatus | None,
        reason: str,
        change: Change,
    ) -> None:
        # A status missing from the map (only right after a follower loaded its
        # catalogue) is shown as "?" rather than guessed.
        missing = _NEW if event == "registered" else _UNKNOWN
        shown = before.name if before is not None else missing
        log.log(
            level,
            "plugin %s id=%s name=%s address=%s %s → %s: %s (revision %d)",
            event.replace("_", " "),
            plugin.plugin_id,
            plugin.name,
            plugin.address,
            shown,
            after.name if after is not None else _GONE,
            reason,
            change.revision,
            extra={
                "event": event,
                "plugin_id": plugin.plugin_id,
                "plugin_name": plugin.name,
                "address": plugin.address,
                "from_status": before.name if before is not None else None,
                "to_status": after.name if after is not None else None,
                "reason": reason,
                "revision": change.revision,
            },
        )


def _fresh(plugin: Plugin, change: Change) -> bool:
    """Whether this change made the plugin: in its status since it was registered, by
    this change (UNKNOWN, or what its first check, folded in, made it)."""
    return plugin.revision == change.revision and plugin.status_since in (
        None,
        plugin.registered_at,
    )


def _first_check(plugin: Plugin) -> str:
    """What the first check folded into the registration said, if it was made."""
    if plugin.last_check_at is None:
        return ""
    return f"; first check: {plugin.last_error or 'passed'}"


def _lease(plugin: Plugin) -> str:
    ttl = plugin.registration.lease_ttl_seconds
    return f"lease {ttl}s" if ttl else "no lease"


def _status_reason(before: PluginStatus | None, plugin: Plugin) -> str:
    """Why the status moved, as far as the plugin's new state tells."""
    after = plugin.status
    if after is PluginStatus.DRAINING:
        return "drained"
    if before is PluginStatus.DRAINING:
        return "undrained"
    if after is PluginStatus.HEALTHY:
        return "health check passed"
    if plugin.last_error:
        return plugin.last_error
    if after is PluginStatus.EXPIRED:
        return "lease expired"
    if after is PluginStatus.UNHEALTHY:
        return "health checks failed"
    return "status changed"
