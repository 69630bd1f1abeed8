"""Writes against a cluster: Register that retries, bursts of Register/Unregister,
a heartbeat loop, and one blocking Register on a channel of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from registry.wire import pb, pb_grpc

from .cluster import Cluster
from .common import DEADLINE, rpc_error, until

LONG_LEASE = 3600
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def register_request(name: str, port: int, *, lease: int = LONG_LEASE) -> pb.RegisterRequest:
    """An ingestor ``name`` with the source ``name`` at 127.0.0.1:``port``."""
    return pb.RegisterRequest(
        info=pb.PluginInfo(
            name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[name]
        ),
        address=f"127.0.0.1:{port}",
        lease_ttl_seconds=lease,
    )


async def register_retrying(
    cluster: Cluster,
    targets: Callable[[], Sequence[str]] | Sequence[str],
    request: pb.RegisterRequest,
    *,
    within: float = DEADLINE,
) -> pb.RegisterResponse:
    """Register through each target in turn until one accepts; retries UNAVAILABLE.

    Raises:
        AssertionError: another error code, or no success within ``within``.
    """
    errors: list[str] = []

    async def attempt() -> pb.RegisterResponse | None:
        addresses = targets() if callable(targets) else targets
        for address in addresses:
            try:
                response: pb.RegisterResponse = await cluster.client(address).stub.Register(
                    request, timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise AssertionError(
                        f"Register of {request.info.name} through {address}: {rpc_error(exc)} "
                        "(want success, or UNAVAILABLE while no leader is known)"
                    ) from exc
                errors.append(f"{address}: {rpc_error(exc)}")
                continue
            if response.accepted:
                return response
            errors.append(f"{address}: not accepted: {response.message}")
        return None

    def seen() -> str:
        return f"Register of {request.info.name} to be accepted; last answers {errors[-4:]}"

    response: pb.RegisterResponse = await until(attempt, within=within, what=seen, interval=0.1)
    return response


@dataclass
class Churn:
    """What a burst of Register/Unregister calls got acknowledged."""

    acknowledged: dict[str, str] = field(default_factory=dict)  # plugin_id -> name
    unregistered: set[str] = field(default_factory=set)  # removals acknowledged
    unsure: set[str] = field(default_factory=set)  # removals that failed: either state is fine
    errors: list[str] = field(default_factory=list)
    codes: set[str] = field(default_factory=set)
    calls: int = 0

    @property
    def kept(self) -> set[str]:
        """Acknowledged registrations the test never asked to remove."""
        return set(self.acknowledged) - self.unregistered - self.unsure


async def churn(
    cluster: Cluster,
    targets: Sequence[str],
    *,
    prefix: str,
    registers: int,
    unregister: Callable[[int], bool],
    concurrency: int = 32,
    halfway: asyncio.Event | None = None,
    port_base: int = 20000,
) -> Churn:
    """``registers`` Registers spread round-robin over ``targets``; each one ``unregister``
    picks is then removed through the next target. At most ``concurrency`` in flight.

    Every call is made once; failures are recorded, not retried. ``halfway`` is set once
    half of the registrations have been acknowledged.
    """
    result = Churn()
    gate = asyncio.Semaphore(concurrency)

    async def call(method: str, address: str, request: Any) -> Any:
        async with gate:
            result.calls += 1
            return await getattr(cluster.client(address).stub, method)(request, timeout=30)

    async def one(i: int) -> None:
        name = f"{prefix}-{i}"
        address = targets[i % len(targets)]
        try:
            response = await call("Register", address, register_request(name, port_base + i))
        except grpc.aio.AioRpcError as exc:
            result.codes.add(exc.code().name)
            result.errors.append(f"Register {name} via {address}: {rpc_error(exc)}")
            return
        if not response.accepted or not response.plugin_id:
            result.codes.add("NOT_ACCEPTED")
            result.errors.append(f"Register {name} via {address}: not accepted: {response}")
            return
        result.acknowledged[response.plugin_id] = name
        if halfway is not None and len(result.acknowledged) >= registers // 2:
            halfway.set()
        if not unregister(i):
            return
        other = targets[(i + 1) % len(targets)]
        try:
            await call("Unregister", other, pb.UnregisterRequest(plugin_id=response.plugin_id))
        except grpc.aio.AioRpcError as exc:
            result.codes.add(exc.code().name)
            result.errors.append(f"Unregister {name} via {other}: {rpc_error(exc)}")
            result.unsure.add(response.plugin_id)
            return
        result.unregistered.add(response.plugin_id)

    await asyncio.gather(*(one(i) for i in range(registers)))
    return result


class Heartbeats:
    """Heartbeats plugin ids about every ``every`` seconds through whichever live replica
    answers, until stopped. ``refused`` collects every heartbeat answered not acknowledged;
    ``rounds`` counts the rounds done (every id heartbeated once).
    """

    def __init__(self, cluster: Cluster, ids: Iterable[str], every: float = 1.0) -> None:
        self.cluster = cluster
        self.ids = list(ids)
        self.every = every
        self.refused: list[tuple[str, str]] = []  # (plugin_id, replica)
        self.acknowledged = 0
        self.errors: list[str] = []
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._turn = 0

    def start(self) -> Heartbeats:
        self._task = asyncio.create_task(self._run(), name="heartbeats")
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._beat(i) for i in self.ids))
            self.rounds += 1
            await asyncio.sleep(self.every)  # a rate, not a synchronisation

    async def wait_rounds(self, more: int) -> None:
        """Wait until ``more`` further rounds are done.

        Raises:
            AssertionError: not within a deadline that allows three times the rate.
        """
        target = self.rounds + more
        await until(
            lambda: self.rounds >= target,
            within=DEADLINE + 3 * more * self.every,
            what=lambda: (
                f"{more} more heartbeat rounds (at {self.rounds}, want {target}); "
                f"last errors {self.errors[-3:]}"
            ),
        )

    async def _beat(self, plugin_id: str) -> None:
        live = self.cluster.live()
        self._turn += 1
        for k in range(len(live)):
            address = live[(self._turn + k) % len(live)]
            try:
                response = await self.cluster.client(address).stub.Heartbeat(
                    pb.HeartbeatRequest(plugin_id=plugin_id), timeout=2
                )
            except grpc.aio.AioRpcError as exc:
                self.errors.append(f"{address}: {rpc_error(exc)}")
                continue
            if response.acknowledged:
                self.acknowledged += 1
            else:
                self.refused.append((plugin_id, address))
            return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- one call, blocking ------------------------------------------------------------------


def blocking_register(
    address: str, request: pb.RegisterRequest, timeout: float
) -> tuple[pb.RegisterResponse | None, str]:
    """One Register on a channel of its own, blocking (run it in a thread).

    Returns the response, or None and the status code's name.
    """
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.PluginRegistryStub(channel)
        try:
            return stub.Register(request, timeout=timeout), ""
        except grpc.RpcError as exc:
            return None, f"{exc.code().name}: {exc.details()}"
