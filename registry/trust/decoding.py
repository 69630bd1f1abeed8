"""Requests that cannot be decoded answer INVALID_ARGUMENT, never UNKNOWN (SPEC §7).

grpc-python decodes a request with the method's ``request_deserializer`` before the
method runs. When that raises (a generated ``FromString`` raises ``DecodeError`` on bad
UTF-8 in a string, a truncated varint, a length beyond the end, wire type 6 or 7, groups
nested past the recursion limit), grpc answers UNKNOWN with the exception's text and
logs a traceback; a stream's request iterator raises the same inside the method. A
deserializer cannot answer the call itself: it has no context, and an ``AbortError``
raised there answers UNKNOWN too ("Abort error has been replaced!"). All checked with
grpcio 1.85.3 and upb protobuf.

So :class:`DecodingGuard` splits the job: its deserializer returns an
:class:`Undecodable` instead of raising, and the method, wrapped, checks each request
first and aborts with INVALID_ARGUMENT, ``request: cannot be decoded as
polku.v1.HeartbeatRequest (String field had bad UTF-8)``. The reason is protobuf's
fixed wording (or only the exception's type), never the caller's bytes. Each such
call is logged on one line without a traceback, at most once per peer host a minute;
the peers remembered for that are bounded, and beyond the bound one line a minute
stands for all the others.

:class:`~registry.trust.auth.AuthInterceptor` applies the guard to every handler it
wraps, inside admission: a caller must be admitted (identity, scope, limits) before
it learns that its bytes do not decode.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

# How long one logged line stands for the undecodable calls of its peer host.
LOG_INTERVAL = 60.0
# Peer hosts remembered for that; beyond, one line per interval stands for all others.
MAX_LOGGED_PEERS = 4096
# A reason longer than this is cut (protobuf's own are short).
_MAX_REASON = 120

Behaviour = Callable[..., Any]
Deserializer = Callable[[bytes], Any]
PeerParser = Callable[[str], "tuple[str, str] | None"]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What the guarded deserializer hands on in place of a request it cannot decode."""

    message_type: str  # "polku.v1.HeartbeatRequest"
    reason: str  # "String field had bad UTF-8"

    @property
    def details(self) -> str:
        """The status details the caller gets."""
        return f"request: cannot be decoded as {self.message_type} ({self.reason})"


class DecodingGuard:
    """Wraps method handlers so that an undecodable request answers INVALID_ARGUMENT.

    ``parse_peer`` reads a peer's host from ``context.peer()`` (the interceptor's
    :func:`~registry.trust.auth.parse_peer`, so the log and the limits see the same
    host); None, or a peer it cannot read, keys the log on the whole peer string.
    ``clock`` is monotonic seconds (tests give their own). State lives on the event
    loop of the one server the guard serves.
    """

    def __init__(
        self,
        parse_peer: PeerParser | None = None,
        *,
        interval: float = LOG_INTERVAL,
        max_peers: int = MAX_LOGGED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or max_peers < 1:
            raise ValueError("interval must be positive and max_peers at least 1")
        self._parse_peer = parse_peer
        self._interval = interval
        self._max_peers = max_peers
        self._clock = clock
        # peer host -> when its logged line was written; oldest first.
        self._logged: OrderedDict[str, float] = OrderedDict()
        self._overflow_logged: float | None = None
        self.refused = 0  # undecodable calls answered, for tests and metrics

    @property
    def peers_remembered(self) -> int:
        """Peer hosts whose logged line still stands (at most ``max_peers``)."""
        return len(self._logged)

    def wrap(
        self, handler: grpc.RpcMethodHandler, behaviour: Behaviour
    ) -> tuple[Behaviour, Deserializer | None]:
        """``behaviour`` of ``handler`` and a deserializer, guarded as a pair.

        Use both in the new handler: the deserializer never raises, the behaviour
        answers what it could not decode. A handler without a deserializer (raw bytes)
        or with a sync behaviour is handed back as it is.
        """
        deserializer = handler.request_deserializer
        if deserializer is None:
            return behaviour, None
        if not (inspect.isasyncgenfunction(behaviour) or inspect.iscoroutinefunction(behaviour)):
            return behaviour, deserializer
        guarded = _guarded(deserializer, _message_type(deserializer))
        if handler.request_streaming:
            return self._guard_stream(behaviour), guarded
        return self._guard_unary(behaviour), guarded

    def _guard_unary(self, behaviour: Behaviour) -> Behaviour:
        refuse = self._refuse
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response

            return streaming

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await refuse(request, context)
            return await behaviour(request, context)

        return call

    def _guard_stream(self, behaviour: Behaviour) -> Behaviour:
        # A stream's requests arrive one by one, each through the deserializer: the
        # method gets an iterator that checks every one. (A method that reads with
        # ``context.read()`` instead gets the Undecodable itself.)
        checked = self._checked
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                responses = behaviour(checked(requests, context), context)
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response

            return streaming

        async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(checked(requests, context), context)

        return call

    async def _checked(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await self._refuse(request, context)
            yield request

    async def _refuse(self, request: Undecodable, context: grpc.aio.ServicerContext) -> NoReturn:
        """Log (rate-limited) and answer INVALID_ARGUMENT.

        Raises:
            grpc.aio.AbortError: always (the call has been answered).
        """
        self.refused += 1
        peer = context.peer() or "unknown"
        key = peer
        if self._parse_peer is not None:
            parsed = self._parse_peer(peer)
            if parsed is not None:
                key = parsed[0]
        verdict = self._admit_line(key)
        if verdict is not None:
            log.warning(
                "undecodable %s from %s: %s; %s",
                request.message_type,
                peer,
                request.reason,
                verdict,
            )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    def _admit_line(self, key: str) -> str | None:
        """Whether a line for ``key`` may be logged now: what it stands for, else None."""
        now = self._clock()
        logged = self._logged
        while logged:
            oldest_key, since = next(iter(logged.items()))
            if now - since < self._interval:
                break
            del logged[oldest_key]
        if key in logged:
            return None
        window = f"{self._interval:g} s"
        if len(logged) < self._max_peers:
            logged[key] = now
            return f"more from this peer in the next {window} are not logged"
        overflow = self._overflow_logged
        if overflow is not None and now - overflow < self._interval:
            return None
        self._overflow_logged = now
        return (
            f"{self._max_peers} other peers were logged in the last {window}; "
            f"more from any further peer in the next {window} are not logged"
        )


def _guarded(deserializer: Deserializer, message_type: str) -> Deserializer:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # any failure to decode is the caller's bytes
            return Undecodable(message_type, _reason(exc))

    return deserialize


def _message_type(deserializer: Deserializer) -> str:
    """``polku.v1.HeartbeatRequest`` for a generated ``FromString``; else a plain name."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    if isinstance(name, str) and name:
        return name
    return str(getattr(deserializer, "__qualname__", "the request type"))


def _reason(exc: Exception) -> str:
    """A short reason in protobuf's fixed words (never the caller's bytes)."""
    if not isinstance(exc, DecodeError):
        return type(exc).__name__
    # upb: "Error parsing message with type 'polku.v1.X': String field had bad UTF-8"
    text = str(exc).partition("\n")[0]
    _, sep, tail = text.partition("': ")
    reason = (tail if sep else text).strip() or "malformed"
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"
