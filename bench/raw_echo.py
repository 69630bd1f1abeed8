"""The ceiling of bench/stream_bench.py: raw grpc.aio ingest, unary and streamed, no work.

    python -m bench.raw_echo      # prints "serving on HOST:PORT" on stderr

Serves ``polku.v1.IngestorPlugin/Ingest`` and ``polku.v1.IngestorStream/IngestStream``
with raw bytes in and out (no deserialising, no handler, no serialising): every
request is answered with one canned ``IngestResponse`` of one event. Whatever a gateway
and a plugin do per request on top of gRPC, they can only lower what this reaches, so
its streaming-to-unary ratio bounds the ratio of the real paths (SPEC §5's streaming
row).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from registry.wire import event_pb, pb

UNARY_METHOD = "/polku.v1.IngestorPlugin/Ingest"
STREAM_METHOD = "/polku.v1.IngestorStream/IngestStream"
ANSWER = pb.IngestResponse(
    events=[event_pb.Event(id="0", source="raw", event_type="line", payload=b"x" * 60)]
).SerializeToString()


async def _ingest(request: bytes, context: Any) -> bytes:
    return ANSWER


async def _ingest_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield ANSWER


async def serve() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "polku.v1.IngestorPlugin",
                {"Ingest": grpc.unary_unary_rpc_method_handler(_ingest)},
            ),
            grpc.method_handlers_generic_handler(
                "polku.v1.IngestorStream",
                {"IngestStream": grpc.stream_stream_rpc_method_handler(_ingest_stream)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve())
