"""Cached channels to plugin endpoints: one per address, per event loop.

A ``grpc.aio`` channel belongs to the loop it was made on, so a client used from
several loops keeps one pool for each. A pool is only touched from its own loop's
thread. Callers without a loop use :mod:`ingestor.sync_connection` instead (the same
endpoints over synchronous ``grpc`` channels).

A pool serves one plugin service (:class:`PluginService`: the ingestor's, or another
plugin type's), calling its unary methods with answers left as bytes.

Every channel is opened through the registry's one door for addresses
(:mod:`registry.trust.dial`): the endpoint is parsed and vetted by the address policy
(a host name resolved) before each new channel, which goes to the vetted IP. A refused
endpoint is a :class:`PluginConnectionError` and nothing is dialled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from ingestor.errors import PluginConnectionError
from registry.errors import InvalidArgument
from registry.trust.addresses import AddressRefused
from registry.trust.dial import PluginDialer
from registry.wire import pb

log = logging.getLogger(__name__)

_READY = grpc.ChannelConnectivity.READY
_FAILED = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


@dataclass(frozen=True, slots=True)
class PluginService:
    """A plugin's gRPC service as this side calls it: its full name, its unary methods.

    ``methods`` maps each method name to its request serializer. Answers are handed
    over as bytes: the client decodes them itself (Ingest's within its limits,
    :mod:`ingestor.answer`), so bytes that do not decode are its own error; gRPC's
    deserializers would log a traceback and hand back None.
    """

    name: str
    methods: Mapping[str, Callable[[Any], bytes]]

    def bind(self, channel: Any) -> dict[str, Any]:
        """The multicallable of each method on ``channel`` (sync or ``grpc.aio``).

        Registered with the channel, as generated stubs do: a registered method skips
        per-call work in gRPC's core (about a tenth of a small call's cost).
        """
        return {
            method: channel.unary_unary(
                f"/{self.name}/{method}",
                request_serializer=serializer,
                _registered_method=True,
            )
            for method, serializer in self.methods.items()
        }


INGESTOR_SERVICE = PluginService(
    "polku.v1.IngestorPlugin",
    {"Ingest": pb.IngestRequest.SerializeToString, "Health": Empty.SerializeToString},
)

# gRPC shares subchannels between channels to one address; a shared one still backing
# off after a failure would make a fresh channel fail at once. Dropping a broken
# channel must mean a fresh connection attempt.
_OWN_SUBCHANNELS = ("grpc.use_local_subchannel_pool", 1)


def channel_options(options: Iterable[tuple[str, int | str]]) -> list[tuple[str, int | str]]:
    """The options of every channel to a plugin: the caller's, and a subchannel of its own."""
    return [_OWN_SUBCHANNELS, *options]


def refused(address: str, exc: InvalidArgument) -> PluginConnectionError:
    """The error for an endpoint the address policy refuses (or that does not parse)."""
    if isinstance(exc, AddressRefused):
        why = exc.why
    else:
        why = f"not a valid plugin address: {exc.reason}"
    return PluginConnectionError(
        f"not dialling plugin at {address}: refused by the address policy ({why})",
        address=address,
    )


class PluginConnection:
    """A channel to one endpoint's plugin service; connects lazily.

    ``rpc`` maps each of the service's methods to its multicallable; a call answers
    the encoded response (bytes), for the caller to decode.
    """

    def __init__(
        self, address: str, channel: grpc.aio.Channel, service: PluginService = INGESTOR_SERVICE
    ) -> None:
        self.address = address
        self.channel = channel
        self.rpc = service.bind(channel)
        self.ready = False
        # Set when this pool dropped it: a call cancelled by its closing was not the caller's.
        self.dropped = False

    async def connect(self, timeout: float) -> None:  # noqa: ASYNC109 (maps to our error)
        """Wait until the channel is READY (once; later calls return at once).

        Raises:
            PluginConnectionError: the connection attempt failed (e.g. refused), or was
                not READY within ``timeout`` seconds.
        Cancellation abandons the wait; the channel stays usable.
        """
        if self.ready:
            return
        try:
            async with asyncio.timeout(timeout):
                state = self.channel.get_state(try_to_connect=True)
                while state is not _READY:
                    if state in (_FAILED, _SHUTDOWN):
                        raise PluginConnectionError(
                            f"cannot connect to plugin at {self.address} ({state.name})",
                            address=self.address,
                        )
                    await self.channel.wait_for_state_change(state)
                    state = self.channel.get_state(try_to_connect=True)
        except TimeoutError as exc:
            raise PluginConnectionError(
                f"cannot connect to plugin at {self.address}: not ready within {timeout:g} s",
                address=self.address,
            ) from exc
        self.ready = True

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls in flight get up to ``grace`` seconds to finish."""
        await self.channel.close(grace)


class ConnectionPool:
    """The connections one client holds on one event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dialer: PluginDialer,
        options: Iterable[tuple[str, int | str]] = (),
        service: PluginService = INGESTOR_SERVICE,
    ) -> None:
        self.loop = loop
        self._dialer = dialer
        self._service = service
        self._options = channel_options(options)
        self._connections: dict[str, PluginConnection] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def open(self, address: str) -> PluginConnection:
        """The cached connection to ``address``; vetted and made (not connected) when missing.

        Raises:
            PluginConnectionError: the address does not parse or the address policy
                refuses it ("address policy" in the message); nothing was dialled.
        Cancellation abandons the vetting (a DNS lookup).
        """
        connection = self._connections.get(address)
        if connection is not None:
            return connection
        try:
            target = await self._dialer.vet(address)
        except InvalidArgument as exc:  # AddressRefused too
            raise refused(address, exc) from exc
        connection = self._connections.get(address)  # another call may have made it meanwhile
        if connection is None:
            channel = self._dialer.open(target, self._options)
            connection = PluginConnection(address, channel, self._service)
            self._connections[address] = connection
        return connection

    def __len__(self) -> int:
        return len(self._connections)

    def drop(self, connection: PluginConnection, grace: float | None) -> None:
        """Forget a connection and close it in the background (calls in flight get ``grace``)."""
        if self._connections.get(connection.address) is connection:
            del self._connections[connection.address]
        if connection.dropped:
            return
        connection.dropped = True
        task = self.loop.create_task(connection.close(grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def keep_only(self, addresses: Collection[str], grace: float | None) -> None:
        """Drop every connection whose address is not in ``addresses``."""
        for address, connection in list(self._connections.items()):
            if address not in addresses:
                log.debug("closing the channel to %s: no longer routable", address)
                self.drop(connection, grace)

    async def close(self) -> None:
        """Close every connection now (calls in flight are cancelled) and wait for it."""
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            connection.dropped = True
        closing = [c.close() for c in connections]
        await asyncio.gather(*closing, *self._closing, return_exceptions=True)
