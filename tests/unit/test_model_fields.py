"""Plugin.with_fields: what dataclasses.replace gives, for every field (a new one too)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.model import Plugin, PluginStatus, PluginType, Registration

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
BASE = Plugin(
    plugin_id="01J0000000000000000000000A",
    registration=Registration(name="p", type=PluginType.INGESTOR, address="a:1"),
    status=PluginStatus.UNKNOWN,
    registered_at=T0,
    last_heartbeat_at=T0,
    last_check_at=T0,
    last_error="e",
    revision=3,
    status_since=T0,
)
# A value unlike BASE's for every field: each must reach the copy.
OTHER = Plugin(
    plugin_id="01J0000000000000000000000B",
    registration=Registration(name="q", type=PluginType.EMITTER, address="b:2"),
    status=PluginStatus.HEALTHY,
    registered_at=T0 + timedelta(seconds=1),
    last_heartbeat_at=None,
    last_check_at=T0 + timedelta(seconds=2),
    last_error="",
    revision=4,
    status_since=None,
)
NAMES = [f.name for f in dataclasses.fields(Plugin)]


def test_every_field_differs_between_the_two_samples() -> None:
    for name in NAMES:
        assert getattr(BASE, name) != getattr(OTHER, name), name


@given(st.sets(st.sampled_from(NAMES)))
def test_with_fields_is_dataclasses_replace(names: set[str]) -> None:
    changes = {name: getattr(OTHER, name) for name in names}
    assert BASE.with_fields(**changes) == dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


def test_an_unknown_field_is_refused() -> None:
    with pytest.raises(TypeError, match="no field colour"):
        BASE.with_fields(colour="red")
