"""Domain objects to wire messages. The servicer and the watch hub share these."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from registry.model import Plugin, PluginStatus, PluginType
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
