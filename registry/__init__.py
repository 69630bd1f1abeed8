"""polku-registry: the plugin registry and discovery service of the POLKU gateway.

The server side (``RegistryServer``, ``RegistrySettings``) is imported on first use,
so clients, plugins and the CLI's client commands do not pay for SQLAlchemy and
Alembic at start-up.
"""

from typing import TYPE_CHECKING, Any

from registry.client import RegistryClient
from registry.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    StoreError,
)
from registry.model import PluginStatus, PluginType

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

if TYPE_CHECKING:
    from registry.server import RegistryServer
    from registry.settings import RegistrySettings

__all__ = [
    "AlreadyExists",
    "InvalidArgument",
    "NotFound",
    "PluginStatus",
    "PluginType",
    "RegistryClient",
    "RegistryError",
    "RegistryServer",
    "RegistrySettings",
    "RegistryUnavailable",
    "StoreError",
]

_LAZY = {"RegistryServer": "registry.server", "RegistrySettings": "registry.settings"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
