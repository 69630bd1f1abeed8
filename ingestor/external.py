"""``ExternalIngestor``: turns raw payloads into events by calling an external plugin.

ingestor = ExternalIngestor("k8s", "127.0.0.1:9001")                    # static
ingestor = ExternalIngestor("k8s", resolver=RegistryResolver(registry))  # dynamic
events = ingestor.ingest(IngestContext("k8s"), raw)          # any thread
events = await ingestor.ingest_async(IngestContext("k8s"), raw)
result = ingestor.ingest_with_errors(IngestContext("k8s"), raw)  # .events, .errors
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from prometheus_client import CollectorRegistry

from ingestor import _loop
from ingestor.answer import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_RESPONSE_BYTES,
    AnswerLimits,
    AnswerRefused,
    decode_answer,
)
from ingestor.breaker import BreakerSettings
from ingestor.connection import DEFAULT_CHANNELS_PER_ENDPOINT, PluginConnection
from ingestor.context import IngestContext
from ingestor.errors import PluginError, PluginTransformError
from ingestor.failures import Failure, Verdict
from ingestor.metrics import gateway_metrics, measured, measured_sync
from ingestor.plugin_client import PluginClient
from ingestor.resolver import RegistryResolver
from ingestor.result import IngestResult
from ingestor.stream import (
    DEFAULT_STREAM_IN_FLIGHT,
    DEFAULT_STREAMS_PER_CHANNEL,
    STREAM_CAPABILITY,
    Resend,
    check_stream_in_flight,
    check_streams_per_channel,
    ingest_stream,
)
from ingestor.view import Endpoint, ResolverView
from registry.trust.addresses import AddressPolicy, HostResolver
from registry.trust.tls import TlsFiles
from registry.wire import event_pb, pb

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_INGEST_TIMEOUT = 30.0

_RECEIVE_LIMIT = "grpc.max_receive_message_length"


class ExternalIngestor(PluginClient):
    """The gateway's client of one source's ingestor plugin (static or resolved).

    Give either ``address`` (a fixed plugin: ``host:port``, ``http://h:p``,
    ``https://h:p``, ``unix:/path``) or ``resolver`` (the source's HEALTHY instances, as
    the registry reports them). Construction never fails for network reasons and never
    connects: the first call connects (waiting up to ``connect_timeout`` for the channel
    to be ready) and the channel is cached per endpoint. A connection error drops the
    cached channel; the next call resolves again and reconnects. Each Ingest has
    ``ingest_timeout`` seconds.

    Several instances: calls go round-robin over the source's HEALTHY endpoints, skipping
    those whose circuit breaker is open (:mod:`ingestor.breaker` says what counts as a
    failure); a call that could not reach its endpoint
    (UNAVAILABLE, connect failure) is retried once on another (Ingest is a pure
    transform). An endpoint the resolver drops stops receiving calls at once and its
    channel is closed (calls in flight on it may finish).

    Thread rules: ``ingest``/``ingest_with_errors``/``health`` run on the caller's
    thread, over synchronous gRPC channels of their own (no hand-off to another thread),
    and may be called from any number of threads at once, also while event loops run in
    other threads. On a thread whose event loop is running they raise PluginError (they
    would block that loop): use ``await ingest_async(...)`` / ``await health_async()``
    there. The async methods work on any loop; each loop gets its own channels. The
    breakers and the round-robin turn are shared by both kinds of callers. ``close``
    may be called from any thread.

    The ingestor does not own ``resolver``: close that yourself (it is meant to be shared).

    Every endpoint (``address``, or each one the resolver gives) is parsed and vetted
    by ``address_policy`` before a channel is opened to it (default: loopback and the
    private ranges, :meth:`AddressPolicy.gateway_default`); a host name is resolved by
    ``host_resolver`` (default: the system's) and dialled at the IP it was vetted at.
    A refused endpoint raises PluginConnectionError naming the address policy, is never
    dialled, and counts like an unreachable one (another instance is tried).
    ``tls``: the CA that verifies ``https://`` plugins (the system roots without one)
    and, for mTLS, this side's certificate and key; the files are read here, once.

    Answers are bounded (SPEC §7): one over ``max_response_bytes`` (the channel's
    receive limit) or with more than ``max_events`` events (or errors) is refused
    before it is decoded, and bytes that are not an ``IngestResponse`` are refused
    too; each is a PluginTransformError naming what was exceeded and a failure for
    the endpoint's breaker (a plugin that answers so is broken), and is not retried
    on another instance (the answer's size usually follows from the payload; retrying
    would only pay for it twice). ``channel_options`` may not set
    ``grpc.max_receive_message_length``: ``max_response_bytes`` does.

    ``metrics``: a CollectorRegistry to report ingest latency, errors and breaker
    states on (:mod:`ingestor.metrics`); None reports nothing.

    ``channels_per_endpoint`` (default 1, at most 64): how many HTTP/2 connections to
    open to each instance (on each loop, and for the sync calls); the calls to it take
    them in turn. One connection is served by one thread of the plugin's gRPC core at
    a time: more spread a busy gateway's load on one instance (bench/stream_bench.py).

    Streaming (SPEC §10): ``ingest_async`` sends over the plugin's ``IngestorStream``
    when it offers the capability ``ingest.stream.v1``, many callers on up to
    ``streams_per_channel`` streams per channel (default 16, at most 64: a stream is
    opened only when the open ones are all busy; :mod:`ingestor.stream`), at most
    ``stream_in_flight`` requests on each at once (more wait for a slot, within their
    ``ingest_timeout``); otherwise unary ``Ingest``.
    A resolved endpoint's capability is read from the registry's view of it; a static
    ``address`` is asked its ``Info`` once per channel. Everything else is as for unary
    calls: the same timeout per request, limits, errors, breaker and retry (a broken
    stream fails the requests it had not answered as UNAVAILABLE, and each is retried
    on another instance; the next call opens a new stream). The synchronous calls stay
    unary: a sync caller has one call in flight per thread, and multiplexing threads on
    one stream would cost two thread hand-offs per call, what the sync path exists to
    avoid. ``streaming=False`` keeps ``ingest_async`` unary too.

    Raises (constructor):
        ValueError: neither or both of ``address`` and ``resolver``, a bad timeout, a
            limit out of range, an ``address`` that does not parse, unusable ``tls``
            files, ``channel_options`` setting the receive limit,
            ``channels_per_endpoint``, ``stream_in_flight`` or
            ``streams_per_channel`` out of range, or
            ``metrics`` holding other families of the gateway's names.
    """

    def __init__(
        self,
        source: str,
        address: str | None = None,
        *,
        resolver: RegistryResolver | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ingest_timeout: float = DEFAULT_INGEST_TIMEOUT,
        breaker: BreakerSettings | None = None,
        channel_options: Iterable[tuple[str, int | str]] = (),
        address_policy: AddressPolicy | None = None,
        host_resolver: HostResolver | None = None,
        tls: TlsFiles | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_events: int = DEFAULT_MAX_EVENTS,
        metrics: CollectorRegistry | None = None,
        channels_per_endpoint: int = DEFAULT_CHANNELS_PER_ENDPOINT,
        streaming: bool = True,
        stream_in_flight: int = DEFAULT_STREAM_IN_FLIGHT,
        streams_per_channel: int = DEFAULT_STREAMS_PER_CHANNEL,
    ) -> None:
        if (address is None) == (resolver is None):
            raise ValueError("give exactly one of address and resolver")
        if connect_timeout <= 0 or ingest_timeout <= 0:
            raise ValueError("connect_timeout and ingest_timeout must be positive")
        self.streaming = streaming
        self.stream_in_flight = check_stream_in_flight(stream_in_flight)
        self.streams_per_channel = check_streams_per_channel(streams_per_channel)
        self.limits = AnswerLimits(max_response_bytes=max_response_bytes, max_events=max_events)
        options = list(channel_options)
        if any(key == _RECEIVE_LIMIT for key, _ in options):
            raise ValueError(f"channel_options: set max_response_bytes, not {_RECEIVE_LIMIT}")
        super().__init__(
            f"source {source!r}",
            address,
            resolver,
            connect_timeout=connect_timeout,
            breaker=breaker,
            channel_options=[*options, (_RECEIVE_LIMIT, max_response_bytes)],
            address_policy=address_policy,
            host_resolver=host_resolver,
            tls=tls,
            channels_per_endpoint=channels_per_endpoint,
        )
        self.source = source
        self.ingest_timeout = ingest_timeout
        self.gateway_metrics = gateway_metrics(metrics)
        if self.gateway_metrics is not None:
            self.gateway_metrics.add_ingestor(self)

    def __repr__(self) -> str:
        target = self.address if self.address is not None else f"resolver={self.resolver!r}"
        return f"ExternalIngestor({self.source!r}, {target})"

    # -- calls -------------------------------------------------------------------------

    async def ingest_async(self, ctx: IngestContext, data: bytes) -> list[event_pb.Event]:
        """Send ``data`` to the source's plugin; its events, in order.

        Errors the plugin reports next to events are logged as warnings (naming the
        plugin and offset) and the events returned; :meth:`ingest_with_errors_async`
        returns them too.

        Raises:
            As :meth:`ingest_with_errors_async`.
        Cancellation cancels the RPC in flight.
        """
        return (await self.ingest_with_errors_async(ctx, data)).events

    @measured
    async def ingest_with_errors_async(self, ctx: IngestContext, data: bytes) -> IngestResult:
        """Send ``data`` to the source's plugin; its events and its per-record errors.

        The errors (the plugin's ``IngestError`` records, as it returned them) are
        also logged as warnings, naming the plugin and offset, as :meth:`ingest_async`
        does.

        Raises:
            PluginConnectionError: no plugin could be reached (connect failure,
                UNAVAILABLE, DEADLINE_EXCEEDED, no routable plugin, a stale view, an
                endpoint the address policy refuses).
            PluginTransformError: the plugin returned errors and no events, answered
                with another error status, or with an answer refused: over
                ``max_response_bytes``, more than ``max_events`` events or errors, or
                undecodable.
            PluginError: the ingestor is closed.
        Cancellation cancels the RPC in flight.
        """
        endpoint, response = await self._call_async(
            "Ingest", self._request(ctx, data), self.ingest_timeout, self._decode
        )
        return self._result(endpoint, response)

    def ingest(self, ctx: IngestContext, data: bytes) -> list[event_pb.Event]:
        """Synchronous :meth:`ingest_async`, on the caller's thread (any without a running loop).

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await ingest_async`` there), or the ingestor is closed.
            PluginConnectionError, PluginTransformError: as :meth:`ingest_async`.
        """
        _loop.refuse_inside_loop("ExternalIngestor.ingest", "ingest_async(ctx, data)")
        return self._ingest_sync(ctx, data).events

    def ingest_with_errors(self, ctx: IngestContext, data: bytes) -> IngestResult:
        """Synchronous :meth:`ingest_with_errors_async` (thread rules as :meth:`ingest`).

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await ingest_with_errors_async`` there), or the ingestor is closed.
            PluginConnectionError, PluginTransformError: as :meth:`ingest_async`.
        """
        _loop.refuse_inside_loop(
            "ExternalIngestor.ingest_with_errors", "ingest_with_errors_async(ctx, data)"
        )
        return self._ingest_sync(ctx, data)

    @measured_sync
    def _ingest_sync(self, ctx: IngestContext, data: bytes) -> IngestResult:
        endpoint, response = self._call_sync(
            "Ingest", self._request(ctx, data), self.ingest_timeout, self._decode
        )
        return self._result(endpoint, response)

    # -- what PluginClient asks of it -----------------------------------------------------

    def _resolve(self, resolver: RegistryResolver) -> tuple[Endpoint, ...]:
        return resolver.resolve(self.source)

    def _live(self, view: ResolverView) -> Collection[str]:
        return {e.address for e in view.endpoints(self.source)}

    def _drain_grace(self) -> float | None:
        return self.ingest_timeout

    async def _send_async(
        self,
        connection: PluginConnection,
        endpoint: Endpoint,
        method: str,
        request: pb.IngestRequest,
        rpc_timeout: float,
    ) -> bytes:
        if method == "Ingest" and self.streaming:
            stream = ingest_stream(
                connection, max_in_flight=self.stream_in_flight, streams=self.streams_per_channel
            )
            if await stream.offered(self._offers_stream(endpoint), self.connect_timeout):
                try:
                    return await stream.call(request, rpc_timeout)
                except Resend:
                    pass  # never processed, and the channel is fine
        return await super()._send_async(connection, endpoint, method, request, rpc_timeout)

    def _offers_stream(self, endpoint: Endpoint) -> bool | None:
        """Whether the registry says the endpoint's plugin streams; None: not resolved."""
        resolver = self.resolver
        if resolver is None:
            return None
        view = resolver.view
        plugin = view.plugins.get(endpoint.plugin_id) if view is not None else None
        return plugin is not None and STREAM_CAPABILITY in plugin.info.capabilities

    def _answer_error(self, endpoint: Endpoint, verdict: Verdict) -> PluginError:
        if verdict.failure is Failure.TOO_LARGE:  # the stream was refused, the channel is good
            return PluginTransformError(
                f"plugin {endpoint.label()} answered source {self.source!r} with more than "
                f"max_response_bytes={self.limits.max_response_bytes} bytes ({verdict.details})",
                address=endpoint.address,
            )
        return PluginTransformError(
            f"plugin {endpoint.label()} failed to transform source {self.source!r}: "
            f"{verdict.code.name}: {verdict.details}",
            address=endpoint.address,
            code=verdict.code.name,
        )

    # -- internals ---------------------------------------------------------------------

    def _request(self, ctx: IngestContext, data: bytes) -> pb.IngestRequest:
        return pb.IngestRequest(
            source=ctx.source or self.source, cluster=ctx.cluster, format=ctx.format, data=data
        )

    def _decode(self, endpoint: Endpoint, raw: bytes) -> pb.IngestResponse:
        """The answer, within the limits.

        Raises:
            PluginTransformError: refused (a breaker failure for the endpoint).
        """
        try:
            return decode_answer(raw, self.limits)
        except AnswerRefused as exc:
            raise PluginTransformError(
                f"plugin {endpoint.label()} answered source {self.source!r} with {exc}",
                address=endpoint.address,
            ) from exc

    def _result(self, endpoint: Endpoint, response: pb.IngestResponse) -> IngestResult:
        events = list(response.events)
        if not response.errors:
            return IngestResult(events, [])
        if not events:
            first = response.errors[0]
            raise PluginTransformError(
                f"plugin {endpoint.label()} returned {len(response.errors)} error(s) and no "
                f"events for source {self.source!r}; first at offset {first.offset}: "
                f"{first.message}",
                address=endpoint.address,
                errors=response.errors,
            )
        for error in response.errors:
            log.warning(
                "plugin %s reported an error for source %r at offset %d: %s%s",
                endpoint.label(),
                self.source,
                error.offset,
                error.message,
                f" ({error.details})" if error.details else "",
            )
        return IngestResult(events, list(response.errors))
