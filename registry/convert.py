"""Domain objects to wire messages. The servicer and the watch hub share these."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from registry.model import Change, Plugin, PluginStatus, PluginType
from registry.wire import pb


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def wire_type(value: PluginType) -> pb.PluginType:
    return cast(pb.PluginType, int(value))


def wire_status(value: PluginStatus) -> pb.PluginStatus:
    return cast(pb.PluginStatus, int(value))


def plugin_info(plugin: Plugin) -> pb.PluginInfo:
    reg = plugin.registration
    return pb.PluginInfo(
        name=reg.name,
        version=reg.version,
        type=wire_type(reg.type),
        description=reg.description,
        sources=reg.sources,
        emitter_name=reg.emitter_name,
        capabilities=reg.capabilities,
    )


def registered_plugin(plugin: Plugin) -> pb.RegisteredPlugin:
    return pb.RegisteredPlugin(
        plugin_id=plugin.plugin_id,
        info=plugin_info(plugin),
        address=plugin.address,
        status=wire_status(plugin.status),
        registered_at=timestamp(plugin.registered_at),
        last_heartbeat_at=timestamp(plugin.last_heartbeat_at),
        last_check_at=timestamp(plugin.last_check_at),
        last_error=plugin.last_error,
        lease_ttl_seconds=plugin.registration.lease_ttl_seconds,
        labels=plugin.registration.labels,
        revision=plugin.revision,
    )


def endpoint(plugin: Plugin) -> pb.Endpoint:
    return pb.Endpoint(
        plugin_id=plugin.plugin_id, address=plugin.address, status=wire_status(plugin.status)
    )


class MessageCache:
    """RegisteredPlugin messages, built once per plugin state.

    Plugins are immutable, so a cached message is reused while the catalog still
    holds the very same object; ListPlugins of thousands and Watch snapshots then
    cost a copy, not a rebuild. Removed plugins are dropped as changes commit.
    """

    def __init__(self) -> None:
        self._messages: dict[str, tuple[Plugin, pb.RegisteredPlugin]] = {}

    def get(self, plugin: Plugin) -> pb.RegisteredPlugin:
        hit = self._messages.get(plugin.plugin_id)
        if hit is not None and hit[0] is plugin:
            return hit[1]
        message = registered_plugin(plugin)
        self._messages[plugin.plugin_id] = (plugin, message)
        return message

    def forget(self, changes: list[Change]) -> None:
        for change in changes:
            for plugin in change.removed:
                self._messages.pop(plugin.plugin_id, None)

    def clear(self) -> None:
        self._messages.clear()
