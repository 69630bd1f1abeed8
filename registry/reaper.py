"""The lease reaper: expires plugins that stopped heartbeating, removes long-dead ones.

A leased plugin whose last heartbeat is older than its TTL becomes EXPIRED. The
registry's own start counts as a heartbeat, so after a restart every lease gets one
full TTL of grace. Plugins UNHEALTHY or EXPIRED for longer than
``deregister_after`` seconds are removed (0 keeps them); that clock too starts
again at a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from registry.errors import RegistryUnavailable
from registry.model import PluginStatus
from registry.state import RegistryState

log = logging.getLogger(__name__)

_DEAD = (PluginStatus.UNHEALTHY, PluginStatus.EXPIRED)


class LeaseReaper:
    """Owned by the server: ``start()``, ``stop()``; ``sweep()`` does one pass."""

    def __init__(self, state: RegistryState, *, deregister_after: float, tick: float = 0.5) -> None:
        self._state = state
        self._deregister_after = deregister_after
        self._tick = tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lease-reaper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)  # a periodic timer, not synchronisation
            try:
                await self.sweep()
            except RegistryUnavailable as exc:
                log.warning("lease sweep not stored: %s", exc)
            except Exception:
                log.exception("lease sweep failed")

    async def sweep(self) -> None:
        """Expire lapsed leases, then remove what has been dead too long."""
        state = self._state
        now = state.clock()
        expired = []
        for plugin in state.catalog:
            ttl = plugin.registration.lease_ttl_seconds
            if not ttl or plugin.status is PluginStatus.EXPIRED:
                continue
            last = max(plugin.last_heartbeat_at or plugin.registered_at, state.started_at)
            if (now - last).total_seconds() > ttl:
                expired.append(
                    dataclasses.replace(
                        plugin,
                        status=PluginStatus.EXPIRED,
                        last_error=f"lease expired: no heartbeat for {ttl}s",
                    )
                )
        if expired:
            await state.update(expired)
        if not self._deregister_after:
            return
        now = state.clock()
        # As with leases, the registry's start resets the clock: a plugin that was
        # dead before a restart gets re-checked before it can be removed.
        doomed = [
            p.plugin_id
            for p in state.catalog
            if p.status in _DEAD
            and (now - max(p.status_since or p.registered_at, state.started_at)).total_seconds()
            > self._deregister_after
        ]
        if doomed:
            log.info("removing %d plugins dead for over %ss", len(doomed), self._deregister_after)
            await state.remove(doomed)
