"""registry.sdk's public API is its ``__init__`` with a sorted ``__all__``."""

from __future__ import annotations

import registry.sdk


def test_sdk_exports_are_sorted_and_importable():
    exported = registry.sdk.__all__
    assert list(exported) == sorted(exported)
    assert {"Backoff", "PluginHost", "run_plugin"} <= set(exported)
    for name in exported:
        assert getattr(registry.sdk, name, None) is not None, name
