"""polku-registry: the plugin registry and discovery service of the POLKU gateway."""

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
