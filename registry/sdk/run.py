"""run_plugin: a plugin's whole ``main``, from serving to unregistering on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from registry.client import DEFAULT_REGISTRY
from registry.sdk.handlers import EmitFn, HealthFn, IngestFn, ShutdownFn
from registry.sdk.host import PluginHost
from registry.trust.tls import TlsFiles
from registry.wire import pb

REGISTRY_ENV = "POLKU_REGISTRY"
TOKEN_ENV = "POLKU_REGISTRY_TOKEN"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger(__name__)


def run_plugin(
    info: pb.PluginInfo | Mapping[str, Any],
    plugin: object | None = None,
    *,
    ingest: IngestFn | None = None,
    emit: EmitFn | None = None,
    health: HealthFn | None = None,
    shutdown: ShutdownFn | None = None,
    registry: str | Sequence[str] | None = None,
    listen: str = "127.0.0.1:0",
    advertise: str | None = None,
    lease_ttl_seconds: int = 0,
    labels: Mapping[str, str] | None = None,
    grace: float = 5.0,
    token: str | None = None,
    tls: TlsFiles | None = None,
    **options: Any,
) -> None:
    """Serve a plugin and keep it registered until SIGTERM or SIGINT; blocks until then.

    The arguments are :class:`PluginHost`'s (``options`` takes the rest of them);
    ``registry=None`` reads ``POLKU_REGISTRY`` (one address, or replicas as ``a,b,c``),
    else ``127.0.0.1:50051``;
    ``token=None`` reads ``POLKU_REGISTRY_TOKEN`` (unset or empty: no token). On the
    first signal the plugin unregisters, then stops serving, letting calls in flight
    finish within ``grace`` seconds. A further signal hurries the stop but never skips
    the unregister: while unregistering, what is left of it gets ``grace`` seconds
    at most; once unregistered, calls in flight are cancelled instead of waited for
    (:meth:`PluginHost.hurry`). Call it from the main thread of a program that has
    no event loop running.

    Raises:
        ValueError, InvalidArgument: at once, for what the registry would refuse.
        RegistryError: at once, for a token in clear to a non-loopback registry or
            unusable TLS files; later, ``listen`` cannot be bound.
        InvalidArgument: later, if the registry refuses the registration for good.
    """
    host = PluginHost(
        info,
        plugin,
        ingest=ingest,
        emit=emit,
        health=health,
        shutdown=shutdown,
        registry=registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY,
        listen=listen,
        advertise=advertise,
        lease_ttl_seconds=lease_ttl_seconds,
        labels=labels,
        grace=grace,
        token=token if token is not None else os.environ.get(TOKEN_ENV) or None,
        tls=tls,
        **options,
    )
    asyncio.run(serve_until_signalled(host))


async def serve_until_signalled(host: PluginHost) -> None:
    """Run ``host`` until SIGTERM or SIGINT, then stop it (unregister, then drain).

    The signals stay handled until the stop has finished: a further one hurries the
    stop (:meth:`PluginHost.hurry`) rather than killing the process before its
    Unregister went out, which would leave a stale entry until the lease lapsed.

    Raises:
        InvalidArgument: the registry refused the registration for good.
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        name = host.info.name
        if not signalled.is_set():
            log.info("%s: unregistering plugin %s, then stopping", signum.name, name)
            signalled.set()
        else:
            log.info("%s again: hurrying the stop of plugin %s", signum.name, name)
            host.hurry()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with host:
            waiters = [
                asyncio.create_task(signalled.wait(), name="plugin-signal"),
                asyncio.create_task(host.wait(), name="plugin-host"),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.wait(waiters)
            if not waiters[1].cancelled():
                waiters[1].result()  # the registry's refusal; leaving the block stops the host
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
