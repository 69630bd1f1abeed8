"""Streaming ingest (SPEC §10): many ``ingest_async`` callers on a few streams per channel.

    stream = ingest_stream(connection, max_in_flight=64, streams=16)  # made on first use
    if await stream.offered(known, timeout):               # the plugin serves IngestorStream
        raw = await stream.call(request, timeout)          # bytes, for the caller to decode

A plugin offers ``polku.v1.IngestorStream`` by the capability ``ingest.stream.v1`` in
its ``PluginInfo``. The gateway learns it from the resolver's view for a resolved
endpoint (``known``), and for a static address by asking the plugin's ``Info`` once per
channel (a new channel asks again: the plugin behind an address may have been replaced).
A stream refused before its first answer (UNIMPLEMENTED: a plugin that advertises what
it does not serve; or any other status but a transport one, as gRPC reports writes that
race an UNIMPLEMENTED as INTERNAL) makes that channel unary for good, and what was sent
on it is resent unary (nothing on it was answered).

Up to ``streams`` streams per channel, each a call of its own on the channel's one
connection. Each stream's answers are matched to its requests in order: a FIFO of
pending answers, appended to by the stream's writer task in the order it writes,
popped by its reader task in the order answers come. A request goes to the open stream
with the fewest requests on it; a new stream is opened only when every open one has
some and the plugin has answered on one (a plugin that refuses the stream is tried
once), so a quiet channel has one stream and a busy one spreads over all of them. Why
several: gRPC Python writes one message of a call at a time, and each write and read
is a round trip through its completion queue; spread over several calls, the writes
overlap and each wake-up of either side's loop handles many messages
(bench/stream_bench.py measures it). At most ``max_in_flight`` requests are on a
stream (sent or queued to be) at once, ``streams * max_in_flight`` on the channel;
more callers wait for a slot (backpressure).

What the caller of :meth:`IngestStream.call` sees, so that
:class:`~ingestor.plugin_client.PluginClient` treats it as it treats a unary call:

- the answer's bytes;
- ``grpc.aio.AioRpcError`` DEADLINE_EXCEEDED: no answer within the request's timeout
  (slot wait included). Its slot stays taken until the answer comes, which is then
  discarded (order is kept: the answer is popped, just not handed to anyone);
- ``grpc.aio.AioRpcError`` UNAVAILABLE: the stream broke (the plugin died, the channel
  closed, the plugin ended the stream, failed it once it had answered, or answered more
  than asked) before this request was answered. Every unanswered request gets it, so
  each is retried on another instance (Ingest is a pure transform: safe); the next call
  opens a new stream;
- ``grpc.aio.AioRpcError`` RESOURCE_EXHAUSTED (this side's receive limit): for the one
  request whose answer was too large, as on the unary path;
- :class:`Resend`: the request was not answered and the channel is fine (the stream was
  refused, or an earlier answer on it was too large, which ends a stream in gRPC):
  send it unary on the same channel.

Thread rules: a stream, like its channel, belongs to one event loop; every method is
called on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError

from ingestor.connection import PluginConnection
from ingestor.failures import TRANSPORT_CODES, Failure, judge
from registry.wire import pb

log = logging.getLogger(__name__)

STREAM_CAPABILITY = "ingest.stream.v1"
DEFAULT_STREAM_IN_FLIGHT = 64
MAX_STREAM_IN_FLIGHT = 4096
DEFAULT_STREAMS_PER_CHANNEL = 16
MAX_STREAMS_PER_CHANNEL = 64

_STREAM_METHOD = "/polku.v1.IngestorStream/IngestStream"
_INFO_METHOD = "/polku.v1.IngestorPlugin/Info"
# How long a failed write waits for the reader to see the call's status.
_STATUS_WAIT = 1.0


class Resend(Exception):
    """The request was never processed on the stream and the channel is fine: send it unary."""


def check_stream_in_flight(value: int) -> int:
    """``value`` when it is a valid ``stream_in_flight`` (an int from 1 to 4096).

    Raises:
        ValueError: it is not, naming ``stream_in_flight``.
    """
    return _checked_count("stream_in_flight", value, MAX_STREAM_IN_FLIGHT)


def check_streams_per_channel(value: int) -> int:
    """``value`` when it is a valid ``streams_per_channel`` (an int from 1 to 64).

    Raises:
        ValueError: it is not, naming ``streams_per_channel``.
    """
    return _checked_count("streams_per_channel", value, MAX_STREAMS_PER_CHANNEL)


def _checked_count(name: str, value: int, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not 1 <= value <= most:
        raise ValueError(f"{name} must be an integer from 1 to {most}, not {value}")
    return value


def ingest_stream(
    connection: PluginConnection, *, max_in_flight: int, streams: int = 1
) -> IngestStream:
    """The ingest streams of ``connection``'s channel; made (not opened) on first use."""
    stream = connection.stream
    if stream is None:
        stream = connection.stream = IngestStream(
            connection, max_in_flight=max_in_flight, streams=streams
        )
    assert isinstance(stream, IngestStream)
    return stream


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error as a failed call raises it, for the caller's one way of judging failures."""
    error: grpc.aio.AioRpcError = grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details
    )
    return error


@dataclass(slots=True)
class _Pending:
    request: pb.IngestRequest
    answer: asyncio.Future[bytes]


class IngestStream:
    """The ingest streams of one channel: its callers multiplexed, each answered in order.

    The first :meth:`call` opens a stream, and so does a call that finds every open
    stream busy while fewer than ``streams`` are open; a broken stream is dropped (the
    next call opens another).
    """

    def __init__(
        self, connection: PluginConnection, *, max_in_flight: int, streams: int = 1
    ) -> None:
        self.address = connection.address
        self.max_in_flight = check_stream_in_flight(max_in_flight)
        self.streams = check_streams_per_channel(streams)
        channel = connection.channel
        self._method = channel.stream_stream(
            _STREAM_METHOD,
            request_serializer=pb.IngestRequest.SerializeToString,
            _registered_method=True,
        )
        self._info = channel.unary_unary(
            _INFO_METHOD, request_serializer=Empty.SerializeToString, _registered_method=True
        )
        self._slots = asyncio.Semaphore(self.max_in_flight * self.streams)
        self._open: list[_Open] = []
        self.served = False  # a stream of this channel has been answered on
        self._offered: bool | None = None  # learned from Info (a static address)
        self._asking: asyncio.Future[bool] | None = None
        self.unsupported = False  # the stream was refused: unary on this channel for good

    async def offered(self, known: bool | None, timeout: float) -> bool:  # noqa: ASYNC109
        """Whether to send over the stream: ``known`` (the resolver's view), else ``Info``.

        ``Info`` is asked once per channel, by one caller for all; an answer that is not
        a ``PluginInfo`` or an error status means unary for good on this channel, a
        transport failure means unary for this call (the unary call then reports it).
        Never raises but on cancellation.
        """
        if self.unsupported:
            return False
        if known is not None:
            return known
        if self._offered is not None:
            return self._offered
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask(timeout))
        return await asyncio.shield(self._asking)

    async def _ask(self, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            raw: bytes = await self._info(Empty(), timeout=timeout)
            offered = STREAM_CAPABILITY in pb.PluginInfo.FromString(raw).capabilities
        except grpc.aio.AioRpcError as exc:
            self._asking = None
            if exc.code() in TRANSPORT_CODES:
                return False  # asked again by the next call
            log.info("plugin at %s answered Info %s: unary Ingest", self.address, exc.code().name)
            offered = False
        except DecodeError:
            log.info("plugin at %s answered Info with no PluginInfo: unary Ingest", self.address)
            offered = False
        except Exception:
            self._asking = None
            log.warning("asking plugin at %s for its Info failed", self.address, exc_info=True)
            return False
        self._offered = offered
        log.debug(
            "plugin at %s %s the ingest stream", self.address, "offers" if offered else "lacks"
        )
        return offered

    async def call(self, request: pb.IngestRequest, timeout: float) -> bytes:  # noqa: ASYNC109
        """Send ``request`` on the stream and wait for its answer (bytes).

        Raises:
            grpc.aio.AioRpcError: DEADLINE_EXCEEDED after ``timeout`` seconds (waiting for
                a slot included); UNAVAILABLE, the stream broke first; RESOURCE_EXHAUSTED,
                its answer was over the receive limit (see the module docstring).
            Resend: send it unary instead (the stream is not served, or was ended by an
                earlier answer over the receive limit).
        Cancellation gives up on the answer (it is discarded when it comes).
        """
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
                try:
                    stream = self._pick()
                    entry = _Pending(request, asyncio.get_running_loop().create_future())
                except BaseException:
                    self._slots.release()
                    raise
                stream.send(entry)  # the stream owns the slot from here
                return await entry.answer
        except TimeoutError as exc:
            raise _rpc_error(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer on the ingest stream within {timeout:g} s",
            ) from exc

    def _pick(self) -> _Open:
        """The open stream with the fewest requests; a new one if all have some and may."""
        if self.unsupported:
            raise Resend(f"plugin at {self.address} does not serve {_STREAM_METHOD}")
        opened = self._open
        stream = min(opened, key=_owned) if opened else None
        # A free slot means some stream has room: the fullest one is never picked.
        if stream is None or (stream.owned and self.served and len(opened) < self.streams):
            stream = _Open(self, self._method(), self._slots)
            opened.append(stream)
            log.debug("opened an ingest stream to %s (%d open)", self.address, len(opened))
        return stream

    def open_streams(self) -> int:
        """How many streams are open on the channel now."""
        return len(self._open)

    def _ended(self, stream: _Open, why: BaseException, *, unsupported: bool) -> None:
        if stream in self._open:
            self._open.remove(stream)
        if unsupported and not self.unsupported:
            self.unsupported = True
            log.info(
                "plugin at %s does not serve %s (%s): unary Ingest on this channel",
                self.address,
                _STREAM_METHOD,
                why,
            )


class _Open:
    """One open ``IngestStream`` call with its writer and reader tasks."""

    def __init__(
        self, owner: IngestStream, call: grpc.aio.StreamStreamCall, slots: asyncio.Semaphore
    ) -> None:
        self._owner = owner
        self._call = call
        self._slots = slots
        self._outbox: asyncio.Queue[_Pending] = asyncio.Queue()  # bounded by the slots
        self._pending: deque[_Pending] = deque()  # written, answers awaited, in order
        self.owned = 0  # requests sent or queued on it, their slots held
        self._ended = False
        # Set by the first answer: the plugin serves the stream (see _ended_with).
        self._served = False
        self._writer = asyncio.ensure_future(self._write())
        self._reader = asyncio.ensure_future(self._read())

    def send(self, entry: _Pending) -> None:
        self.owned += 1
        self._outbox.put_nowait(entry)

    def _release(self) -> None:
        self.owned -= 1
        self._slots.release()

    async def _write(self) -> None:
        """Write queued requests in order, each appended to the FIFO before it goes out."""
        try:
            while True:
                entry = await self._outbox.get()
                if entry.answer.done():  # its caller gave up before it was sent
                    self._release()
                    continue
                self._pending.append(entry)
                await self._call.write(entry.request)
        except asyncio.CancelledError:
            if self._ended:
                return  # the stream ended: the sweep has failed every request
            raise
        except Exception as exc:
            # The call has ended: its status (UNIMPLEMENTED, say) is the reader's to see,
            # and decides what the requests get. The wait only bounds a call that has not.
            log.debug("writing to the ingest stream to %s failed: %r", self._owner.address, exc)
            await asyncio.wait([self._reader], timeout=_STATUS_WAIT)
            self.end(_broken(f"writing failed ({type(exc).__name__})"))

    async def _read(self) -> None:
        """Match each answer to the oldest request written; end the stream on its end."""
        try:
            while True:
                raw = await self._call.read()
                if raw is grpc.aio.EOF:
                    self.end(_broken("the plugin ended the stream"))
                    return
                if not self._pending:
                    self.end(_broken("the plugin answered more requests than were sent"))
                    return
                entry = self._pending.popleft()
                self._served = self._owner.served = True
                self._release()
                if not entry.answer.done():
                    assert isinstance(raw, bytes)
                    entry.answer.set_result(raw)
        except grpc.aio.AioRpcError as exc:
            self._ended_with(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self.end(_broken("the stream was cancelled"))
                raise
            self.end(_broken("the channel was closed"))  # gRPC cancelled the call
        except Exception as exc:
            log.warning(
                "reading the ingest stream to %s failed", self._owner.address, exc_info=True
            )
            self.end(_broken(f"reading failed ({type(exc).__name__})"))

    def _ended_with(self, exc: grpc.aio.AioRpcError) -> None:
        code, details = exc.code(), exc.details() or ""
        if judge(code, details, dropped=False).failure is Failure.TOO_LARGE:
            # The oldest request's answer was refused; the others were never answered.
            self.end(Resend(f"an earlier answer was too large ({details})"), first=exc)
        elif code in TRANSPORT_CODES:
            self.end(_broken(f"{code.name}: {details}"))
        elif code is grpc.StatusCode.UNIMPLEMENTED or not self._served:
            # Refused before any answer: the stream does not work here (unserved, or
            # failing at once; gRPC reports writes racing an UNIMPLEMENTED as INTERNAL).
            # Nothing on it was answered and the channel is fine: unary from now on.
            self.end(Resend(f"{code.name}: {details}"), unsupported=True)
        else:
            self.end(_broken(f"{code.name}: {details}"))

    def end(
        self,
        error: BaseException,
        *,
        first: BaseException | None = None,
        unsupported: bool = False,
    ) -> None:
        """Fail every request not answered (``first`` for the oldest), release their slots."""
        if self._ended:
            return
        self._ended = True
        self._owner._ended(self, error, unsupported=unsupported)
        entries = list(self._pending)
        self._pending.clear()
        while not self._outbox.empty():
            entries.append(self._outbox.get_nowait())
        if entries:
            log.debug(
                "the ingest stream to %s ended with %d request(s) unanswered: %s",
                self._owner.address,
                len(entries),
                error,
            )
        for index, entry in enumerate(entries):
            self._release()
            if not entry.answer.done():
                failure = first if index == 0 and first is not None else error
                entry.answer.set_exception(_copy(failure))  # each caller raises its own
        self._call.cancel()
        here = asyncio.current_task()
        for task in (self._writer, self._reader):
            if task is not here:
                task.cancel()


def _owned(stream: _Open) -> int:
    return stream.owned


def _copy(error: BaseException) -> BaseException:
    if isinstance(error, grpc.aio.AioRpcError):
        copy: BaseException = _rpc_error(error.code(), error.details() or "")
    else:
        copy = type(error)(*error.args)
    return copy


def _broken(why: str) -> grpc.aio.AioRpcError:
    return _rpc_error(grpc.StatusCode.UNAVAILABLE, f"the ingest stream broke: {why}")
