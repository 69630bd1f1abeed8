"""The client side of KeepAlive (SPEC §1.3): many leases renewed over one stream.

    async with RegistryClient("127.0.0.1:50051") as client:
        stream = client.keep_alive()
        response = await stream.renew(plugin_id)  # pb.KeepAliveResponse
        await stream.close()

:class:`KeepAliveStream` opens its stream on the client's current address at the
first renewal and writes each renewal as it comes; one reader task hands the
answers, which come one per request and in order, to the renewals waiting for them.
Renewals from several tasks may share the stream (their writes
take turns). When the stream breaks every
renewal waiting fails, and the next one opens a new stream: pacing the retries is
the caller's (the SDK backs off). A registry without KeepAlive (an older one) answers
UNIMPLEMENTED, raised as :class:`KeepAliveUnsupported`: renew with ``heartbeat()``.

Thread rules: a stream belongs to the event loop of its client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import grpc

from registry.client import RegistryClient, error_from_rpc
from registry.errors import RegistryError, RegistryUnavailable
from registry.wire import pb


class KeepAliveUnsupported(RegistryError):
    """The registry does not serve KeepAlive (UNIMPLEMENTED): renew with unary Heartbeat."""


class _Stream:
    """One KeepAlive call, its reader, and the renewals written and not answered yet."""

    __slots__ = ("address", "call", "reader", "waiting", "writing")

    def __init__(self, call: Any, address: str) -> None:
        self.call = call
        self.address = address
        self.reader: asyncio.Task[None] | None = None
        # grpc.aio takes one write at a time on a call.
        self.writing = asyncio.Lock()
        # Oldest first: the answers come in the order of the requests.
        self.waiting: collections.deque[tuple[str, asyncio.Future[pb.KeepAliveResponse]]] = (
            collections.deque()
        )


class KeepAliveStream:
    """One KeepAlive stream of a :class:`~registry.client.RegistryClient`, reopened on demand.

    ``timeout`` bounds each renewal (by default the client's): a stream that does not
    answer within it is taken for broken. Refuses use after :meth:`close`.
    """

    def __init__(self, client: RegistryClient, *, timeout: float | None = None) -> None:
        self._client = client
        self._timeout = client.timeout if timeout is None else timeout
        self._stream: _Stream | None = None
        self._closed = False
        self.opened = 0  # streams opened, for tests

    @property
    def open(self) -> bool:
        """Whether a stream is open now (it opens at the next renewal otherwise)."""
        return self._stream is not None

    async def renew(self, plugin_id: str) -> pb.KeepAliveResponse:
        """Renew one lease; ``acknowledged`` False means: register again.

        Raises:
            KeepAliveUnsupported: the registry has no KeepAlive.
            RegistryUnavailable: the stream broke or did not answer within the timeout
                (the next renewal opens a new one).
            RegistryError: the registry ended the stream with another status
                (InvalidArgument, PermissionDenied, …), or the stream is closed.
        """
        if self._closed:
            raise RegistryError("the KeepAlive stream is closed")
        stream = self._stream or self._open()
        future: asyncio.Future[pb.KeepAliveResponse] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self._timeout):
                async with stream.writing:
                    # In the order written: the answers come in that order.
                    stream.waiting.append((plugin_id, future))
                    try:
                        await stream.call.write(pb.KeepAliveRequest(plugin_id=plugin_id))
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        pass  # the call has ended: its reader fails the renewals waiting
                    except asyncio.CancelledError:
                        # Maybe never sent: an answer missing would shift the others.
                        self._end(stream)
                        raise
                return await future
        except TimeoutError:
            self._end(stream)
            raise RegistryUnavailable(
                f"registry unavailable: no KeepAlive answer from {stream.address} "
                f"within {self._timeout:g}s"
            ) from None

    async def close(self) -> None:
        """End the stream (a half-close, then the call's end). Idempotent."""
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await stream.call.done_writing()
        self._end(stream)
        if stream.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await stream.reader

    def _open(self) -> _Stream:
        client = self._client
        stream = self._stream = _Stream(client.stub.KeepAlive(), client.current_address)
        self.opened += 1
        stream.reader = asyncio.create_task(self._read(stream), name="registry-keepalive")
        return stream

    def _end(self, stream: _Stream) -> None:
        """Take ``stream`` for broken: the next renewal opens another."""
        if self._stream is stream:
            self._stream = None
        stream.call.cancel()

    async def _read(self, stream: _Stream) -> None:
        """Hand each answer to the oldest renewal waiting; at the end, fail the rest."""
        error: RegistryError = RegistryUnavailable(
            f"registry unavailable: {stream.address} ended the KeepAlive stream"
        )
        try:
            while True:
                response = await stream.call.read()
                if response is grpc.aio.EOF:
                    break
                if not stream.waiting:  # an answer nobody asked for: not this contract
                    error = RegistryError("KeepAlive: an answer without a request")
                    break
                plugin_id, future = stream.waiting.popleft()
                if response.plugin_id != plugin_id:
                    error = RegistryError("KeepAlive: an answer out of order")
                    break
                if not future.done():  # a renewal cancelled meanwhile wants it no more
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = self._error(stream.address, exc)
        except asyncio.CancelledError:
            pass  # ended here; the waiting renewals learn it below
        finally:
            self._end(stream)
            for _, future in stream.waiting:
                if not future.done():
                    future.set_exception(error)
            stream.waiting.clear()

    def _error(self, address: str, exc: grpc.aio.AioRpcError) -> RegistryError:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return KeepAliveUnsupported(
                f"{address} does not serve KeepAlive (an older registry): renew with Heartbeat"
            )
        if code == grpc.StatusCode.CANCELLED:
            return RegistryUnavailable(f"registry unavailable: KeepAlive to {address} ended")
        if code == grpc.StatusCode.UNAVAILABLE:
            self._client.skip(address)
        error = error_from_rpc(exc)
        if isinstance(error, RegistryUnavailable):
            return RegistryUnavailable(f"{error} (at {address})")
        return error
