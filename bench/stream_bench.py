"""Events/s through ONE external Python SDK plugin process, by gateway configuration.

The plugin is bench/stream_plugin.py (a PluginHost, async ``ingest``, one event per
line), its own process with a core of its own, as is the registry; the gateway (the
clients) runs here. Every configuration sends the same payloads, 64 in flight:

- the bare generated stub (``IngestorPluginStub.Ingest``, async, one channel): the
  in-language limit, the baseline of every row;
- ``ExternalIngestor`` unary, resolved through the registry (source ``unary``: the
  same address registered by this benchmark without capabilities, as an upstream
  plugin is, so the gateway has no stream to take);
- ``ExternalIngestor`` streaming (source ``stream``: the SDK's own registration, with
  whatever capabilities the SDK advertises; ``ingest.stream.v1`` once it serves
  ``IngestorStream``). The plugin counts the RPCs by method: a streaming row whose runs
  made unary ``Ingest`` calls says "measured unary";
- ``channels_per_endpoint=4``, unary, and streaming with it.

Two payloads: one event (the cost of a call: where streaming shows) and 100 events
(the cost of events: the seed's "10k events/s → go native" threshold). The
configurations are interleaved in every repetition, in a rotating order, so all see
the same (shared, noisy) machine. Prints numbers, never verdicts.

Rows: ``1 plugin, N ev/req, CONFIG / stub`` (every ExternalIngestor configuration,
resolved, against the stub; N events per request), ``streaming / unary`` (SPEC §5:
≥ 3 times), and the most events/s any gateway configuration got with 100-event requests,
against 10,000 events/s.

And the ceiling of the streaming row: bare ``grpc.aio`` against bench/raw_echo.py (its
own process, raw bytes both ways, no work on either side), 64 in flight, unary calls
against the same requests on as many streams as ExternalIngestor opens on a busy
channel. No gateway and no plugin does less per request than that, so the real
``streaming / unary`` ratio can reach this one only by doing less per unary call
than per streamed message.

    python -m bench.stream_bench [--quick]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from bench.common import Load, Process, closed_loop, python, row
from bench.raw_echo import STREAM_METHOD as RAW_STREAM_METHOD
from bench.raw_echo import UNARY_METHOD as RAW_UNARY_METHOD
from bench.stream_plugin import NAME, SOURCE, parse_counts
from ingestor import ExternalIngestor, IngestContext, RegistryResolver
from ingestor.stream import DEFAULT_STREAMS_PER_CHANNEL
from registry.client import RegistryClient
from registry.wire import pb, pb_grpc

UNARY_SOURCE = "unary"
IN_FLIGHT = 64
THRESHOLD = 10_000.0  # the seed: "10k events/s → go native"
STREAM_METHOD = "polku.v1.IngestorStream/IngestStream"
UNARY_METHOD = "polku.v1.IngestorPlugin/Ingest"
# One event per line; the line is about the size of a small log record.
PAYLOADS = {
    1: b"x" * 60 + b"\n",
    100: b"".join(b"%03d " % i + b"x" * 56 + b"\n" for i in range(100)),
}


@dataclass
class Config:
    """One way of calling the plugin, and what its runs measured."""

    label: str
    call: Callable[[bytes], Awaitable[int]]  # one payload; the events it gave
    loads: dict[int, list[Load]] = field(default_factory=dict)
    streams: int = 0  # IngestStream RPCs the plugin saw during its runs
    unary: int = 0  # Ingest RPCs the plugin saw during its runs

    def rate(self, events: int) -> float:
        loads = self.loads.get(events, [])
        seconds = sum(x.seconds for x in loads)
        return sum(x.calls for x in loads) / seconds if seconds else 0.0


def _registry(db: str) -> Process:
    args = [python(), "-m", "registry", "serve", "--listen", "127.0.0.1:0", "--db", db]
    return Process([*args, "--health-interval", "1h"])


def _raw_echo() -> Process:
    return Process([python(), "-m", "bench.raw_echo"])


def _plugin(registry: str) -> Process:
    args = [python(), "-u", "-m", "bench.stream_plugin", registry]
    return Process(args, r"listening on (\S+)", stdout=True)


async def _counts(stub: pb_grpc.IngestorPluginStub) -> dict[str, int]:
    answer = await stub.Health(Empty(), timeout=10)
    return parse_counts(answer.message)


async def _measure(
    configs: list[Config], stub: pb_grpc.IngestorPluginStub, rounds: int, seconds: float
) -> None:
    for r in range(rounds):
        for events, payload in PAYLOADS.items():
            turn = r % len(configs)
            for config in configs[turn:] + configs[:turn]:
                before = await _counts(stub)
                load = await _closed(config, payload, seconds)
                after = await _counts(stub)
                config.loads.setdefault(events, []).append(load)
                config.streams += after.get(STREAM_METHOD, 0) - before.get(STREAM_METHOD, 0)
                config.unary += after.get(UNARY_METHOD, 0) - before.get(UNARY_METHOD, 0)


async def _closed(config: Config, payload: bytes, seconds: float) -> Load:
    async def call(i: int) -> int:
        return await config.call(payload)

    return await closed_loop(call, concurrency=IN_FLIGHT, seconds=seconds)


def _rows(configs: list[Config]) -> list[dict[str, Any]]:
    stub, unary, *others = configs
    rows: list[dict[str, Any]] = []
    for events in PAYLOADS:
        base = stub.rate(events) * events
        for config, target in ((unary, "≥ 0.90"), *((c, "") for c in others)):
            rows.append(
                row(
                    f"1 plugin, {events} ev/req, {config.label} / stub",
                    config.rate(events) * events,
                    base,
                    target,
                    "events/s",
                )
            )
        streaming = others[0]
        rows.append(
            row(
                f"1 plugin, {events} ev/req, {streaming.label} / unary",
                streaming.rate(events) * events,
                unary.rate(events) * events,
                "≥ 3.00" if events == 1 else "",
                "events/s",
            )
        )
    top = max(PAYLOADS)
    best = max([unary, *others], key=lambda c: c.rate(top))
    rows.append(
        row(
            f"most events/s 1 Python plugin sustains via gateway ({best.label}, "
            f"{top} ev/req) / seed's 10k",
            best.rate(top) * top,
            THRESHOLD,
            "> 1.00: 10k events/s → go native",
            "events/s",
        )
    )
    return rows


def _stream_label(config: Config) -> None:
    """Name what a streaming configuration really measured (from the plugin's counts)."""
    # A stream lives across runs (opened in the warm-up), so count the unary calls:
    # a streaming run makes none.
    if config.unary:
        config.label += f" (measured unary: {config.unary} unary calls)"


async def _bench(quick: bool, registry: str, plugin: str) -> list[dict[str, Any]]:
    rounds, seconds = (1, 0.25) if quick else (6, 1.0)
    async with RegistryClient(registry) as client:
        # The same process again, as an upstream plugin registers: no capabilities.
        info = pb.PluginInfo(
            name=f"{NAME}-unary", version="1", type=pb.PLUGIN_TYPE_INGESTOR, sources=[UNARY_SOURCE]
        )
        await client.register(info, plugin, no_lease=True)
    stub_channel = grpc.aio.insecure_channel(plugin)
    stub = pb_grpc.IngestorPluginStub(stub_channel)
    async with RegistryResolver(registry) as resolver:
        await resolver.wait_for_async(
            lambda v: bool(v.endpoints(SOURCE)) and bool(v.endpoints(UNARY_SOURCE)), 30
        )
        ingestors = {
            "unary": ExternalIngestor(UNARY_SOURCE, resolver=resolver),
            "stream": ExternalIngestor(SOURCE, resolver=resolver),
            "unary4": ExternalIngestor(UNARY_SOURCE, resolver=resolver, channels_per_endpoint=4),
            "stream4": ExternalIngestor(SOURCE, resolver=resolver, channels_per_endpoint=4),
        }
        try:
            configs = [
                Config("bare stub", _stub_call(stub)),
                Config("unary", _call(ingestors["unary"])),
                Config("streaming", _call(ingestors["stream"])),
                Config("unary, 4 channels", _call(ingestors["unary4"])),
                Config("streaming, 4 channels", _call(ingestors["stream4"])),
            ]
            for config in configs:  # connect (every channel) outside the measurement
                await asyncio.gather(*(config.call(PAYLOADS[1]) for _ in range(IN_FLIGHT)))
            await _measure(configs, stub, rounds, seconds)
        finally:
            for ingestor in ingestors.values():
                await ingestor.aclose()
            await stub_channel.close()
    for streaming in (configs[2], configs[4]):
        _stream_label(streaming)
    return _rows(configs)


def _stub_call(stub: pb_grpc.IngestorPluginStub) -> Callable[[bytes], Awaitable[int]]:
    async def call(payload: bytes) -> int:
        response = await stub.Ingest(pb.IngestRequest(source=SOURCE, data=payload), timeout=30)
        return len(response.events)

    return call


def _call(ingestor: ExternalIngestor) -> Callable[[bytes], Awaitable[int]]:
    ctx = IngestContext(ingestor.source)

    async def call(payload: bytes) -> int:
        return len(await ingestor.ingest_async(ctx, payload))

    return call


async def _raw_unary(channel: grpc.aio.Channel, request: bytes, seconds: float) -> Load:
    method = channel.unary_unary(RAW_UNARY_METHOD)

    async def call(i: int) -> object:
        return await method(request, timeout=30)

    return await closed_loop(call, concurrency=IN_FLIGHT, seconds=seconds)


async def _raw_streams(channel: grpc.aio.Channel, request: bytes, seconds: float) -> Load:
    """``IN_FLIGHT`` requests kept in flight over the streams, each stream its own window."""
    streams = DEFAULT_STREAMS_PER_CHANNEL
    answered = 0
    deadline = asyncio.get_running_loop().time() + seconds

    async def one() -> None:
        nonlocal answered
        call = channel.stream_stream(RAW_STREAM_METHOD)()
        window = asyncio.Semaphore(IN_FLIGHT // streams)

        async def read() -> None:
            nonlocal answered
            while await call.read() is not grpc.aio.EOF:
                answered += 1
                window.release()

        reader = asyncio.ensure_future(read())
        while asyncio.get_running_loop().time() < deadline:
            await window.acquire()
            await call.write(request)
        await call.done_writing()
        await reader

    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(streams))), seconds + 30)
    return Load(answered, asyncio.get_running_loop().time() - began, [])


async def _ceiling(address: str, rounds: int, seconds: float) -> dict[str, Any]:
    """The raw streamed rate against the raw unary one, interleaved in every round."""
    request = pb.IngestRequest(source=SOURCE, data=PAYLOADS[1]).SerializeToString()
    unary: list[Load] = []
    streamed: list[Load] = []
    async with grpc.aio.insecure_channel(address) as channel:
        await _raw_unary(channel, request, 0.1)  # connect outside the measurement
        for r in range(rounds):
            pair = [(unary, _raw_unary), (streamed, _raw_streams)]
            for loads, measure in pair if r % 2 == 0 else pair[::-1]:
                loads.append(await measure(channel, request, seconds))

    def rate(loads: list[Load]) -> float:
        return sum(x.calls for x in loads) / sum(x.seconds for x in loads)

    return row(
        f"ceiling: raw grpc.aio, no work, 1 ev/req, {DEFAULT_STREAMS_PER_CHANNEL} streams / unary",
        rate(streamed),
        rate(unary),
        "bounds the ≥ 3.00 row",
        "events/s",
    )


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for bench/run.py. Bounded in time (``quick``: seconds; full: about 80 s)."""

    async def main() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory() as folder:
            registry = _registry(f"sqlite:///{folder}/stream.db")
            plugin: Process | None = None
            try:
                registry_address = registry.wait_ready()
                plugin = _plugin(registry_address)
                rows = await _bench(quick, registry_address, plugin.wait_ready())
            finally:
                if plugin is not None:
                    plugin.stop()
                registry.stop()
        echo = _raw_echo()
        try:
            rounds, seconds = (1, 0.25) if quick else (6, 1.0)
            rows.append(await _ceiling(echo.wait_ready(), rounds, seconds))
        finally:
            echo.stop()
        return rows

    return asyncio.run(main())


if __name__ == "__main__":
    from bench.run import print_table

    print_table(run(quick="--quick" in sys.argv))
