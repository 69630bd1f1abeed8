"""render: the operator's table and details, and the JSON programs read."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from registry import render
from registry.wire import pb

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def stamp(ago: timedelta) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(NOW - ago)
    return ts


def ingestor(**fields: Any) -> pb.RegisteredPlugin:
    plugin = pb.RegisteredPlugin(
        plugin_id="01HZZZINGESTOR0000000000AA",
        info=pb.PluginInfo(name="k8s", type=pb.PLUGIN_TYPE_INGESTOR, sources=["k8s", "docker"]),
        address="10.0.0.1:9000",
        status=pb.PLUGIN_STATUS_HEALTHY,
        registered_at=stamp(timedelta(minutes=10)),
        last_check_at=stamp(timedelta(seconds=3)),
        revision=7,
    )
    for name, value in fields.items():
        setattr(plugin, name, value)
    return plugin


def emitter() -> pb.RegisteredPlugin:
    return pb.RegisteredPlugin(
        plugin_id="01HZZZEMITTER00000000000BB",
        info=pb.PluginInfo(name="sink", type=pb.PLUGIN_TYPE_EMITTER, emitter_name="kafka"),
        address="unix:/run/sink.sock",
        status=pb.PLUGIN_STATUS_UNHEALTHY,
        last_error="UNAVAILABLE: failed to connect to all addresses; last error: refused",
    )


def test_table_has_the_columns_in_order_and_aligns_them() -> None:
    table = render.plugins_table([ingestor(), emitter()], now=NOW)
    header, first, second = table.splitlines()
    columns = list(render.TABLE_COLUMNS)
    assert [header.index(c) for c in columns] == sorted(header.index(c) for c in columns)
    # Every row starts each cell where its header starts.
    for column, cell_first, cell_second in [
        ("PLUGIN ID", "01HZZZINGESTOR0000000000AA", "01HZZZEMITTER00000000000BB"),
        ("NAME", "k8s", "sink"),
        ("TYPE", "ingestor", "emitter"),
        ("ADDRESS", "10.0.0.1:9000", "unix:/run/sink.sock"),
        ("ROUTES", "k8s,docker", "kafka"),
        ("STATUS", "healthy", "unhealthy"),
        ("LAST CHECK", "3s ago", "-"),
    ]:
        at = header.index(column)
        assert first[at:].startswith(cell_first), column
        assert second[at:].startswith(cell_second), column
    assert not any(line.endswith(" ") for line in table.splitlines())


def test_table_truncates_the_last_error() -> None:
    table = render.plugins_table([emitter()], now=NOW)
    row = table.splitlines()[1]
    error = row[table.splitlines()[0].index("LAST ERROR") :]
    assert error.startswith("UNAVAILABLE: failed")
    assert error.endswith("…")
    assert len(error) == render.ERROR_WIDTH
    assert "refused" not in row


def test_emitter_without_emitter_name_routes_by_its_name() -> None:
    plugin = emitter()
    plugin.info.emitter_name = ""
    assert render.routes(plugin.info) == "sink"


def test_empty_table() -> None:
    assert render.plugins_table([], now=NOW) == "No plugins registered."


@pytest.mark.parametrize(
    ("ago", "text"),
    [
        (timedelta(seconds=0), "0s ago"),
        (timedelta(seconds=59), "59s ago"),
        (timedelta(minutes=5, seconds=10), "5m ago"),
        (timedelta(hours=2, minutes=59), "2h ago"),
        (timedelta(days=3, hours=1), "3d ago"),
        (timedelta(seconds=-30), "0s ago"),  # a clock a little ahead of ours
    ],
)
def test_age(ago: timedelta, text: str) -> None:
    assert render.age(stamp(ago), NOW) == text


def test_unknown_enum_numbers_show_as_numbers() -> None:
    assert render.type_name(99) == "99"
    assert render.status_name(pb.PLUGIN_STATUS_EXPIRED) == "expired"


def test_json_uses_proto_field_names_and_prints_every_field() -> None:
    plugin = pb.RegisteredPlugin(
        plugin_id="01HZZZ",
        info=pb.PluginInfo(name="k8s", type=pb.PLUGIN_TYPE_INGESTOR, sources=["k8s"]),
        address="h:1",
        status=pb.PLUGIN_STATUS_UNKNOWN,
    )
    [item] = json.loads(render.plugins_json([plugin]))
    assert item["plugin_id"] == "01HZZZ"
    assert item["status"] == "PLUGIN_STATUS_UNKNOWN"
    assert item["info"]["sources"] == ["k8s"]
    assert item["info"]["emitter_name"] == ""  # present although empty
    assert item["last_error"] == ""
    assert item["lease_ttl_seconds"] == 0
    assert "pluginId" not in item
    assert json.loads(render.plugin_json(plugin)) == item


def test_status_unspecified_still_appears() -> None:
    assert render.to_json(pb.RegisteredPlugin())["status"] == "PLUGIN_STATUS_UNSPECIFIED"


def test_detail() -> None:
    plugin = ingestor(lease_ttl_seconds=30)
    plugin.labels["team"] = "infra"
    lines = render.plugin_detail(plugin, now=NOW).splitlines()
    detail = {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
    assert detail["plugin id"] == "01HZZZINGESTOR0000000000AA"
    assert detail["type"] == "ingestor"
    assert detail["sources"] == "k8s, docker"
    assert detail["status"] == "healthy"
    assert detail["lease"] == "30s"
    assert detail["labels"] == "team=infra"
    assert detail["last heartbeat"] == "-"
    assert detail["registered"].endswith("(10m ago)")
    assert detail["revision"] == "7"


def test_detail_of_an_operator_registration() -> None:
    text = render.plugin_detail(emitter(), now=NOW)
    assert "lease:" in text
    assert "none (registered by an operator)" in text
    assert "emitter name:" in text


def test_watch_lines() -> None:
    snapshot = pb.WatchResponse(revision=3, snapshot=True, upserted=[ingestor()])
    assert render.watch_lines(snapshot) == [
        "revision 3 snapshot (1 plugin)",
        "revision 3 present 01HZZZINGESTOR0000000000AA k8s ingestor 10.0.0.1:9000 "
        "routes=k8s,docker status=healthy",
    ]
    assert render.watch_lines(pb.WatchResponse(revision=4, snapshot=True)) == [
        "revision 4 snapshot (0 plugins)"
    ]
    change = pb.WatchResponse(revision=5, removed_plugin_ids=["01HZZZGONE"])
    assert render.watch_lines(change) == ["revision 5 removed 01HZZZGONE"]
    assert render.watch_lines(pb.WatchResponse(revision=6)) == []  # progress


def test_watch_json_is_one_compact_line() -> None:
    line = render.watch_json(pb.WatchResponse(revision=6))
    assert "\n" not in line
    assert " " not in line
    assert json.loads(line) == {
        "revision": "6",
        "snapshot": False,
        "upserted": [],
        "removed_plugin_ids": [],
    }
