"""The plugin services, answering with the author's callables.

An author's ``ingest``, ``health``, ``emit`` and ``shutdown`` may be plain functions
or coroutine functions (or async generators for ``ingest``). Coroutines run on the
event loop; plain functions run in the host's thread pool, so a blocking transform
never stalls the loop — ``health`` has a thread of its own, so a pool full of slow
ingests cannot starve the registry's health checks.

What each callable may return, and what an exception in it becomes:

- ``ingest``: an ``IngestResponse``, or an iterable of ``Event`` and ``IngestError``
  (a generator is fine); raising answers status INTERNAL with the message.
- ``emit``: an ``EmitResponse``, or None (every event emitted); raising answers
  status INTERNAL with the message.
- ``health``: a ``PluginHealthResponse``, a bool, or None (healthy); raising answers
  ``healthy = false`` with the message. No ``health`` at all: always healthy.
- ``shutdown``: a ``ShutdownResponse``, or None (success); raising answers
  ``success = false`` with the message.

Streaming (SPEC §10): every ingest handler is also served as
``polku.v1.IngestorStream`` (the host advertises :data:`STREAM_CAPABILITY`). Requests
on one stream are handled concurrently, at most ``stream_in_flight`` of them at once
(the stream is not read further until one is answered), and answered in request
order. An exception in ``ingest`` answers that request alone, as an ``IngestResponse``
with no events and one ``IngestError`` (offset 0, message ``ingest failed: ...``,
details ``INTERNAL``): the words the unary call's INTERNAL status carries, and the
gateway raises PluginTransformError for either; the stream goes on.

Bad input is data, not a failure: report it as ``IngestError`` entries (with the
offset of the bad record) next to the events that did parse. An exception means the
plugin itself failed, and the gateway sees a failed call rather than a payload full
of errors.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf.empty_pb2 import Empty

from registry.wire import event_pb, pb

log = logging.getLogger(__name__)

# The capability by which a plugin offers polku.v1.IngestorStream (PluginInfo.capabilities).
STREAM_CAPABILITY = "ingest.stream.v1"
DEFAULT_STREAM_IN_FLIGHT = 64

IngestItems: TypeAlias = Iterable[event_pb.Event | pb.IngestError]
IngestResult: TypeAlias = pb.IngestResponse | IngestItems | AsyncIterable[Any]
IngestFn: TypeAlias = Callable[[pb.IngestRequest], IngestResult | Awaitable[IngestResult]]
HealthResult: TypeAlias = pb.PluginHealthResponse | bool | None
HealthFn: TypeAlias = Callable[[], HealthResult | Awaitable[HealthResult]]
EmitResult: TypeAlias = pb.EmitResponse | None
EmitFn: TypeAlias = Callable[[pb.EmitRequest], EmitResult | Awaitable[EmitResult]]
ShutdownResult: TypeAlias = pb.ShutdownResponse | None
ShutdownFn: TypeAlias = Callable[[], ShutdownResult | Awaitable[ShutdownResult]]


def _is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return (
        inspect.iscoroutinefunction(fn)
        or inspect.isasyncgenfunction(fn)
        or inspect.iscoroutinefunction(call)
        or inspect.isasyncgenfunction(call)
    )


def _materialize(value: Any) -> Any:
    """Run a lazy result (a generator) to the end, in the thread that made it."""
    if isinstance(value, Iterable) and not isinstance(value, (pb.IngestResponse, bytes, str)):
        return list(value)
    return value


async def _invoke(fn: Callable[..., Any], executor: Executor, *args: Any) -> Any:
    """Call ``fn``: on the loop when it is async, else in ``executor``.

    Cancellation (the client gave up) reaches a coroutine; a function already
    running in a thread finishes there and its result is dropped.
    """
    if _is_async(fn):
        result = fn(*args)
    else:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(executor, lambda: _materialize(fn(*args)))
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, AsyncIterable):
        result = [item async for item in result]
    return result


def ingest_response(result: Any) -> pb.IngestResponse:
    """An IngestResponse from what ``ingest`` returned.

    Raises:
        TypeError: an item is neither an Event nor an IngestError.
    """
    if isinstance(result, pb.IngestResponse):
        return result
    response = pb.IngestResponse()
    for item in result:
        if isinstance(item, event_pb.Event):
            response.events.append(item)
        elif isinstance(item, pb.IngestError):
            response.errors.append(item)
        else:
            raise TypeError(f"ingest gave a {type(item).__name__}; expected Event or IngestError")
    return response


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Handlers:
    """The author's callables and where plain ones run."""

    info: pb.PluginInfo
    executor: Executor
    health_executor: Executor
    ingest: IngestFn | None = None
    emit: EmitFn | None = None
    health: HealthFn | None = None
    shutdown: ShutdownFn | None = None
    stream_in_flight: int = DEFAULT_STREAM_IN_FLIGHT

    async def check_health(self) -> pb.PluginHealthResponse:
        """The author's health, or healthy when there is none; never raises but on cancel."""
        if self.health is None:
            return pb.PluginHealthResponse(healthy=True)
        try:
            result = await _invoke(self.health, self.health_executor)
        except Exception as exc:
            log.warning("health check of %s raised", self.info.name, exc_info=True)
            return pb.PluginHealthResponse(healthy=False, message=_described(exc))
        if isinstance(result, pb.PluginHealthResponse):
            return result
        return pb.PluginHealthResponse(healthy=True if result is None else bool(result))


class _Base:
    def __init__(self, handlers: Handlers) -> None:
        self._handlers = handlers

    async def Info(self, request: Empty, context: grpc.aio.ServicerContext) -> pb.PluginInfo:
        return self._handlers.info

    async def Health(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.PluginHealthResponse:
        return await self._handlers.check_health()

    async def _fail(self, context: grpc.aio.ServicerContext, what: str, exc: Exception) -> None:
        log.exception("%s of %s failed", what, self._handlers.info.name)
        await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {_described(exc)}")


class IngestorServicer(_Base):
    """``polku.v1.IngestorPlugin`` and ``IngestorStream`` over ``ingest`` and ``health``."""

    def __init__(self, handlers: Handlers) -> None:
        super().__init__(handlers)
        self._closing = asyncio.Event()

    def end_streams(self) -> None:
        """Stop taking requests on every stream: each answers what it took, then ends.

        For a graceful stop: a stream never ends by itself, and would hold the server's
        stop for its whole grace. The gateway resends what a stream did not take.
        """
        self._closing.set()

    async def Ingest(
        self, request: pb.IngestRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        handlers = self._handlers
        assert handlers.ingest is not None
        try:
            return ingest_response(await _invoke(handlers.ingest, handlers.executor, request))
        except Exception as exc:
            await self._fail(context, "ingest", exc)
            raise  # unreachable: abort raises

    async def IngestStream(
        self, requests: AsyncIterator[pb.IngestRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestResponse]:
        """Answer each request on the stream, in order; several are handled at once.

        A reader task takes requests while fewer than ``stream_in_flight`` are
        unanswered and starts each one's handling; this generator answers them in
        the order they came. :meth:`end_streams` stops the reading, and the stream
        ends (OK) once what it took is answered. A cancelled stream (the client's
        cancel, a stop out of grace) cancels what is still being handled.
        """
        slots = asyncio.Semaphore(self._handlers.stream_in_flight)
        order: asyncio.Queue[asyncio.Future[pb.IngestResponse] | None] = asyncio.Queue()
        closing = self._closing

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    order.put_nowait(asyncio.ensure_future(self._answer(request)))
            except asyncio.CancelledError:
                if not closing.is_set():
                    raise
            finally:
                order.put_nowait(None)

        reader = asyncio.ensure_future(read())
        stop = asyncio.ensure_future(closing.wait())
        stop.add_done_callback(lambda _: reader.cancel())
        try:
            while (answer := await order.get()) is not None:
                response = await answer
                slots.release()
                yield response
            await reader  # the reader's failure (a bad request stream) fails the call
        finally:
            stop.cancel()
            reader.cancel()
            while not order.empty():
                left = order.get_nowait()
                if left is not None:
                    left.cancel()

    async def _answer(self, request: pb.IngestRequest) -> pb.IngestResponse:
        """One request's answer on the stream; a failure of ``ingest`` is answered too."""
        handlers = self._handlers
        assert handlers.ingest is not None
        try:
            return ingest_response(await _invoke(handlers.ingest, handlers.executor, request))
        except Exception as exc:
            log.exception("ingest of %s failed", handlers.info.name)
            failed = pb.IngestError(message=f"ingest failed: {_described(exc)}", details="INTERNAL")
            return pb.IngestResponse(errors=[failed])


class EmitterServicer(_Base):
    """``polku.v1.EmitterPlugin`` over the author's ``emit``, ``health`` and ``shutdown``.

    ``Shutdown`` (the gateway asking the emitter to flush) calls ``shutdown``; the
    plugin keeps serving and stays registered, as the gateway may come back.
    """

    async def Emit(
        self, request: pb.EmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmitResponse:
        handlers = self._handlers
        assert handlers.emit is not None
        try:
            result = await _invoke(handlers.emit, handlers.executor, request)
        except Exception as exc:
            await self._fail(context, "emit", exc)
            raise  # unreachable: abort raises
        if isinstance(result, pb.EmitResponse):
            return result
        return pb.EmitResponse(success_count=len(request.events))

    async def Shutdown(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.ShutdownResponse:
        handlers = self._handlers
        if handlers.shutdown is None:
            return pb.ShutdownResponse(success=True)
        try:
            result = await _invoke(handlers.shutdown, handlers.executor)
        except Exception as exc:
            log.exception("shutdown of %s failed", handlers.info.name)
            return pb.ShutdownResponse(success=False, message=_described(exc))
        if isinstance(result, pb.ShutdownResponse):
            return result
        return pb.ShutdownResponse(success=True)
