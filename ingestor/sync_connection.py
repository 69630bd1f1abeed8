"""Synchronous channels to plugin endpoints, for callers without an event loop.

    pool = SyncPool(dialer, options)
    connection = pool.open(address)          # vetted, made (not connected) when missing
    connection.connect(timeout)              # once; PluginConnectionError on failure
    raw = connection.call("Ingest", request, timeout)

The twin of :mod:`ingestor.connection` on ``grpc.Channel``: the same endpoints, the same
vetting by the address policy, the same target, credentials and options (the receive
limit among them), ``channels`` per address taken in turn (each an HTTP/2 connection of
its own, as there). A call runs on the caller's thread, with
no hand-off to another. A pool is thread-safe: any number of threads call through it.

Vetting is the one asynchronous step (a host name is resolved by the dialer's async
``HostResolver``): it runs on the package's private loop (:mod:`ingestor._loop`), once
per new channel, never per call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable
from typing import Any

import grpc

from ingestor import _loop
from ingestor.connection import (
    DEFAULT_CHANNELS_PER_ENDPOINT,
    INGESTOR_SERVICE,
    PluginService,
    Slots,
    channel_options,
    check_channels_per_endpoint,
    refused,
)
from ingestor.errors import PluginConnectionError, PluginError
from registry.errors import InvalidArgument
from registry.trust.addresses import DialTarget
from registry.trust.dial import PluginDialer, sync_plugin_channel

log = logging.getLogger(__name__)

_READY = grpc.ChannelConnectivity.READY
_ENDED = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


class SyncConnection:
    """A synchronous channel to one endpoint's plugin service; connects lazily.

    ``rpc`` maps each method of the service to its multicallable (answers are bytes).
    Dropped by its pool, the channel is closed once no call runs on it any more.
    """

    def __init__(
        self,
        address: str,
        channel: grpc.Channel,
        service: PluginService = INGESTOR_SERVICE,
        slot: int = 0,
    ) -> None:
        self.address = address
        self.channel = channel
        self.rpc = service.bind(channel)
        # Which of its endpoint's channels it is (0 .. channels_per_endpoint - 1).
        self.slot = slot
        self.ready = False
        # Set when its pool dropped it: a call cancelled by its closing was not the caller's.
        self.dropped = False
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._calls = 0
        self._watching = 0
        self._closed = False
        self._close_pending = False
        self._failed: str | None = None

    def connect(self, timeout: float) -> None:
        """Wait until the channel is READY (once; later calls return at once).

        One thread watches the channel, once; the others wait for its outcome (a
        failed watch fails them too: the pool drops the connection). gRPC's watcher
        thread would touch a closed channel, so it is not closed while watched (the
        closing waits for the watch to end, at most ``timeout``), and a second watch,
        which would keep that thread polling, never starts.

        Raises:
            PluginConnectionError: the connection attempt failed (e.g. refused), or was
                not READY within ``timeout`` seconds, or the channel was closed.
        """
        if self.ready:
            return
        with self._lock:
            if self._closed:
                raise self._gone()
            self._watching += 1
        try:
            if not self._connect_lock.acquire(timeout=timeout):
                raise self._not_ready(timeout)
            try:
                if self._failed is not None:  # watched once and failed: never twice
                    raise PluginConnectionError(self._failed, address=self.address)
                if not self.ready:
                    try:
                        self._watch(timeout)
                    except PluginConnectionError as exc:
                        self._failed = str(exc)
                        raise
            finally:
                self._connect_lock.release()
        finally:
            with self._lock:
                self._watching -= 1
                close = self._watching == 0 and self._close_pending
            if close:
                self.channel.close()

    def _watch(self, timeout: float) -> None:
        seen: list[grpc.ChannelConnectivity] = []
        settled = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state is _READY or state in _ENDED:
                seen.append(state)
                settled.set()

        self.channel.subscribe(watch, try_to_connect=True)
        try:
            if not settled.wait(timeout):
                raise self._not_ready(timeout)
        finally:
            self.channel.unsubscribe(watch)
        if seen[0] is not _READY:
            raise PluginConnectionError(
                f"cannot connect to plugin at {self.address} ({seen[0].name})",
                address=self.address,
            )
        self.ready = True

    def _not_ready(self, timeout: float) -> PluginConnectionError:
        return PluginConnectionError(
            f"cannot connect to plugin at {self.address}: not ready within {timeout:g} s",
            address=self.address,
        )

    def _gone(self) -> PluginConnectionError:
        return PluginConnectionError(
            f"the channel to plugin at {self.address} was closed", address=self.address
        )

    def call(self, method: str, request: Any, timeout: float) -> bytes:
        """One unary call of ``method``; the encoded answer.

        Raises:
            grpc.RpcError: the call failed (a ``grpc.Call``: ``code()``, ``details()``).
            PluginConnectionError: the channel was closed before the call began (its
                endpoint went away meanwhile): another instance may be tried.
        """
        with self._lock:
            if self._closed:  # dropped and closed after the caller took it from the pool
                raise self._gone()
            self._calls += 1
        try:
            raw: bytes = self.rpc[method](request, timeout=timeout)
            return raw
        finally:
            with self._lock:
                self._calls -= 1
                idle = self._calls == 0 and self.dropped
            if idle:
                self.close()

    def retire(self) -> None:
        """Mark it dropped; close it now when no call runs on it, else after the last."""
        with self._lock:
            self.dropped = True
            idle = self._calls == 0
        if idle:
            self.close()

    def close(self) -> None:
        """Close the channel now (calls in flight are cancelled). Idempotent.

        While a connect watches it, the closing is left to that connect's end.
        """
        with self._lock:
            self.dropped = True
            if self._closed:
                return
            self._closed = True
            if self._watching:
                self._close_pending = True
                return
        self.channel.close()


class SyncPool:
    """The synchronous connections one client holds: ``channels`` per address, any thread.

    ``connect_timeout`` bounds the vetting of a new endpoint (a name's lookup).
    """

    def __init__(
        self,
        dialer: PluginDialer,
        options: Iterable[tuple[str, int | str]] = (),
        service: PluginService = INGESTOR_SERVICE,
        *,
        connect_timeout: float = 5.0,
        channels: int = DEFAULT_CHANNELS_PER_ENDPOINT,
    ) -> None:
        self.channels = check_channels_per_endpoint(channels)
        self._dialer = dialer
        self._service = service
        self._options = list(options)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._slots: dict[str, Slots[SyncConnection]] = {}
        self._closed = False

    def open(self, address: str) -> SyncConnection:
        """The next cached connection to ``address`` in turn; vetted and made (not
        connected) when that slot is empty.

        Raises:
            PluginConnectionError: the address does not parse or the address policy
                refuses it ("address policy" in the message); nothing was dialled.
            PluginError: the pool is closed.
        """
        slots = self._slots.get(address)
        slot = 0
        if slots is not None:
            slot = slots.take()
            connection = slots.connections[slot]
            if connection is not None:
                return connection
        target = self._vet(address)
        with self._lock:
            if self._closed:
                raise PluginError("the client is closed")
            slots = self._slots.get(address)  # another thread may have made it
            if slots is None:
                slots = self._slots[address] = Slots(self.channels)
            connection = slots.connections[slot]
            if connection is None:
                options = channel_options(self._options, slot)
                channel = sync_plugin_channel(target, self._dialer.credentials, options)
                connection = SyncConnection(address, channel, self._service, slot)
                slots.connections[slot] = connection
            return connection

    def _vet(self, address: str) -> DialTarget:
        try:
            return _loop.run_sync(
                lambda: self._dialer.vet(address),
                timeout=self._connect_timeout,
                what="vetting a plugin address",
                instead="the async API",
            )
        except InvalidArgument as exc:  # AddressRefused too
            raise refused(address, exc) from exc

    def connections(self, address: str) -> list[SyncConnection]:
        """The connections to ``address`` made so far and not dropped, by slot."""
        with self._lock:
            slots = self._slots.get(address)
            return [] if slots is None else slots.live()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(slots.live()) for slots in self._slots.values())

    def drop(self, connection: SyncConnection, grace: float | None = None) -> None:
        """Forget a connection; it closes once the calls on it are done.

        Only its slot empties: the endpoint's other channels stay. ``grace`` is
        accepted for the async pool's signature: calls in flight carry their own
        deadline, which bounds how long the channel stays open.
        """
        with self._lock:
            slots = self._slots.get(connection.address)
            if slots is not None and slots.connections[connection.slot] is connection:
                slots.connections[connection.slot] = None
                if not slots.live():
                    del self._slots[connection.address]
        connection.retire()

    def keep_only(self, addresses: Collection[str], grace: float | None = None) -> None:
        """Drop every connection whose address is not in ``addresses``."""
        with self._lock:
            gone = [a for a in self._slots if a not in addresses]
            connections = [c for a in gone for c in self._slots.pop(a).live()]
        for connection in connections:
            log.debug("closing a channel to %s: no longer routable", connection.address)
            connection.retire()

    def close(self) -> None:
        """Close every connection now (calls in flight are cancelled); refuse new ones."""
        with self._lock:
            self._closed = True
            everything, self._slots = list(self._slots.values()), {}
        for slots in everything:
            for connection in slots.live():
                connection.close()
