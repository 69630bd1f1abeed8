"""Helpers for tests, ours and plugin authors': a running registry and a fake plugin.

    async with running_registry(tmp_path) as registry, FakePlugin(sources=["k8s"]) as plugin:
        ...

``python -m registry.testing --name N --source S`` runs a FakePlugin as its own
process (for crash tests): it prints ``listening on HOST:PORT`` and serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import ipaddress
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from registry.lifecycle import AsyncService
from registry.model import PluginType
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from registry.trust.addresses import HostResolver, IPAddress
from registry.wire import event_pb, pb, pb_grpc

IngestHandler = Callable[[pb.IngestRequest], pb.IngestResponse | Awaitable[pb.IngestResponse]]


async def eventually(
    probe: Callable[[], Any],
    *,
    within: float = 10.0,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.01,
) -> Any:
    """Poll ``probe`` (sync or async) until it gives something truthy; return that.

    The way to wait in a test: on a condition, with a deadline, never a bare sleep.

    Raises:
        AssertionError: ``within`` seconds passed first; the message names ``what``
            (called at that moment when it is a function, to show the last state seen).
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {within}s waiting for {text}")
        await asyncio.sleep(interval)


class StaticResolver:
    """A host-name resolver from a table, for tests: other names do not resolve.

    Tests must not ask real DNS; ``set`` changes an answer (DNS rebinding tests).
    """

    def __init__(self, table: Mapping[str, Sequence[str]] | None = None) -> None:
        self.table: dict[str, list[IPAddress]] = {}
        self.lookups: list[str] = []
        for host, ips in (table if table is not None else {"localhost": ["127.0.0.1"]}).items():
            self.set(host, *ips)

    def set(self, host: str, *ips: str) -> None:
        self.table[host.lower()] = [ipaddress.ip_address(ip) for ip in ips]

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.lookups.append(host)
        return list(self.table.get(host.lower(), ()))


@contextlib.asynccontextmanager
async def running_registry(
    folder: Path | str, *, resolver: HostResolver | None = None, **settings: Any
) -> AsyncIterator[RegistryServer]:
    """A registry on 127.0.0.1:0 over an SQLite file in ``folder``; stopped on exit.

    Host names resolve through ``resolver``, by default a :class:`StaticResolver` that
    knows only ``localhost``: tests never ask real DNS.
    """
    settings.setdefault("listen", "127.0.0.1:0")
    if "database_url" not in settings:
        await asyncio.to_thread(Path(folder).mkdir, parents=True, exist_ok=True)
        settings["database_url"] = f"sqlite:///{Path(folder) / 'registry.db'}"
    server = RegistryServer(RegistrySettings(**settings), resolver=resolver or StaticResolver())
    async with server:
        yield server


def echo_lines(request: pb.IngestRequest) -> pb.IngestResponse:
    """The default transform: one event per non-empty line of the payload."""
    events = [
        event_pb.Event(
            id=f"{request.source}-{i}", source=request.source, event_type="line", payload=line
        )
        for i, line in enumerate(request.data.splitlines())
        if line
    ]
    return pb.IngestResponse(events=events)


class FakePlugin(AsyncService):
    """A real ingestor or emitter gRPC server on 127.0.0.1:0 whose answers a test controls.

    Set ``healthy``/``health_message`` to change what Health answers, ``health_delay``
    to make it hang, ``ingest`` to change the transform. ``health_calls`` and
    ``ingest_calls`` count calls.
    """

    def __init__(
        self,
        *,
        name: str = "fake",
        type: PluginType = PluginType.INGESTOR,
        sources: Sequence[str] = ("fake",),
        emitter_name: str = "",
        healthy: bool = True,
        health_message: str = "",
        ingest: IngestHandler = echo_lines,
        port: int = 0,
    ) -> None:
        self.name = name
        self.type = type
        self.sources = list(sources) if type is PluginType.INGESTOR else []
        self.emitter_name = emitter_name
        self.healthy = healthy
        self.health_message = health_message
        self.health_delay = 0.0
        self.ingest = ingest
        self.health_calls = 0
        self.ingest_calls = 0
        self.emitted: list[event_pb.Event] = []
        self.port = port
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def info(self) -> pb.PluginInfo:
        return pb.PluginInfo(
            name=self.name,
            version="0.0.1",
            type=int(self.type),  # type: ignore[arg-type]
            sources=self.sources,
            emitter_name=self.emitter_name,
        )

    async def start(self) -> None:
        # No SO_REUSEPORT: a port in use must fail, not be shared with another process.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        servicer = _Servicer(self)
        if self.type is PluginType.INGESTOR:
            pb_grpc.add_IngestorPluginServicer_to_server(servicer, server)
        else:
            pb_grpc.add_EmitterPluginServicer_to_server(servicer, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; idempotent. The port stays recorded so it can start again on it."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)


class _Servicer:
    """Both plugin services; the fake answers whichever its type registers."""

    def __init__(self, fake: FakePlugin) -> None:
        self._fake = fake

    async def Info(self, request: Empty, context: grpc.aio.ServicerContext) -> pb.PluginInfo:
        return self._fake.info()

    async def Health(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.PluginHealthResponse:
        fake = self._fake
        fake.health_calls += 1
        if fake.health_delay:
            await asyncio.sleep(fake.health_delay)  # a hanging plugin, on purpose
        return pb.PluginHealthResponse(healthy=fake.healthy, message=fake.health_message)

    async def Ingest(
        self, request: pb.IngestRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        self._fake.ingest_calls += 1
        result = self._fake.ingest(request)
        return await result if inspect.isawaitable(result) else result

    async def Emit(
        self, request: pb.EmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmitResponse:
        self._fake.emitted.extend(request.events)
        return pb.EmitResponse(success_count=len(request.events))

    async def Shutdown(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.ShutdownResponse:
        return pb.ShutdownResponse(success=True)


async def _serve_fake(args: argparse.Namespace) -> None:
    plugin_type = PluginType.EMITTER if args.emitter else PluginType.INGESTOR
    fake = FakePlugin(
        name=args.name,
        type=plugin_type,
        sources=args.source or ["fake"],
        emitter_name=args.emitter_name,
        healthy=not args.unhealthy,
        port=args.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with fake:
        print(f"listening on {fake.address}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m registry.testing", description="Run a fake plugin."
    )
    parser.add_argument("--name", default="fake")
    parser.add_argument("--source", action="append")
    parser.add_argument("--emitter", action="store_true")
    parser.add_argument("--emitter-name", default="")
    parser.add_argument("--unhealthy", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(_serve_fake(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
