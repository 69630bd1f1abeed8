"""The bounds added for the cost per operation (issue 13): each is hit and holds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from registry import convert, poller, watch
from registry.errors import InvalidArgument
from registry.model import PluginType
from registry.settings import RegistrySettings
from registry.trust import addresses


def test_parsed_addresses_are_cached_within_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addresses, "_PARSED", {})
    monkeypatch.setattr(addresses, "_MAX_PARSED", 3)
    for port in range(1, 11):
        parsed = addresses.parse_address("address", f"127.0.0.1:{port}")
        assert parsed.port == port
        assert len(addresses._PARSED) <= 3
    # The cached answer is the parse itself; a refusal is never cached and names its field.
    assert addresses.parse_address("address", "127.0.0.1:10") is addresses.parse_address(
        "address", "127.0.0.1:10"
    )
    for field in ("address", "advertise"):
        with pytest.raises(InvalidArgument) as caught:
            addresses.parse_address(field, "grpc://127.0.0.1:1")
        assert caught.value.field == field


async def test_remembered_first_check_passes_stay_within_their_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(poller, "MAX_FRESH", 3)
    checker: Any = SimpleNamespace(_fresh={})
    keys = [(f"127.0.0.1:{port}", PluginType.INGESTOR) for port in range(1, 11)]
    for key in keys:
        poller.HealthChecker._remember_pass(checker, key)
        assert len(checker._fresh) <= 3
    assert keys[-1] in checker._fresh


def test_shared_watch_messages_stay_within_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "SHARED_MESSAGES", 3)
    monkeypatch.setattr(watch, "SHARED_BYTES", 100)
    state: Any = SimpleNamespace(subscribe=lambda *args, **kwargs: None)
    hub = watch.WatchHub(state, convert.MessageCache())
    assert hub._shared(7, "a") is None  # revision 7 is now the shared one
    for i in range(10):
        hub._share(7, i, b"x" * 10)
    assert len(hub._shared_messages) == 3
    hub._share(7, "big", b"x" * 100)  # over the byte bound: built for its caller alone
    assert hub._shared(7, "big") is None
    assert hub._shared(8, 0) is None  # a newer revision drops the older one's messages
    assert not hub._shared_messages


@pytest.mark.parametrize("wait", [-0.1, 60.5])
def test_first_check_wait_out_of_range_names_the_setting(wait: float) -> None:
    with pytest.raises(ValueError, match=r"^first_check_wait:"):
        RegistrySettings(first_check_wait=wait)
