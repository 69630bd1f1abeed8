"""The in-process SDK emit handler the emitter tests share: records, fails as told."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ingestor import RetryPolicy
from registry.sdk import PluginHost
from registry.wire import event_pb, pb

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, budget=10.0)


def events(*ids: str) -> list[event_pb.Event]:
    return [event_pb.Event(id=i, source="test", payload=i.encode()) for i in ids]


@dataclass
class Sink:
    """An emit handler that records every request and fails ids as told."""

    fail: set[str] = field(default_factory=set)  # for good
    retry_once: set[str] = field(default_factory=set)  # retryably, the first time
    always_retry: set[str] = field(default_factory=set)
    raise_on: set[str] = field(default_factory=set)  # the handler raises: INTERNAL
    requests: list[list[str]] = field(default_factory=list)
    shutdowns: int = 0
    shutdown_raises: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, request: pb.EmitRequest) -> pb.EmitResponse:
        ids = [e.id for e in request.events]
        with self.lock:
            self.requests.append(ids)
        if self.raise_on & set(ids):
            raise RuntimeError("the sink is down")
        response = pb.EmitResponse()
        for i in ids:
            if i in self.fail:
                response.failed_event_ids.append(i)
                response.errors.append(pb.EmitError(event_id=i, message="bad", retryable=False))
            elif i in self.always_retry or i in self.retry_once:
                self.retry_once.discard(i)
                response.failed_event_ids.append(i)
                response.errors.append(pb.EmitError(event_id=i, message="busy", retryable=True))
            else:
                response.success_count += 1
        return response

    def shutdown(self) -> pb.ShutdownResponse:
        self.shutdowns += 1
        if self.shutdown_raises:
            raise RuntimeError("cannot flush")
        return pb.ShutdownResponse(success=True)

    def received(self) -> list[str]:
        return [i for request in self.requests for i in request]


class EmitterHosts:
    """SDK emitter plugins over sinks, registered with one registry, stopped together.

    ``hosts.make(sink, emitter_name, name=...)``: a PluginHost (not started) whose
    ``emit`` and ``shutdown`` are the sink's; ``name`` defaults to ``EMITTER-plugin``.
    """

    def __init__(self, registry: str) -> None:
        self.registry = registry
        self.made: list[PluginHost] = []

    def make(self, sink: Sink, emitter_name: str = "sink", *, name: str = "") -> PluginHost:
        plugin = PluginHost(
            {"name": name or f"{emitter_name}-plugin", "emitter_name": emitter_name},
            emit=sink.emit,
            shutdown=sink.shutdown,
            registry=self.registry,
        )
        self.made.append(plugin)
        return plugin

    async def stop(self) -> None:
        for plugin in self.made:
            await plugin.stop(0)
