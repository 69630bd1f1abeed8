"""The baseline: a raw grpc.aio PluginRegistry servicer that does no work.

It answers every call with a canned response of the same size as the registry's,
so the ratio measures the registry's own cost. Run as a subprocess by the
benchmarks; prints ``serving on HOST:PORT`` on stderr. With ``--tls-cert`` and
``--tls-key`` it serves TLS, the baseline of the registry's own TLS (bench/trust_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from registry.ulid import new_ulid
from registry.wire import pb, pb_grpc


def canned_plugin(i: int) -> pb.RegisteredPlugin:
    return pb.RegisteredPlugin(
        plugin_id=new_ulid(),
        info=pb.PluginInfo(name=f"bench-{i}", version="1.0.0", type=1, sources=[f"src-{i}"]),  # type: ignore[arg-type]
        address="127.0.0.1:1",
        status=2,  # type: ignore[arg-type]
        lease_ttl_seconds=30,
        revision=i,
    )


class NoopRegistry(pb_grpc.PluginRegistryServicer):  # type: ignore[misc]
    def __init__(self, list_size: int) -> None:
        self._register = pb.RegisterResponse(
            accepted=True,
            message="registered",
            plugin_id=new_ulid(),
            lease_ttl_seconds=30,
            heartbeat_interval_seconds=10,
        )
        self._heartbeat = pb.HeartbeatResponse(acknowledged=True)
        self._resolve = pb.ResolveResponse(
            endpoints=[pb.Endpoint(plugin_id=new_ulid(), address="127.0.0.1:1", status=2)],  # type: ignore[arg-type]
            revision=1,
        )
        self._plugins = [canned_plugin(i) for i in range(list_size)]

    async def Register(self, request: Any, context: Any) -> pb.RegisterResponse:
        return self._register

    async def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatResponse:
        return self._heartbeat

    async def Unregister(self, request: Any, context: Any) -> Empty:
        return Empty()

    async def Resolve(self, request: Any, context: Any) -> pb.ResolveResponse:
        return self._resolve

    async def ListPlugins(self, request: Any, context: Any) -> pb.ListPluginsResponse:
        # Built per call, as the registry does, so message construction is in both.
        return pb.ListPluginsResponse(plugins=self._plugins, revision=1)


async def serve(list_size: int, tls: tuple[bytes, bytes] | None = None) -> None:
    """Serve until terminated; TLS when ``tls`` is given, as (PEM key, PEM chain)."""
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_PluginRegistryServicer_to_server(NoopRegistry(list_size), server)
    if tls is not None:
        # Plain static credentials: the registry's reloading ones ask for changes only
        # before a handshake, never per call, so per call the two cost the same.
        credentials = grpc.ssl_server_credentials([tls])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--list-size", type=int, default=0)
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain")
    parser.add_argument("--tls-key", type=Path, help="key of --tls-cert")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert is not None:
        tls = (args.tls_key.read_bytes(), args.tls_cert.read_bytes())
    asyncio.run(serve(args.list_size, tls))
