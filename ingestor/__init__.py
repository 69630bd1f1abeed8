"""Gateway side of POLKU: route raw payloads to external plugins.

    with RegistryResolver("127.0.0.1:50051") as resolver:
        with Hub(resolver=resolver).build() as hub:
            events = hub.ingest(IngestContext("k8s"), raw)
            result = hub.ingest_with_errors(IngestContext("k8s"), raw)  # and the errors

Errors are the :class:`PluginError` tree (:mod:`ingestor.errors`).
"""

from ingestor.breaker import BreakerSettings, BreakerState, CircuitBreaker
from ingestor.context import IngestContext
from ingestor.errors import PluginConnectionError, PluginError, PluginTransformError
from ingestor.external import ExternalIngestor
from ingestor.hub import Hub
from ingestor.resolver import RegistryResolver
from ingestor.result import IngestResult
from ingestor.view import Endpoint, ResolverView

__all__ = [
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "Endpoint",
    "ExternalIngestor",
    "Hub",
    "IngestContext",
    "IngestResult",
    "PluginConnectionError",
    "PluginError",
    "PluginTransformError",
    "RegistryResolver",
    "ResolverView",
]
