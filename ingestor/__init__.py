"""Gateway side of POLKU: route raw payloads to external plugins.

    with RegistryResolver("127.0.0.1:50051") as resolver:
        with Hub(resolver=resolver).build() as hub:
            events = hub.ingest(IngestContext("k8s"), raw)
            result = hub.ingest_with_errors(IngestContext("k8s"), raw)  # and the errors
            outcome = hub.emit(events)  # by each event's route_to, to emitter plugins

Errors are the :class:`PluginError` tree (:mod:`ingestor.errors`).
"""

from ingestor.breaker import BreakerSettings, BreakerState, CircuitBreaker
from ingestor.context import IngestContext
from ingestor.delivery import RetryPolicy
from ingestor.emit_routes import EmitResult
from ingestor.emitter import ExternalEmitter
from ingestor.errors import (
    PluginConnectionError,
    PluginEmitError,
    PluginError,
    PluginTransformError,
)
from ingestor.external import ExternalIngestor
from ingestor.hub import Hub
from ingestor.resolver import RegistryResolver
from ingestor.result import IngestResult
from ingestor.view import Endpoint, ResolverView

__all__ = [
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "EmitResult",
    "Endpoint",
    "ExternalEmitter",
    "ExternalIngestor",
    "Hub",
    "IngestContext",
    "IngestResult",
    "PluginConnectionError",
    "PluginEmitError",
    "PluginError",
    "PluginTransformError",
    "RegistryResolver",
    "ResolverView",
    "RetryPolicy",
]
