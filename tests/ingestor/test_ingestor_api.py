"""The public surface of the ingestor package and its error tree."""

from __future__ import annotations

import pytest

import ingestor
from ingestor import (
    ExternalIngestor,
    IngestContext,
    PluginConnectionError,
    PluginError,
    PluginTransformError,
    RegistryResolver,
)


def test_exported_members() -> None:
    exported = {
        name
        for name, value in vars(ingestor).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("ingestor.")
    }
    assert set(ingestor.__all__) == exported
    assert ingestor.__all__ == sorted(ingestor.__all__)


def test_error_tree() -> None:
    assert issubclass(PluginConnectionError, PluginError)
    assert issubclass(PluginTransformError, PluginError)
    assert not issubclass(PluginTransformError, PluginConnectionError)


def test_context_defaults() -> None:
    ctx = IngestContext("k8s")
    assert (ctx.source, ctx.cluster, ctx.format) == ("k8s", "", "")


def test_construction_never_connects() -> None:
    # Nothing listens on port 1; nothing is dialled until the first call.
    with ExternalIngestor("k8s", "127.0.0.1:1") as static:
        assert static.channels() == 0
    resolver = RegistryResolver("127.0.0.1:1")
    with ExternalIngestor("k8s", resolver=resolver) as dynamic:
        assert dynamic.channels() == 0
    assert not resolver.synced
    resolver.close()


def test_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ExternalIngestor("k8s")
    with pytest.raises(ValueError, match="exactly one"):
        ExternalIngestor("k8s", "127.0.0.1:1", resolver=RegistryResolver("127.0.0.1:1"))


def test_resolver_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_staleness"):
        RegistryResolver("127.0.0.1:1", max_staleness=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        RegistryResolver("127.0.0.1:1", connect_timeout=0)
    with pytest.raises(ValueError, match="backoff"):
        RegistryResolver("127.0.0.1:1", backoff_initial=2, backoff_max=1)


def test_resolver_refuses_use_after_close() -> None:
    resolver = RegistryResolver("127.0.0.1:1")
    resolver.close()
    resolver.close()
    with pytest.raises(PluginError, match="closed"):
        resolver.start()
    with pytest.raises(PluginError, match="closed"):
        resolver.wait_synced(1)
