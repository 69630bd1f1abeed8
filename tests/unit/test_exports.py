"""Each package's public API is its ``__init__`` with a sorted ``__all__``."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["registry", "ingestor"])
def test_all_is_sorted_and_importable(package):
    module = importlib.import_module(package)
    exported = getattr(module, "__all__", None)
    if exported is None:
        pytest.skip(f"{package} defines no __all__ yet")
    assert list(exported) == sorted(exported)
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert getattr(module, name, None) is not None, f"{package}.{name} is not importable"
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)
    assert set(exported) <= set(namespace)


def test_registry_exports_its_public_api():
    import registry

    assert {
        "RegistryClient",
        "RegistryServer",
        "RegistrySettings",
        "RegistryError",
        "InvalidArgument",
        "NotFound",
        "AlreadyExists",
        "RegistryUnavailable",
        "StoreError",
        "PluginStatus",
        "PluginType",
    } <= set(registry.__all__)
