"""ResolverView: snapshots, deltas and progress messages applied to the cache."""

from __future__ import annotations

from ingestor import Endpoint, ResolverView
from registry.wire import pb

HEALTHY = pb.PLUGIN_STATUS_HEALTHY
UNHEALTHY = pb.PLUGIN_STATUS_UNHEALTHY


def plugin(pid: str, port: int, sources: list[str], status: int = HEALTHY, name: str = "p"):
    return pb.RegisteredPlugin(
        plugin_id=pid,
        address=f"127.0.0.1:{port}",
        status=status,
        info=pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=sources),
    )


def test_snapshot_routes_healthy_only() -> None:
    view = ResolverView.snapshot(
        7,
        [
            plugin("b", 2, ["k8s"]),
            plugin("a", 1, ["k8s", "syslog"]),
            plugin("c", 3, ["k8s"], status=UNHEALTHY),
        ],
    )
    assert view.revision == 7
    assert [e.plugin_id for e in view.endpoints("k8s")] == ["a", "b"]  # sorted by id
    assert view.endpoints("syslog") == (Endpoint("127.0.0.1:1", "a", "p"),)
    assert view.declares("k8s")
    assert not view.declares("nope")
    assert view.sources() == {"k8s", "syslog"}


def test_delta_upsert_and_remove() -> None:
    view = ResolverView.snapshot(1, [plugin("a", 1, ["k8s"]), plugin("b", 2, ["k8s"])])
    view = view.apply(2, [plugin("a", 1, ["k8s"], status=UNHEALTHY)], [])
    assert [e.plugin_id for e in view.endpoints("k8s")] == ["b"]
    assert view.declares("k8s")
    view = view.apply(3, [], ["b", "unknown-id"])
    assert view.endpoints("k8s") == ()
    assert view.declares("k8s")  # "a" still registered, unhealthy
    view = view.apply(4, [], ["a"])
    assert not view.declares("k8s")
    assert view.revision == 4


def test_delta_moves_a_plugin_between_sources() -> None:
    view = ResolverView.snapshot(1, [plugin("a", 1, ["old"])])
    view = view.apply(2, [plugin("a", 9, ["new"])], [])
    assert not view.declares("old")
    assert [e.address for e in view.endpoints("new")] == ["127.0.0.1:9"]


def test_snapshot_replaces_everything() -> None:
    view = ResolverView.snapshot(5, [plugin("a", 1, ["k8s"])])
    view = ResolverView.snapshot(3, [plugin("z", 2, ["other"])])
    assert not view.declares("k8s")
    assert view.revision == 3


def test_progress_keeps_contents() -> None:
    view = ResolverView.snapshot(5, [plugin("a", 1, ["k8s"])])
    assert view.at(5) is view
    later = view.at(9)
    assert later.revision == 9
    assert later.routes == view.routes


def test_earlier_views_are_unchanged() -> None:
    first = ResolverView.snapshot(1, [plugin("a", 1, ["k8s"])])
    first.apply(2, [plugin("b", 2, ["k8s"])], ["a"])
    assert [e.plugin_id for e in first.endpoints("k8s")] == ["a"]
