"""The plugin of bench/stream_bench.py: a Python SDK ingestor, one process, one event per line.

    python -m bench.stream_plugin REGISTRY     # prints "listening on HOST:PORT" when serving

A plain :class:`~registry.sdk.PluginHost` (whatever services the SDK serves for an
ingest handler, streaming among them once it does), registered as source ``stream``.
Its async ``ingest`` makes one ``Event`` per line of the payload, on the loop.

So that the benchmark can tell which path a configuration really took, a server
interceptor counts the RPCs by method, and ``Health`` answers the counts in its
message (``polku.v1.IngestorPlugin/Ingest=12 ...``). The interceptor is added by
wrapping ``grpc.aio.server`` in this process only: the SDK takes no interceptors. It
costs every configuration alike (one coroutine per RPC, not per message).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from registry.sdk import PluginHost, serve_until_signalled
from registry.wire import event_pb, pb

SOURCE = "stream"
NAME = "stream-bench"

calls: Counter[str] = Counter()


class _Counting(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        calls[handler_call_details.method.lstrip("/")] += 1
        return await continuation(handler_call_details)


def _counted_server(make: Callable[..., grpc.aio.Server]) -> Callable[..., grpc.aio.Server]:
    def server(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        kwargs["interceptors"] = [*kwargs.get("interceptors", ()), _Counting()]
        return make(*args, **kwargs)

    return server


async def ingest(request: pb.IngestRequest) -> pb.IngestResponse:
    source = request.source
    return pb.IngestResponse(
        events=[
            event_pb.Event(id=str(i), source=source, event_type="line", payload=line)
            for i, line in enumerate(request.data.splitlines())
        ]
    )


async def health() -> pb.PluginHealthResponse:
    counts = " ".join(f"{method}={n}" for method, n in sorted(calls.items()))
    return pb.PluginHealthResponse(healthy=True, message=counts)


def parse_counts(message: str) -> dict[str, int]:
    """The counts a ``Health`` answer of this plugin carries, by full method name."""
    counts: dict[str, int] = {}
    for item in message.split():
        method, _, n = item.rpartition("=")
        counts[method] = int(n)
    return counts


async def main(registry: str) -> None:
    grpc.aio.server = _counted_server(grpc.aio.server)
    host = PluginHost(
        {"name": NAME, "version": "1", "sources": [SOURCE]},
        ingest=ingest,
        health=health,
        registry=registry,
        grace=1.0,
    )
    await host.start()
    print(f"listening on {host.address}", flush=True)
    await serve_until_signalled(host)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
