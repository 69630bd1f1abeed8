"""Write a POLKU plugin in Python: serve it, register it, keep it registered.

    from registry.sdk import run_plugin
    from registry.wire import event_pb, pb

    def ingest(request: pb.IngestRequest) -> list[event_pb.Event]:
        return [event_pb.Event(id=str(i), source=request.source, payload=line)
                for i, line in enumerate(request.data.splitlines())]

    run_plugin({"name": "lines", "sources": ["lines"]}, ingest=ingest)

:func:`run_plugin` is a whole ``main``: it blocks, and on SIGTERM/SIGINT it
unregisters, then stops serving. :class:`PluginHost` does the same inside a program
that already runs an event loop (``async with PluginHost(...) as host``). What the
handlers may return, and what their exceptions become, is in
:mod:`registry.sdk.handlers`.
"""

from registry.sdk.handlers import (
    EmitFn,
    HealthFn,
    IngestFn,
    ShutdownFn,
    ingest_response,
)
from registry.sdk.host import Backoff, PluginHost
from registry.sdk.run import run_plugin, serve_until_signalled

__all__ = [
    "Backoff",
    "EmitFn",
    "HealthFn",
    "IngestFn",
    "PluginHost",
    "ShutdownFn",
    "ingest_response",
    "run_plugin",
    "serve_until_signalled",
]
