"""A follower's link to the leader: writes forwarded with the caller's identity, and
heartbeats handed over in batches (SPEC §8).

A forwarded call carries the cluster token and the verified principal's name (never
the caller's own token); the leader's interceptor trusts the name only with the
token (``registry.trust.auth``). Answers and errors come back as the leader gave
them: its messages are already fit for clients. The leader names the revision of
a write in trailing metadata, so the follower answers only once its own catalogue
has it: a client reads its own write from the replica that took it.

Heartbeats are answered by the follower at once and reach the leader in batches of
the ids renewed since the last one, every ``flush_interval``; a batch that does not
arrive is kept and sent with the next (one entry per plugin, so it stays bounded by
the catalogue).

A channel given up (the leader moved, or a batch did not arrive) is closed with a
grace of ``timeout``: the calls still on it end by their own deadline, not by a
cancellation. A forwarded call cancelled here all the same (the link stopping)
raises :class:`RegistryUnavailable`: a ``CancelledError`` out of a handler is taken
by gRPC for the client's own cancellation and answered with nothing, so the client
would wait out its whole deadline (SPEC §8: writes answer ``UNAVAILABLE`` meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc

from registry.errors import RegistryUnavailable
from registry.lifecycle import cancel_and_wait
from registry.model import Principal
from registry.trust.auth import CLUSTER_TOKEN_KEY, FORWARDED_FOR_KEY, FORWARDED_PEER_KEY
from registry.wire import pb, pb_grpc

log = logging.getLogger(__name__)

REVISION_KEY = "x-polku-revision"
_MAX_BATCH = 5000  # heartbeats per forwarded batch
UNREACHABLE = "the registry leader cannot be reached right now; retry shortly"
NO_LEADER = "no registry leader is known right now (an election is under way); retry shortly"


class LeaderLink:
    """Channels to the current leader, made again when the leader changes."""

    def __init__(
        self,
        *,
        leader_address: Callable[[], str | None],
        cluster_token: str | None,
        credentials: grpc.ChannelCredentials | None,
        timeout: float = 5.0,
        flush_interval: float = 0.1,
        on_refused: Callable[[list[str]], None] = lambda plugin_ids: None,
    ) -> None:
        self._leader_address = leader_address
        self._token = cluster_token
        self._credentials = credentials
        self.timeout = timeout
        self._flush_interval = flush_interval
        self._on_refused = on_refused
        self._address: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._registry: pb_grpc.PluginRegistryStub | None = None
        self._replica: pb_grpc.RegistryReplicaStub | None = None
        self._heartbeats: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        # Channels given up, closing with a grace so the calls on them end on their own.
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.refused = 0  # forwarded heartbeats the leader did not renew

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._flush_loop(), name="registry-heartbeat-batches")

    async def stop(self) -> None:
        """Stop batching and close every channel now (calls still on them answer
        :class:`RegistryUnavailable`)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._close()
        retiring, self._retiring = self._retiring, {}
        for closing, channel in retiring.items():
            await cancel_and_wait(closing)
            await channel.close()

    def metadata(self, principal: Principal | None, peer: str) -> tuple[tuple[str, str], ...]:
        entries = [(FORWARDED_FOR_KEY, principal.name if principal is not None else "")]
        entries.append((FORWARDED_PEER_KEY, peer))
        if self._token:
            entries.append((CLUSTER_TOKEN_KEY, self._token))
        return tuple(entries)

    async def forward(
        self, method: str, request: Any, principal: Principal | None, peer: str
    ) -> tuple[Any, int]:
        """Call ``method`` of the leader's PluginRegistry as the caller; returns the
        answer and the revision the leader named (0 if none).

        Raises:
            RegistryUnavailable: no leader is known, or it cannot be reached.
            grpc.aio.AioRpcError: the leader answered with an error (pass it on).
        """
        stub = self._stubs()[0]
        call = getattr(stub, method)(
            request, timeout=self.timeout, metadata=self.metadata(principal, peer)
        )
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise RegistryUnavailable(UNREACHABLE) from exc
            raise
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            # Only the call was cancelled (its channel closed under it): not the caller.
            raise RegistryUnavailable(UNREACHABLE) from None
        revision = 0
        for key, value in await call.trailing_metadata() or ():
            if key == REVISION_KEY and str(value).isdigit():
                revision = int(value)
        return response, revision

    def heartbeat(self, plugin_id: str, principal: Principal | None) -> None:
        """Queue a renewal for the leader (the follower has answered it already)."""
        self._heartbeats[plugin_id] = principal.name if principal is not None else ""

    def take_heartbeats(self) -> list[str]:
        """The queued heartbeats' ids, dequeued (a new leader applies them itself)."""
        queued, self._heartbeats = list(self._heartbeats), {}
        return queued

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            if self._heartbeats:
                with contextlib.suppress(RegistryUnavailable):
                    await self.flush()

    async def flush(self) -> None:
        """Send the queued heartbeats; kept for the next try when the leader is away.

        Raises:
            RegistryUnavailable: no leader, or the batch did not arrive.
        """
        batch = dict(list(self._heartbeats.items())[:_MAX_BATCH])
        stub = self._stubs()[1]
        request = pb.HeartbeatBatch(
            heartbeats=[
                pb.ForwardedHeartbeat(plugin_id=plugin_id, principal=principal)
                for plugin_id, principal in batch.items()
            ]
        )
        try:
            result = await stub.ForwardHeartbeats(
                request, timeout=self.timeout, metadata=self.metadata(None, "")
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("heartbeat batch not delivered: %s", exc.details())
            self._retire()  # a fresh channel next time; forwarded writes on it go on
            raise RegistryUnavailable("the registry leader cannot be reached") from exc
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            raise RegistryUnavailable("the registry leader cannot be reached") from None
        for plugin_id, principal in batch.items():
            if self._heartbeats.get(plugin_id) == principal:
                del self._heartbeats[plugin_id]
        self.refused += len(result.refused)
        if result.refused:
            self._on_refused(list(result.refused))

    def _stubs(self) -> tuple[pb_grpc.PluginRegistryStub, pb_grpc.RegistryReplicaStub]:
        address = self._leader_address()
        if address is None:
            raise RegistryUnavailable(NO_LEADER)
        if address != self._address or self._registry is None or self._replica is None:
            self._retire()
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials)
            else:
                channel = grpc.aio.insecure_channel(address)
            self._address, self._channel = address, channel
            self._registry = pb_grpc.PluginRegistryStub(channel)
            self._replica = pb_grpc.RegistryReplicaStub(channel)
        return self._registry, self._replica

    def _retire(self) -> None:
        """Give the current channel up: new calls get a new one; those on it may end
        within ``timeout`` before it is closed."""
        channel, self._channel = self._channel, None
        self._address = self._registry = self._replica = None
        if channel is not None:
            closing = asyncio.get_running_loop().create_task(
                channel.close(grace=self.timeout), name="registry-leader-channel-close"
            )
            self._retiring[closing] = channel
            closing.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _close(self) -> None:
        channel, self._channel = self._channel, None
        self._address = self._registry = self._replica = None
        if channel is not None:
            await channel.close()


def _cancelled_here() -> bool:
    """Whether the running task itself is being cancelled (not merely a call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
