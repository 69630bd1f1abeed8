"""Cached channels to plugin endpoints: ``channels`` per address, per event loop.

A ``grpc.aio`` channel belongs to the loop it was made on, so a client used from
several loops keeps one pool for each. A pool is only touched from its own loop's
thread. Callers without a loop use :mod:`ingestor.sync_connection` instead (the same
endpoints over synchronous ``grpc`` channels).

An endpoint may get several channels (``channels_per_endpoint``, 1 to 64): each is an
HTTP/2 connection of its own (a subchannel of its own, and a channel argument naming
its slot, so gRPC never shares one between them), made on first use, and calls to the
endpoint take them in turn (round-robin). One HTTP/2 connection is served by one
thread of the plugin's gRPC core at a time; several spread the load of one busy
client. A dropped channel empties its slot, which the next call in turn fills anew.

A pool serves one plugin service (:class:`PluginService`: the ingestor's, or another
plugin type's), calling its unary methods with answers left as bytes.

Every channel is opened through the registry's one door for addresses
(:mod:`registry.trust.dial`): the endpoint is parsed and vetted by the address policy
(a host name resolved) before each new channel, which goes to the vetted IP. A refused
endpoint is a :class:`PluginConnectionError` and nothing is dialled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
# Names a channel's slot among an endpoint's channels: channels whose arguments differ
# never share a subchannel, whatever ``channel_options`` say of the subchannel pool.
_SLOT = "polku.channel_slot"

DEFAULT_CHANNELS_PER_ENDPOINT = 1
MAX_CHANNELS_PER_ENDPOINT = 64


def check_channels_per_endpoint(value: int) -> int:
    """``value`` when it is a valid ``channels_per_endpoint`` (an int from 1 to 64).

    Raises:
        ValueError: it is not, naming ``channels_per_endpoint``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_CHANNELS_PER_ENDPOINT
    ):
        raise ValueError(
            f"channels_per_endpoint must be an integer from 1 to "
            f"{MAX_CHANNELS_PER_ENDPOINT}, not {value!r}"
        )
    return value


def channel_options(
    options: Iterable[tuple[str, int | str]], slot: int = 0
) -> list[tuple[str, int | str]]:
    """The options of every channel to a plugin: the caller's, and a subchannel of its own.

    ``slot``: which of an endpoint's channels it is (the first one's options name none).
    """
    settings: list[tuple[str, int | str]] = [_OWN_SUBCHANNELS, *options]
    if slot:
        settings.append((_SLOT, slot))
    return settings


C = TypeVar("C")


class Slots(Generic[C]):
    """The channels of one endpoint, by slot, and whose turn is next (round-robin).

    Safe to share between threads for :meth:`take` (``itertools.count`` is atomic);
    filling or emptying a slot is the pool's job, under its own rules.
    """

    __slots__ = ("_size", "_turn", "connections")

    def __init__(self, size: int) -> None:
        self.connections: list[C | None] = [None] * size
        self._size = size
        # The call that makes the entry takes slot 0: the turns go on from slot 1.
        self._turn = itertools.count(1)

    def take(self) -> int:
        """The slot whose turn it is."""
        if self._size == 1:
            return 0
        return next(self._turn) % self._size

    def live(self) -> list[C]:
        """The channels made and not dropped."""
        return [c for c in self.connections if c is not None]


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
        self,
        address: str,
        channel: grpc.aio.Channel,
        service: PluginService = INGESTOR_SERVICE,
        slot: int = 0,
    ) -> None:
        self.address = address
        self.channel = channel
        self.rpc = service.bind(channel)
        # Which of its endpoint's channels it is (0 .. channels_per_endpoint - 1).
        self.slot = slot
        self.ready = False
        # Set when this pool dropped it: a call cancelled by its closing was not the caller's.
        self.dropped = False
        # The ingest stream multiplexed on this channel (ingestor.stream), made on first use;
        # it ends with the channel.
        self.stream: object | None = None

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
    """The connections one client holds on one event loop: ``channels`` per address."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dialer: PluginDialer,
        options: Iterable[tuple[str, int | str]] = (),
        service: PluginService = INGESTOR_SERVICE,
        *,
        channels: int = DEFAULT_CHANNELS_PER_ENDPOINT,
    ) -> None:
        self.loop = loop
        self.channels = check_channels_per_endpoint(channels)
        self._dialer = dialer
        self._service = service
        self._options = list(options)
        self._slots: dict[str, Slots[PluginConnection]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def open(self, address: str) -> PluginConnection:
        """The next cached connection to ``address`` in turn; vetted and made (not
        connected) when that slot is empty.

        Raises:
            PluginConnectionError: the address does not parse or the address policy
                refuses it ("address policy" in the message); nothing was dialled.
        Cancellation abandons the vetting (a DNS lookup).
        """
        slots = self._slots.get(address)
        slot = 0
        if slots is not None:
            slot = slots.take()
            connection = slots.connections[slot]
            if connection is not None:
                return connection
        try:
            target = await self._dialer.vet(address)
        except InvalidArgument as exc:  # AddressRefused too
            raise refused(address, exc) from exc
        slots = self._slots.get(address)  # another call may have made it meanwhile
        if slots is None:
            slots = self._slots[address] = Slots(self.channels)
        connection = slots.connections[slot]
        if connection is None:
            channel = self._dialer.open(target, channel_options(self._options, slot))
            connection = PluginConnection(address, channel, self._service, slot)
            slots.connections[slot] = connection
        return connection

    def connections(self, address: str) -> list[PluginConnection]:
        """The connections to ``address`` made so far and not dropped, by slot."""
        slots = self._slots.get(address)
        return [] if slots is None else slots.live()

    def __len__(self) -> int:
        return sum(len(slots.live()) for slots in self._slots.values())

    def drop(self, connection: PluginConnection, grace: float | None) -> None:
        """Forget a connection and close it in the background (calls in flight get ``grace``).

        Only its slot empties: the endpoint's other channels stay.
        """
        slots = self._slots.get(connection.address)
        if slots is not None and slots.connections[connection.slot] is connection:
            slots.connections[connection.slot] = None
            if not slots.live():
                del self._slots[connection.address]
        if connection.dropped:
            return
        connection.dropped = True
        task = self.loop.create_task(connection.close(grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def keep_only(self, addresses: Collection[str], grace: float | None) -> None:
        """Drop every connection whose address is not in ``addresses``."""
        for address, slots in list(self._slots.items()):
            if address not in addresses:
                log.debug("closing the channels to %s: no longer routable", address)
                for connection in slots.live():
                    self.drop(connection, grace)
                self._slots.pop(address, None)

    async def close(self) -> None:
        """Close every connection now (calls in flight are cancelled) and wait for it."""
        everything, self._slots = list(self._slots.values()), {}
        connections = [c for slots in everything for c in slots.live()]
        for connection in connections:
            connection.dropped = True
        closing = [c.close() for c in connections]
        await asyncio.gather(*closing, *self._closing, return_exceptions=True)
