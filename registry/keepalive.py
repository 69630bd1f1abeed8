"""KeepAlive (SPEC §1.3): one stream per plugin process renews all of its leases.

One response per request, in order, like etcd's ``LeaseKeepAlive``. Per request the
servicer does what a unary Heartbeat does (the id's syntax, the caller's right to the
instance, the lease renewed in memory, no commit), so the stream is answered by one
coroutine that reads, renews and writes in turn: no task of its own, no queue, and
no per-message wrapper of the server's interceptors (they wrap the call once, see
:mod:`registry.interception`). A request the registry cannot decode, a malformed id
or another principal's instance ends the stream with the status a Heartbeat would get.

Bounds: the next request is read only once the last response has been written, so a
client that sends and never reads stalls its own stream against HTTP/2 flow control
and holds no memory here beyond one response; its streams are counted by
``max_streams_per_principal`` and ``max_concurrent_rpcs`` (SPEC §6). A renewal costs
what a Heartbeat costs, no more, so a flood over a stream buys nothing a flood of
Heartbeats would not.

The end of a stream, whatever it is (the client cancelled, its connection broke, an
error, the server stopping, or a clean half-close), means the keeper is gone, as for
Consul and etcd: the plugins the stream renewed are health-checked at once
(:meth:`registry.poller.HealthChecker.check_now`). A plugin that shuts down cleanly
unregisters anyway, and a check of an id already removed is a no-op. A stream
remembers at most :data:`MAX_STREAM_IDS` ids (the most recently renewed first);
older ones are left to their leases. On a follower the checker does not run, so
there the end of a stream only leaves the leases to run out on the leader.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import grpc

from registry.trust.decoding import Undecodable
from registry.wire import pb

log = logging.getLogger(__name__)

# The ids one stream remembers for the check at its end (a plugin process holds a few).
MAX_STREAM_IDS = 1024

Renewal = Callable[[str], "pb.KeepAliveResponse | Awaitable[pb.KeepAliveResponse]"]


class Checker(Protocol):
    """What is told when a stream ends: the health checker."""

    def check_now(self, plugin_ids: Iterable[str]) -> None: ...


async def serve(context: grpc.aio.ServicerContext, renew: Renewal, checker: Checker | None) -> None:
    """Answer one KeepAlive stream until it ends; then check the plugins it renewed.

    ``renew(plugin_id)`` answers one request, synchronously when it can (the leader,
    or a registry alone) or with an awaitable (a follower that asks the leader). What
    it raises ends the stream (the servicer maps it to a status code).

    Raises:
        grpc.aio.AbortError: an undecodable request (INVALID_ARGUMENT).
        Whatever ``renew`` raises. Cancelled when the client goes away.
    """
    renewed: dict[str, None] = {}  # insertion order: the oldest is dropped first
    read, write = context.read, context.write
    response_type = pb.KeepAliveResponse
    try:
        while True:
            request = await read()
            if request is grpc.aio.EOF:
                return
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            answer = renew(request.plugin_id)
            if not isinstance(answer, response_type):
                answer = await answer
            plugin_id = answer.plugin_id
            if answer.acknowledged:
                if plugin_id not in renewed:
                    renewed[plugin_id] = None
                    if len(renewed) > MAX_STREAM_IDS:
                        del renewed[next(iter(renewed))]
            elif renewed:
                renewed.pop(plugin_id, None)
            await write(answer)
    finally:
        if renewed and checker is not None:
            try:
                checker.check_now(list(renewed))
            except Exception:
                log.exception("checking the %d plugins of a KeepAlive stream failed", len(renewed))
