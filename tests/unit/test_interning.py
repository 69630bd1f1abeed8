"""PluginInterner: decoded states share held objects, and always equal what was decoded."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from registry.interning import PluginInterner
from registry.model import Plugin, PluginStatus, PluginType, Registration

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def state(plugin_id: str, name: str = "p", **changes: object) -> Plugin:
    base = Plugin(
        plugin_id=plugin_id,
        registration=Registration(
            name=name, type=PluginType.INGESTOR, address="a:1", sources=(name,)
        ),
        status=PluginStatus.UNKNOWN,
        registered_at=T0,
        last_heartbeat_at=T0,
        revision=1,
        status_since=T0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def copy(plugin: Plugin) -> Plugin:
    """An equal plugin made of objects of its own, as decoding makes one."""
    reg = plugin.registration
    return dataclasses.replace(
        plugin,
        registration=dataclasses.replace(reg, sources=tuple(reg.sources), labels=dict(reg.labels)),
        registered_at=plugin.registered_at + timedelta(0),
    )


def test_a_state_equal_to_the_catalogues_is_the_catalogues_object() -> None:
    held = state("a", status=PluginStatus.HEALTHY)
    interner = PluginInterner({"a": held}.get)
    assert interner.plugin(copy(held)) is held


def test_another_state_of_a_held_id_shares_its_registration_and_equal_times() -> None:
    held = state("a", status=PluginStatus.HEALTHY, revision=2)
    interner = PluginInterner({"a": held}.get)
    older = copy(state("a", revision=1))
    shared = interner.plugin(older)
    assert shared == older
    assert shared.registration is held.registration
    assert shared.registered_at is held.registered_at


def test_states_of_an_id_nobody_holds_share_one_registration() -> None:
    interner = PluginInterner(lambda plugin_id: None)
    first = interner.plugin(copy(state("gone")))
    second = interner.plugin(copy(state("gone", status=PluginStatus.EXPIRED, revision=2)))
    assert second.registration is first.registration
    assert len(interner) == 1


def test_a_different_registration_under_an_id_is_kept_as_decoded() -> None:
    held = state("a", name="one")
    other = state("a", name="two")
    assert PluginInterner({"a": held}.get).plugin(other).registration is other.registration


states = st.builds(
    state,
    plugin_id=st.sampled_from(["a", "b", "c"]),
    name=st.sampled_from(["x", "y"]),
    status=st.sampled_from(list(PluginStatus)),
    revision=st.integers(1, 5),
    last_error=st.sampled_from(["", "boom"]),
    last_check_at=st.sampled_from([None, T0, T0 + timedelta(seconds=1)]),
)


@given(held=st.lists(states, max_size=3), decoded=st.lists(states, max_size=20))
def test_what_comes_out_always_equals_what_went_in(
    held: list[Plugin], decoded: list[Plugin]
) -> None:
    catalogue = {p.plugin_id: p for p in held}
    interner = PluginInterner(catalogue.get)
    for plugin in decoded:
        assert interner.plugin(copy(plugin)) == plugin
