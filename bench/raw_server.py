"""The baseline: a raw grpc.aio PluginRegistry servicer that does no work.

It answers every call with a canned response of the same size as the registry's,
so the ratio measures the registry's own cost. Run as a subprocess by the
benchmarks; prints ``serving on HOST:PORT`` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
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


async def serve(list_size: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_PluginRegistryServicer_to_server(NoopRegistry(list_size), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--list-size", type=int, default=0)
    asyncio.run(serve(parser.parse_args().list_size))
