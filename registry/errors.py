"""Errors of the registry, raised by the store, the catalog and the client.

    RegistryError
    ├── InvalidArgument      a request field is malformed or out of range (names the field)
    ├── NotFound             no plugin has that id
    ├── AlreadyExists        a source or emitter name belongs to another live plugin
    ├── Unauthenticated      the call carries no identity the policy knows
    ├── PermissionDenied     the identity may not do this (names the scope or the owner)
    ├── ResourceExhausted    a bound was hit (names the limit)
    └── RegistryUnavailable  the registry (or its database) cannot answer now
        └── StoreError       the database failed; chained to the driver's exception

Only the gRPC servicer turns these into status codes; the client turns status
codes back into them.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidArgument(RegistryError):
    """A request field is missing, malformed or out of range."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(RegistryError):
    """No plugin is registered under the id asked for."""


class AlreadyExists(RegistryError):
    """A source or emitter name is owned by another plugin with a live instance."""


class Unauthenticated(RegistryError):
    """The call carries no verified identity that the policy knows."""


class PermissionDenied(RegistryError):
    """The caller's identity may not do this; the message names what is missing."""


class ResourceExhausted(RegistryError):
    """A bound was reached; the message names the limit."""

    def __init__(self, limit: str, reason: str) -> None:
        super().__init__(f"{limit}: {reason}")
        self.limit = limit


class RegistryUnavailable(RegistryError):
    """The registry cannot serve the request now; retrying later may succeed."""


class StoreError(RegistryUnavailable):
    """The database failed or is unreachable."""
